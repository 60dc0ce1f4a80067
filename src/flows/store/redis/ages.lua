-- Reads the overdue counts (docs/behaviour.md §10, ages.rs) from the first shard.
-- KEYS: the first shard's deadlines (its prefix followed by `deadlines`).
-- ARGV: per flow, its name, its threshold in seconds, and how old a start second must be
-- (in seconds) before no instance of it can still be open: a count left there is what a
-- replica that stopped without writing its changes left behind, and is deleted.
-- Answers per flow its overdue count and its oldest start second (-1: none open); last,
-- the server's time.
local prefix = string.sub(KEYS[1], 1, -10)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 1, #ARGV, 3 do
  local ages = prefix .. 'ages:' .. ARGV[i]
  local threshold = tonumber(ARGV[i + 1])
  local stale_before = now - tonumber(ARGV[i + 2])
  local all = redis.call('HGETALL', ages)
  local overdue, oldest = 0, -1
  for j = 1, #all, 2 do
    local second, count = tonumber(all[j]), tonumber(all[j + 1])
    if second < stale_before then
      redis.call('HDEL', ages, all[j])
    elseif count > 0 then
      if oldest < 0 or second < oldest then oldest = second end
      -- Every instance of the second is past the threshold.
      if second + 1 <= now - threshold then overdue = overdue + count end
    end
  end
  out[#out + 1] = tostring(overdue)
  out[#out + 1] = tostring(oldest)
end
out[#out + 1] = string.format('%.3f', now)
return out
