-- Close an account: revoke every key at once, drop the sub index, the email and the key that sealed
-- them in the journal (ledger/personal.py), forfeit what is left.
-- Metering and money records stay (without personal data) for accounting.
-- KEYS[1] shard journal   ARGV: account_id, now_ms
-- Returns {'ok', forfeited_micro, keys_revoked} | {'no_account'} | {'closed'}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local acct, now = ARGV[1], tonumber(ARGV[2])
local a = k_account(PFX, acct)
local status = redis.call('HGET', a, 'status')
if not status then return {'no_account'} end
if status == 'closed' then return {'closed'} end
local revoked = 0
local keys = redis.call('HGETALL', k_keys(PFX, acct))
for i = 1, #keys, 2 do
  local key_id, hash = keys[i], keys[i + 1]
  redis.call('DEL', PFX .. 'kh:' .. hash)
  redis.call('HSET', PFX .. 'k:' .. key_id, 'revoked_at', fmt(now))
  redis.call('HDEL', PFX .. 'k:' .. key_id, 'hash')
  journal(PFX, now, 't', 'key_revoked', 'account', acct, 'key_id', key_id)
  revoked = revoked + 1
end
redis.call('DEL', k_keys(PFX, acct))
local sub_hash = redis.call('HGET', a, 'sub_hash')
if sub_hash and sub_hash ~= '' then redis.call('DEL', PFX .. 'sub:' .. sub_hash) end
-- Remaining credit is forfeited; the dashboard offers refunds of refundable buckets before this.
local forfeited = 0
local ids = redis.call('ZRANGE', k_buckets(PFX, acct), 0, -1)
for _, bid in ipairs(ids) do
  local rem = num(redis.call('HGET', k_bucket(PFX, bid), 'remaining'))
  if rem > 0 then
    redis.call('HSET', k_bucket(PFX, bid), 'remaining', 0)
    redis.call('HINCRBY', a, 'forfeited', rem)
    journal(PFX, now, 't', 'forfeited', 'account', acct, 'bucket', bid, 'amount', fmt(rem))
    forfeited = forfeited + rem
  end
  redis.call('ZREM', PFX .. 'bexp', bid)
end
redis.call('HSET', a, 'status', 'closed', 'closed_at', fmt(now))
redis.call('HDEL', a, 'email', 'sub_hash', 'pii_key')  -- pii_key: the journal's sealed copies become unreadable
journal(PFX, now, 't', 'account_closed', 'account', acct)
return {'ok', fmt(forfeited), revoked}
