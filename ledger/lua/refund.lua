-- Take unused credit out of one unexpired bucket for a refund, before the payment provider is asked,
-- so it cannot be spent meanwhile. Idempotent on refund_id.
-- KEYS[1] shard journal   ARGV: refund_id, account_id, bucket_id, amount (0 = all remaining), now_ms
-- Returns {'ok', amount} | {'exists', status, amount} | {'no_bucket'} | {'expired'} | {'insufficient', remaining}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local rid, acct, bid, amount, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local rf = PFX .. 'rf:' .. rid
local st = redis.call('HGET', rf, 'status')
if st then return {'exists', st, redis.call('HGET', rf, 'amount')} end
local b = k_bucket(PFX, bid)
if redis.call('HGET', b, 'account') ~= acct then return {'no_bucket'} end
if num(redis.call('HGET', b, 'expires_at')) <= now then return {'expired'} end
local rem = num(redis.call('HGET', b, 'remaining'))
if amount == 0 then amount = rem end
if amount <= 0 or amount > rem then return {'insufficient', fmt(rem)} end
redis.call('HINCRBY', b, 'remaining', -amount)
redis.call('HINCRBY', k_account(PFX, acct), 'refunded', amount)
redis.call('HSET', rf, 'status', 'taken', 'amount', fmt(amount), 'bucket', bid, 'account', acct)
journal(PFX, now, 't', 'refunded', 'account', acct, 'bucket', bid, 'refund_id', rid, 'amount', fmt(amount))
check_low(PFX, acct, now)
return {'ok', fmt(amount)}
