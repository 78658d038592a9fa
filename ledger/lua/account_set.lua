-- Set an account field that must survive a rebuild (journaled). Only whitelisted fields:
-- low_threshold (micro-units), email (Google says the address changed; the account stays, found by sub).
-- KEYS[1] shard journal   ARGV: account_id, now_ms, field, value, sealed value, pii_key that sealed it
-- The email is journaled only sealed with the account's pii_key (ledger/personal.py). An account made
-- before pii_key existed gets the caller's; a caller that sealed with another key is told to retry.
-- Returns {'ok'} | {'no_account'} | {'bad_field'} | {'stale_key'}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local acct, now, field, value, sealed, pii_key = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if field ~= 'low_threshold' and field ~= 'email' then return {'bad_field'} end
local a = k_account(PFX, acct)
if redis.call('HGET', a, 'status') ~= 'active' then return {'no_account'} end
if field == 'email' then
  local stored = redis.call('HGET', a, 'pii_key')
  if not stored then
    redis.call('HSET', a, 'pii_key', pii_key)
  elseif stored ~= pii_key then
    return {'stale_key'}
  end
  redis.call('HSET', a, 'email', value)
  journal(PFX, now, 't', 'account_set', 'account', acct, 'field', field, 'sealed', sealed)
else
  redis.call('HSET', a, field, value)
  journal(PFX, now, 't', 'account_set', 'account', acct, 'field', field, 'value', value)
end
check_low(PFX, acct, now)
return {'ok'}
