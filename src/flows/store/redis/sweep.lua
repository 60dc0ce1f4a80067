-- Pops the shard's instances past their deadline (see redis.rs).
-- KEYS: the shard's deadlines, the shard's set of flows that use steps.
-- ARGV: most entries popped, shard prefix length, how long a closed mark stays (ms).
-- Answers the entries left, then per instance popped its value and its steps.
local plen = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = { tostring(redis.call('ZCARD', KEYS[1]) - #due) }
local function companion(key, letter)
  return string.sub(key, 1, plen + 18) .. letter .. string.sub(key, plen + 20)
end
-- Not in KEYS, but of this shard: in the hash slot of KEYS[1] (the shard's tag).
for _, key in ipairs(due) do
  local v = redis.call('GET', key)
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], key)
  if v then
    local kept = companion(key, 'k')
    local all = redis.call('HGETALL', kept)
    local steps = ''
    if #all > 0 then
      redis.call('DEL', kept)
      local parts = {}
      for j = 1, #all do parts[j] = #all[j] .. ':' .. all[j] end
      steps = table.concat(parts)
    end
    if string.sub(v, 1, 1) == 'o' then
      local from = plen + 20
      local stop = string.find(key, '\0', from, true)
      local flow = string.sub(key, from, (stop or 0) - 1)
      if steps ~= '' or redis.call('SISMEMBER', KEYS[2], flow) == 1 then
        redis.call('SET', companion(key, 'c'), '1', 'PX', ARGV[3])
      end
    end
    out[#out + 1] = v
    out[#out + 1] = steps
  end
end
return out
