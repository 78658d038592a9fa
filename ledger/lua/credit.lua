-- Credit a new bucket (top-up, grant, trial). Idempotent on the caller's reference.
-- KEYS[1] shard journal
-- ARGV: account_id, bucket_id, reference, amount, expires_at_ms, source, now_ms
-- Returns {'ok', bucket_id} | {'exists', bucket_id} | {'no_account'} | {'closed'}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local acct, bid, ref, amount, expires, source, now =
  ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local ref_key = PFX .. 'ref:' .. ref
local existing = redis.call('GET', ref_key)
if existing then return {'exists', existing} end
local status = redis.call('HGET', k_account(PFX, acct), 'status')
if not status then return {'no_account'} end
if status ~= 'active' then return {'closed'} end
redis.call('HSET', k_bucket(PFX, bid), 'account', acct, 'amount', fmt(amount), 'remaining', fmt(amount),
  'expires_at', fmt(expires), 'source', source, 'ref', ref, 'created_at', fmt(now))
redis.call('ZADD', k_buckets(PFX, acct), expires, bid)
redis.call('ZADD', PFX .. 'bexp', expires, bid)
redis.call('HINCRBY', k_account(PFX, acct), 'credited', amount)
redis.call('SET', ref_key, bid)
journal(PFX, now, 't', 'credited', 'account', acct, 'bucket', bid, 'amount', fmt(amount),
  'expires_at', fmt(expires), 'source', source, 'ref', ref)
check_low(PFX, acct, now)
return {'ok', bid}
