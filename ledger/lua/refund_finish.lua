-- Conclude a refund taken by refund.lua: 'confirmed' (the provider paid it out) or 'reverted' (the
-- provider refused: the credit goes back to its bucket, forfeited at once if it expired meanwhile).
-- KEYS[1] shard journal   ARGV: refund_id, now_ms, outcome ('confirmed'|'reverted'), external_ref
-- Returns {'ok'} | {'exists', status} | {'unknown'}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local rid, now, outcome, ext = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local rf = PFX .. 'rf:' .. rid
local st = redis.call('HGET', rf, 'status')
if not st then return {'unknown'} end
if st ~= 'taken' then return {'exists', st} end
local acct = redis.call('HGET', rf, 'account')
local bid = redis.call('HGET', rf, 'bucket')
local amount = num(redis.call('HGET', rf, 'amount'))
if outcome == 'reverted' then
  redis.call('HINCRBY', k_account(PFX, acct), 'refunded', -amount)
  give_back(PFX, acct, bid, amount, now)
end
redis.call('HSET', rf, 'status', outcome)
journal(PFX, now, 't', 'refund_' .. outcome, 'account', acct, 'bucket', bid, 'refund_id', rid,
  'amount', fmt(amount), 'external_ref', ext)
check_low(PFX, acct, now)
return {'ok'}
