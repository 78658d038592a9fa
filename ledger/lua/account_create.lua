-- Create an account (idempotent on its Google sub).
-- KEYS[1] shard journal   ARGV: account_id, email, sub, sub_hash ('' when none), now_ms, low_threshold
-- Returns {'ok', account_id} or {'exists', account_id}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local acct, email, sub, sub_hash, now, low = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
if sub_hash ~= '' then
  local existing = redis.call('GET', PFX .. 'sub:' .. sub_hash)
  if existing then return {'exists', existing} end
end
if redis.call('EXISTS', k_account(PFX, acct)) == 1 then return {'exists', acct} end
redis.call('HSET', k_account(PFX, acct), 'status', 'active', 'email', email, 'sub_hash', sub_hash,
  'created_at', fmt(now), 'credited', 0, 'reserved', 0, 'consumed', 0, 'refunded', 0, 'forfeited', 0,
  'low_threshold', low, 'low', '0')
if sub_hash ~= '' then redis.call('SET', PFX .. 'sub:' .. sub_hash, acct) end
redis.call('SADD', PFX .. 'accounts', acct)
journal(PFX, now, 't', 'account_created', 'account', acct, 'email', email, 'sub', sub, 'low_threshold', low)
return {'ok', acct}
