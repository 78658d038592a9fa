-- Revoke an API key: its hash stops resolving at once.
-- KEYS[1] shard journal   ARGV: key_id, now_ms
-- Returns {'ok', account_id} | {'unknown_key'}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local key_id, now = ARGV[1], tonumber(ARGV[2])
local k = PFX .. 'k:' .. key_id
local acct = redis.call('HGET', k, 'account')
local hash = redis.call('HGET', k, 'hash')
if not acct or not hash then return {'unknown_key'} end
redis.call('DEL', PFX .. 'kh:' .. hash)
redis.call('HDEL', k_keys(PFX, acct), key_id)
redis.call('HSET', k, 'revoked_at', fmt(now))
redis.call('HDEL', k, 'hash')
journal(PFX, now, 't', 'key_revoked', 'account', acct, 'key_id', key_id)
return {'ok', acct}
