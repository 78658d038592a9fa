-- Hold credit for a request, drawn from the soonest-expiring unexpired buckets.
-- The per-key concurrency limit is the number of open reservations of the key (no counter to drift).
-- KEYS[1] shard journal
-- ARGV: request_id, account_id, key_id, amount, min_amount, now_ms, deadline_ms, concurrency_limit (0 = none),
--       key_hash ('' = not checked)
-- min_amount == amount: all or nothing. min_amount < amount: hold what is available, at least min.
-- With key_hash, the key must still be live, checked in the same atomic call: the gateway may then
-- resolve key -> account from a local cache and still have "revoke stops it at once".
-- Returns {'ok', held} | {'exists', held} | {'done'} | {'short', available} | {'busy', open}
--       | {'no_account'} | {'closed'} | {'revoked'}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local req, acct, key_id, amount, min_amount, now, deadline, limit =
  ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local key_hash = ARGV[9] or ''
if key_hash ~= '' and redis.call('HGET', PFX .. 'kh:' .. key_hash, 'key_id') ~= key_id then
  return {'revoked'}
end
local r = k_resv(PFX, req)
local held = redis.call('HGET', r, 'held')
if held then return {'exists', held} end
if redis.call('EXISTS', k_done(PFX, req)) == 1 then return {'done'} end
local status = redis.call('HGET', k_account(PFX, acct), 'status')
if not status then return {'no_account'} end
if status ~= 'active' then return {'closed'} end
if limit > 0 and key_id ~= '' then
  local open = redis.call('SCARD', k_key_inflight(PFX, key_id))
  if open >= limit then return {'busy', open} end
end
local avail = available(PFX, acct, now)
if avail < min_amount then return {'short', fmt(avail)} end
local taken, draws = draw(PFX, acct, math.min(amount, avail), now)
local enc = encode_draws(draws)
redis.call('HSET', r, 'account', acct, 'key_id', key_id, 'held', fmt(taken), 'draws', enc,
  'created_at', fmt(now))
redis.call('ZADD', PFX .. 'rz', deadline, req)
if key_id ~= '' then redis.call('SADD', k_key_inflight(PFX, key_id), req) end
redis.call('HINCRBY', k_account(PFX, acct), 'reserved', taken)
journal(PFX, now, 't', 'reserved', 'account', acct, 'req', req, 'key_id', key_id, 'held', fmt(taken),
  'draws', enc, 'deadline', fmt(deadline))
return {'ok', fmt(taken)}
