-- Overdue instances (docs/behaviour.md §10), shared by the apply, sweep and ages scripts.
-- A flow with a threshold has, per shard, a hash of its open instances by start second
-- (`<shard prefix>ages:<flow>`, field the Unix second in 11 digits, value the count). The
-- apply and sweep scripts do not write it: each call appends its changes, summed per
-- (flow, second), to the shard's log (`<shard prefix>agelog`, one APPEND per call), and
-- the log is folded into the hashes, summed again, before the counts are read and
-- whenever it grows past AGES_LOG_MAX bytes. An instance opened and closed between two
-- folds then costs no hash write at all.
-- An entry: `<len>:<flow><second><delta>;`, the delta a signed integer, or `?` for an
-- instance known by its key only (timed out, evicted): -1 if its flow is counted, which
-- it is if an earlier entry or the hash has its (flow, second).
local AGES_LOG_MAX = 65536
local function ages_entry(flow, second, delta)
  return #flow .. ':' .. flow .. second .. delta .. ';'
end
local function fold_ages(prefix)
  local log = prefix .. 'agelog'
  local blob = redis.call('GET', log)
  if not blob then return end
  redis.call('DEL', log)
  local sums = {}
  local pos, size = 1, #blob
  while pos <= size do
    local colon = string.find(blob, ':', pos, true)
    if not colon then break end
    local len = tonumber(string.sub(blob, pos, colon - 1))
    local flow = string.sub(blob, colon + 1, colon + len)
    local second = string.sub(blob, colon + len + 1, colon + len + 11)
    local semi = string.find(blob, ';', colon + len + 12, true)
    if not semi then break end
    local delta = string.sub(blob, colon + len + 12, semi - 1)
    pos = semi + 1
    local per = sums[flow]
    if not per then
      per = {}
      sums[flow] = per
    end
    if delta ~= '?' then
      per[second] = (per[second] or 0) + tonumber(delta)
    elseif per[second] ~= nil or redis.call('HEXISTS', prefix .. 'ages:' .. flow, second) == 1 then
      per[second] = (per[second] or 0) - 1
    end
  end
  for flow, per in pairs(sums) do
    local ages = prefix .. 'ages:' .. flow
    for second, d in pairs(per) do
      if d ~= 0 and redis.call('HINCRBY', ages, second, d) <= 0 then
        redis.call('HDEL', ages, second)
      end
    end
  end
end
-- Appends one call's entries (a list of strings) to the shard's log.
local function log_ages(prefix, entries)
  if #entries == 0 then return end
  if redis.call('APPEND', prefix .. 'agelog', table.concat(entries)) > AGES_LOG_MAX then
    fold_ages(prefix)
  end
end
