-- Abandon a reservation: every micro-unit goes back to the bucket it came from.
-- KEYS[1] shard journal   ARGV: request_id, account_id, now_ms, reason, done_ttl_s
-- Returns {'ok', held} | {'exists'} (already settled or released) | {'unknown'}
-- An unknown request is left finished: a release that overtook its own reserve (a client that
-- left while the reserve was on its way, on another connection) makes that reserve hold nothing.
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local req, acct, now, reason = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local done_ttl = tonumber(ARGV[5]) or 604800
local r = k_resv(PFX, req)
local held = redis.call('HGET', r, 'held')
if not held then
  local done_key = k_done(PFX, req)
  if redis.call('EXISTS', done_key) == 1 then return {'exists'} end
  redis.call('HSET', done_key, 'outcome', 'released')
  redis.call('EXPIRE', done_key, done_ttl)
  return {'unknown'}
end
held = tonumber(held)
acct = redis.call('HGET', r, 'account')
local key_id = redis.call('HGET', r, 'key_id') or ''
local draws = decode_draws(redis.call('HGET', r, 'draws'))
for i = #draws, 1, -1 do give_back(PFX, acct, draws[i][1], draws[i][2], now) end
-- fmt: Lua's -0 reaches Redis as "-0", which HINCRBY refuses (a partial reserve may hold 0).
redis.call('HINCRBY', k_account(PFX, acct), 'reserved', fmt(-held))
redis.call('DEL', r)
redis.call('ZREM', PFX .. 'rz', req)
if key_id ~= '' then redis.call('SREM', k_key_inflight(PFX, key_id), req) end
local done_key = k_done(PFX, req)
redis.call('HSET', done_key, 'outcome', 'released')
redis.call('EXPIRE', done_key, done_ttl)
journal(PFX, now, 't', 'released', 'account', acct, 'req', req, 'held', fmt(held), 'reason', reason)
check_low(PFX, acct, now)
return {'ok', fmt(held)}
