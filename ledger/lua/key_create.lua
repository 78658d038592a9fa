-- Store a new API key's hash (the key itself never reaches Redis). At most ARGV[6] live keys.
-- KEYS[1] shard journal   ARGV: account_id, key_id, key_hash, prefix, now_ms, max_keys, replaces_key_id ('' for none)
-- With replaces_key_id the old key is revoked in the same call (renew = rotate atomically).
-- A key id that exists already is a retry (ids derived from an operator's reference): {'exists', prefix}.
-- Returns {'ok'} | {'exists', prefix} | {'no_account'} | {'limit'} | {'unknown_key'}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local acct, key_id, hash, prefix, now, max_keys, old = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local existing = redis.call('HGET', PFX .. 'k:' .. key_id, 'account')
if existing then
  if existing ~= acct then return {'unknown_key'} end
  return {'exists', redis.call('HGET', PFX .. 'k:' .. key_id, 'prefix') or ''}
end
if redis.call('HGET', k_account(PFX, acct), 'status') ~= 'active' then return {'no_account'} end
-- The same call again (a client retry after a lost reply, e.g. across a failover): already done.
if redis.call('HGET', PFX .. 'k:' .. key_id, 'account') == acct then return {'ok'} end
if old ~= '' then
  local old_hash = redis.call('HGET', k_keys(PFX, acct), old)
  if not old_hash then return {'unknown_key'} end
  redis.call('DEL', PFX .. 'kh:' .. old_hash)
  redis.call('HDEL', k_keys(PFX, acct), old)
  redis.call('HSET', PFX .. 'k:' .. old, 'revoked_at', fmt(now))
  redis.call('HDEL', PFX .. 'k:' .. old, 'hash')
  journal(PFX, now, 't', 'key_revoked', 'account', acct, 'key_id', old)
elseif redis.call('HLEN', k_keys(PFX, acct)) >= max_keys then
  return {'limit'}
end
redis.call('HSET', PFX .. 'k:' .. key_id, 'account', acct, 'hash', hash, 'prefix', prefix, 'created_at', fmt(now))
redis.call('HSET', PFX .. 'kh:' .. hash, 'account', acct, 'key_id', key_id)
redis.call('HSET', k_keys(PFX, acct), key_id, hash)
journal(PFX, now, 't', 'key_created', 'account', acct, 'key_id', key_id, 'hash', hash, 'prefix', prefix)
return {'ok'}
