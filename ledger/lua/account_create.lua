-- Create an account (idempotent on its Google sub).
-- KEYS[1] shard journal
-- ARGV: account_id, email, sub_hash ('' when none), now_ms, low_threshold, pii_key, email_sealed, sub_sealed
-- The journal carries the email and sub only sealed with pii_key (ledger/personal.py), which closing
-- the account deletes; the sub itself is never stored in Redis, only its hash as the index.
-- Returns {'ok', account_id} or {'exists', account_id}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local acct, email, sub_hash, now, low = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local pii_key, email_sealed, sub_sealed = ARGV[6], ARGV[7], ARGV[8]
if sub_hash ~= '' then
  local existing = redis.call('GET', PFX .. 'sub:' .. sub_hash)
  if existing then return {'exists', existing} end
end
if redis.call('EXISTS', k_account(PFX, acct)) == 1 then return {'exists', acct} end
redis.call('HSET', k_account(PFX, acct), 'status', 'active', 'email', email, 'sub_hash', sub_hash,
  'created_at', fmt(now), 'credited', 0, 'reserved', 0, 'consumed', 0, 'refunded', 0, 'forfeited', 0,
  'low_threshold', low, 'low', '0', 'pii_key', pii_key)
if sub_hash ~= '' then redis.call('SET', PFX .. 'sub:' .. sub_hash, acct) end
redis.call('SADD', PFX .. 'accounts', acct)
journal(PFX, now, 't', 'account_created', 'account', acct, 'email_sealed', email_sealed,
  'sub_sealed', sub_sealed, 'low_threshold', low)
return {'ok', acct}
