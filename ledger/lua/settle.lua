-- Turn a reservation into the actual charge and write the request's metering row (journaled).
-- Surplus goes back to the buckets it came from (latest drawn first, so the charge stays on the
-- soonest-expiring ones); an overrun draws from the next buckets. What cannot be drawn is the
-- shortfall: the balance never goes below zero.
-- A reservation already released (by the stale sweep) or lost is settled from the buckets directly.
-- KEYS[1] shard journal
-- ARGV: request_id, account_id, charge, now_ms, metering (opaque JSON of ids and counts, no content),
--       done_ttl_s (how long the outcome answers a retry; LEDGER_DONE_TTL_S)
-- Returns {'ok', charged, shortfall, draws} | {'exists', charged, shortfall, draws}
local PFX = string.sub(KEYS[1], 1, -2)
if not whole(PFX) then return {'no_ledger'} end
local req, acct, charge, now, metering = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local done_ttl = tonumber(ARGV[6]) or 604800
local done_key = k_done(PFX, req)
local done = redis.call('HGETALL', done_key)
if done[1] then
  local d = {}
  for i = 1, #done, 2 do d[done[i]] = done[i + 1] end
  if d.outcome == 'settled' then return {'exists', d.charged, d.shortfall, d.draws} end
end
local r = k_resv(PFX, req)
local held = num(redis.call('HGET', r, 'held'))
local key_id = redis.call('HGET', r, 'key_id') or ''
local draws = decode_draws(redis.call('HGET', r, 'draws'))
local a = k_account(PFX, acct)
local shortfall = 0
if charge <= held then
  local surplus = held - charge
  for i = #draws, 1, -1 do
    if surplus <= 0 then break end
    local x = math.min(surplus, draws[i][2])
    give_back(PFX, acct, draws[i][1], x, now)
    draws[i][2] = draws[i][2] - x
    surplus = surplus - x
  end
else
  local taken, extra = draw(PFX, acct, charge - held, now)
  for _, d in ipairs(extra) do
    local merged = false
    for _, e in ipairs(draws) do
      if e[1] == d[1] then e[2] = e[2] + d[2]; merged = true; break end
    end
    if not merged then draws[#draws + 1] = d end
  end
  shortfall = charge - held - taken
end
local final = {}
for _, d in ipairs(draws) do if d[2] > 0 then final[#final + 1] = d end end
local enc = encode_draws(final)
local charged = charge - shortfall
-- fmt: Lua's -0 reaches Redis as "-0", which HINCRBY refuses (late settle holds 0).
redis.call('HINCRBY', a, 'reserved', fmt(-held))
redis.call('HINCRBY', a, 'consumed', charged)
redis.call('DEL', r)
redis.call('ZREM', PFX .. 'rz', req)
if key_id ~= '' then
  redis.call('SREM', k_key_inflight(PFX, key_id), req)
  if redis.call('EXISTS', PFX .. 'k:' .. key_id) == 1 then
    redis.call('HSET', PFX .. 'k:' .. key_id, 'last_used_at', fmt(now))
  end
end
redis.call('DEL', done_key)
redis.call('HSET', done_key, 'outcome', 'settled', 'charged', fmt(charged), 'shortfall', fmt(shortfall), 'draws', enc)
redis.call('EXPIRE', done_key, done_ttl)
journal(PFX, now, 't', 'settled', 'account', acct, 'req', req, 'held', fmt(held), 'charged', fmt(charged),
  'shortfall', fmt(shortfall), 'draws', enc, 'metering', metering)
check_low(PFX, acct, now)
return {'ok', fmt(charged), fmt(shortfall), enc}
