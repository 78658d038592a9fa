-- Set an account field that must survive a rebuild (journaled). Only whitelisted fields:
-- low_threshold (micro-units), email (Google says the address changed; the account stays, found by sub).
-- KEYS[1] shard journal   ARGV: account_id, now_ms, field, value
-- Returns {'ok'} | {'no_account'} | {'bad_field'}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local acct, now, field, value = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
if field ~= 'low_threshold' and field ~= 'email' then return {'bad_field'} end
local a = k_account(PFX, acct)
if redis.call('HGET', a, 'status') ~= 'active' then return {'no_account'} end
redis.call('HSET', a, field, value)
journal(PFX, now, 't', 'account_set', 'account', acct, 'field', field, 'value', value)
check_low(PFX, acct, now)
return {'ok'}
