-- Applies a chunk of one shard's flow events (see redis.rs for the keys and codes).
-- KEYS: the shard's deadlines, this call's result key, the shard's set of flows that use
-- steps, then per event its instance key and its fingerprint, then result keys to delete.
-- ARGV: dedup window (ms), shard capacity, number of acks, shard prefix length, how long
-- a closed mark stays (ms, the longest flow timeout), then per
-- event: kind (s start, e end, t step), value, timeout (ms), and for a step
-- "<step>\0<stored step value>".
-- The outcomes tell the replica which instances opened and closed, with their start
-- timestamps: it keeps the overdue counts from them (ages.rs), not this script.
local zset = KEYS[1]
local stepflows = KEYS[3]
local window = ARGV[1]
local cap = tonumber(ARGV[2])
local plen = tonumber(ARGV[4])
local mark_ttl = ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
-- Four fields per outcome: event index (0: none), code, stored value, stored steps.
local function emit(i, code, v, steps)
  out[#out + 1] = tostring(i)
  out[#out + 1] = code
  out[#out + 1] = v or ''
  out[#out + 1] = steps or ''
end
-- Another key of the same instance: `prefix{h}<letter><flow>\0<id>`.
local function companion(key, letter)
  return string.sub(key, 1, plen + 18) .. letter .. string.sub(key, plen + 20)
end
local function flow_of(key)
  local from = plen + 20
  local stop = string.find(key, '\0', from, true)
  return string.sub(key, from, (stop or 0) - 1)
end
-- The instance's steps as netstrings (name, value, ...); '' when it has none.
local function steps_of(key)
  local all = redis.call('HGETALL', companion(key, 'k'))
  if #all == 0 then return '' end
  local parts = {}
  for j = 1, #all do parts[j] = #all[j] .. ':' .. all[j] end
  return table.concat(parts)
end
-- Removes an instance leaving the store; answers its steps. An instance that had opened
-- leaves a closed mark (for the longest flow timeout) when its flow uses steps, so that a
-- later step of it counts as after_close. Flows without steps keep nothing more.
local function take(key, old)
  local steps = steps_of(key)
  if steps ~= '' then redis.call('DEL', companion(key, 'k')) end
  redis.call('DEL', key)
  redis.call('ZREM', zset, key)
  if string.sub(old, 1, 1) == 'o' and
      (steps ~= '' or redis.call('SISMEMBER', stepflows, flow_of(key)) == 1) then
    redis.call('SET', companion(key, 'c'), '1', 'PX', mark_ttl)
  end
  return steps
end
-- A step: kept once per (instance, step), the earliest timestamp winning.
local function step(i, key, old, value, timeout, aux)
  local z = string.find(aux, '\0', 1, true)
  local name = string.sub(aux, 1, z - 1)
  local seen = string.sub(aux, z + 1)
  local kept = companion(key, 'k')
  if not old then
    if redis.call('EXISTS', companion(key, 'c')) == 1 then
      emit(i, 'A')
      return
    end
    -- Before its start: the step waits, with the instance's deadline.
    redis.call('SET', key, value)
    redis.call('ZADD', zset, now + timeout, key)
    redis.call('HSET', kept, name, seen)
    emit(i, 'W')
    return
  end
  local had = redis.call('HGET', kept, name)
  if had then
    if string.sub(seen, 1, 20) < string.sub(had, 1, 20) then
      redis.call('HSET', kept, name, seen)
    end
    emit(i, 'D')
  else
    redis.call('HSET', kept, name, seen)
    if string.sub(old, 1, 1) == 'o' then emit(i, 'R', old) else emit(i, 'W') end
  end
end
local acks = tonumber(ARGV[3])
local n = (#KEYS - 3 - acks) / 2
-- Results this replica has read: no longer needed for recovery.
for j = 2 * n + 4, #KEYS do redis.call('DEL', KEYS[j]) end
for i = 1, n do
  local key = KEYS[2 * i + 2]
  local fp = KEYS[2 * i + 3]
  local kind = ARGV[4 * i + 2]
  local value = ARGV[4 * i + 3]
  local timeout = tonumber(ARGV[4 * i + 4])
  if not redis.call('SET', fp, '1', 'NX', 'PX', window) then
    emit(i, 'D')
  else
    -- The flow uses steps: its instances leave a closed mark from now on.
    if kind == 't' then redis.call('SADD', stepflows, flow_of(key)) end
    local old = redis.call('GET', key)
    if old then
      local due = redis.call('ZSCORE', zset, key)
      if due and tonumber(due) <= now then
        -- Past its deadline and not yet swept: it timed out, and this event finds nothing.
        emit(i, 'T', old, take(key, old))
        old = nil
      end
    end
    local state = old and string.sub(old, 1, 1)
    if kind == 't' then
      step(i, key, old, value, timeout, ARGV[4 * i + 5])
    elseif not old then
      redis.call('SET', key, value)
      redis.call('ZADD', zset, now + timeout, key)
      if kind == 's' then
        -- A new instance: a closed mark of an earlier one with this id is gone.
        redis.call('DEL', companion(key, 'c'))
        emit(i, 'O')
      else
        emit(i, 'W')
      end
    elseif kind == 's' then
      if state == 'o' then
        -- The earliest start wins; the instance keeps its dims and deadline. The value
        -- it had goes back with the duplicate: its start moved.
        if string.sub(value, 2, 21) < string.sub(old, 2, 21) then
          redis.call('SET', key, string.sub(value, 1, 21) .. string.sub(old, 22))
          emit(i, 'D', old)
        else
          emit(i, 'D')
        end
      elseif state == 'p' then
        -- Steps waited for this start: the instance opens with them.
        redis.call('SET', key, value)
        redis.call('ZADD', zset, now + timeout, key)
        redis.call('DEL', companion(key, 'c'))
        emit(i, 'S', '', steps_of(key))
      else
        -- Never counted (it waited, not open); 'o': it leaves a closed mark.
        emit(i, 'P', old, take(key, 'o'))
      end
    elseif state == 'o' then
      emit(i, 'C', old, take(key, old))
    elseif state == 'p' then
      -- Steps waited, and now the end too: it waits for the start with them.
      redis.call('SET', key, value)
      redis.call('ZADD', zset, now + timeout, key)
      emit(i, 'W')
    else
      emit(i, 'D')
    end
  end
end
-- Full: the entries due soonest leave (timed out if already due). The keys popped are
-- not in KEYS, but they are this shard's: in the hash slot of KEYS[1] (the shard's tag).
local over = redis.call('ZCARD', zset) - cap
while over > 0 do
  local popped = redis.call('ZPOPMIN', zset)
  if #popped == 0 then break end
  local v = redis.call('GET', popped[1])
  if v then
    local steps = take(popped[1], v)
    if tonumber(popped[2]) <= now then emit(0, 'T', v, steps) else emit(0, 'E', v, steps) end
  end
  over = over - 1
end
-- Kept until this replica has read the reply: if the reply is lost, the replica reads
-- the outcomes from here and reports them (the exporter's retry finds only duplicates).
local parts = {}
for j = 1, #out do parts[j] = #out[j] .. ':' .. out[j] end
redis.call('SET', KEYS[2], table.concat(parts), 'PX', math.max(tonumber(window), 60000))
return out
