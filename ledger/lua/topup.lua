-- Top-up records (an Omise charge on its way to becoming a bucket): create one, or move its status.
-- Only ids, amounts, currency, status, Omise's failure reason and timestamps: never card details.
-- KEYS[1] shard journal
-- ARGV: op, topup_id, now_ms, then
--   op 'create': account_id, amount_micro, amount_minor, currency, method
--     Returns {'ok'} | {'exists'} | {'no_account'} | {'closed'}
--   op 'update': status, charge_id, failure_code, failure_message, bucket_id
--     Returns {'ok', status} (changed) | {'same', status} (nothing to change) | {'unknown'}
--             | {'mismatch', charge_id} (the top-up is tied to another charge)
-- Status moves only forward: pending -> successful | failed | expired; failed or expired ->
-- successful (Omise can settle a charge we had given up on); successful is final. A 'pending'
-- update only ties the charge id to the top-up.
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local op, tid, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = PFX .. 't:' .. tid

if op == 'create' then
  local acct, amount, minor, currency, method = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
  if redis.call('EXISTS', t) == 1 then return {'exists'} end
  local status = redis.call('HGET', k_account(PFX, acct), 'status')
  if not status then return {'no_account'} end
  if status ~= 'active' then return {'closed'} end
  redis.call('HSET', t, 'account', acct, 'amount', amount, 'minor', minor, 'currency', currency,
    'method', method, 'status', 'pending', 'charge', '', 'failure_code', '', 'failure_message', '',
    'bucket', '', 'created_at', fmt(now), 'updated_at', fmt(now))
  redis.call('ZADD', PFX .. 'tp', now, tid)
  redis.call('ZADD', k_account(PFX, acct) .. ':tops', now, tid)
  journal(PFX, now, 't', 'topup_created', 'account', acct, 'topup', tid, 'amount', amount,
    'minor', minor, 'currency', currency, 'method', method)
  return {'ok'}
end

if op ~= 'update' then return redis.error_reply('unknown topup op') end
local status, charge, code, message, bid = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local h = redis.call('HMGET', t, 'account', 'status', 'charge')
local acct, current, stored = h[1], h[2], h[3]
if not acct then return {'unknown'} end
if charge ~= '' and stored ~= '' and stored ~= charge then return {'mismatch', stored} end

local new = current
if status == 'successful' and current ~= 'successful' then
  new = 'successful'
elseif (status == 'failed' or status == 'expired') and current == 'pending' then
  new = status
end
local tie = charge ~= '' and stored == '' and current ~= 'successful'
if new == current and not tie then return {'same', current} end

redis.call('HSET', t, 'updated_at', fmt(now))
if tie then redis.call('HSET', t, 'charge', charge) end
if new ~= current then
  redis.call('HSET', t, 'status', new)
  if new == 'successful' then
    redis.call('HSET', t, 'bucket', bid, 'failure_code', '', 'failure_message', '')
  else
    redis.call('HSET', t, 'failure_code', code, 'failure_message', message)
  end
  redis.call('ZREM', PFX .. 'tp', tid)
end
local f = redis.call('HMGET', t, 'charge', 'failure_code', 'failure_message', 'bucket')
journal(PFX, now, 't', 'topup_updated', 'account', acct, 'topup', tid, 'status', new, 'charge', f[1],
  'failure_code', f[2], 'failure_message', f[3], 'bucket', f[4])
return {'ok', new}
