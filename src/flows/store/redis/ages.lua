-- Reads a shard's overdue counts (docs/behaviour.md §10), after folding its log
-- (ages_log.lua) into the per-second hashes.
-- KEYS: the shard's deadlines (its prefix followed by `deadlines`).
-- ARGV: per flow, its name and its threshold in seconds.
-- Answers per flow its overdue count and its oldest start second (-1: none open); last,
-- the server's time.
local prefix = string.sub(KEYS[1], 1, -10)
fold_ages(prefix)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i = 1, #ARGV, 2 do
  local threshold = tonumber(ARGV[i + 1])
  local all = redis.call('HGETALL', prefix .. 'ages:' .. ARGV[i])
  local overdue, oldest = 0, -1
  for j = 1, #all, 2 do
    local second, count = tonumber(all[j]), tonumber(all[j + 1])
    if count > 0 then
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
