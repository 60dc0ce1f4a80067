-- Writes a replica's changes to the open-instance counts (docs/behaviour.md §10, ages.rs):
-- per flow with an overdue threshold, a hash of its open instances by start second
-- (`<prefix>ages:<flow>`, field the Unix second, value the count), all in the first
-- shard's hash slot.
-- KEYS: the first shard's deadlines (its prefix followed by `deadlines`).
-- ARGV: per change, the flow, the start second and the change (opened minus closed).
-- A count can be negative for a while (a close written before the open another replica
-- has not written yet); a field is deleted only when it comes back to 0.
local prefix = string.sub(KEYS[1], 1, -10)
for i = 1, #ARGV, 3 do
  local ages = prefix .. 'ages:' .. ARGV[i]
  if redis.call('HINCRBY', ages, ARGV[i + 1], ARGV[i + 2]) == 0 then
    redis.call('HDEL', ages, ARGV[i + 1])
  end
end
return #ARGV / 3
