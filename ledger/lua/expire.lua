-- Forfeit the remaining credit of buckets whose expiry instant has passed (at most ARGV[2] of them).
-- KEYS[1] shard journal   ARGV: now_ms, limit
-- Returns {buckets_visited, forfeited_micro}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', PFX .. 'bexp', '-inf', fmt(now), 'LIMIT', 0, limit)
local total = 0
for _, bid in ipairs(ids) do
  local b = k_bucket(PFX, bid)
  local rem = num(redis.call('HGET', b, 'remaining'))
  if rem > 0 then
    local acct = redis.call('HGET', b, 'account')
    redis.call('HSET', b, 'remaining', 0)
    redis.call('HINCRBY', k_account(PFX, acct), 'forfeited', rem)
    journal(PFX, now, 't', 'forfeited', 'account', acct, 'bucket', bid, 'amount', fmt(rem))
    total = total + rem
    check_low(PFX, acct, now)  -- expiry alone can take a balance below its alert threshold
  end
  redis.call('ZREM', PFX .. 'bexp', bid)
end
return {#ids, fmt(total)}
