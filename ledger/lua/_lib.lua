-- Shared helpers, prepended to every ledger script when it is loaded (Redis Lua has no require).
-- Every key a script touches is built from PFX, the shard's hash-tagged prefix ("cp:{s07}:"), so one
-- call only ever touches one hash slot: the layout is Redis-Cluster ready.
-- Money: integer micro-units. Lua numbers are doubles, exact below 2^53; amounts are capped well
-- below that by the Python side, and always formatted with %d (tostring would print 1e+14).
local function fmt(n) return string.format('%d', n) end
local function num(v) if v == false or v == nil then return 0 end return tonumber(v) end

local function k_account(pfx, acct) return pfx .. 'a:' .. acct end
local function k_buckets(pfx, acct) return pfx .. 'a:' .. acct .. ':bz' end
local function k_keys(pfx, acct) return pfx .. 'a:' .. acct .. ':keys' end
local function k_bucket(pfx, bid) return pfx .. 'b:' .. bid end
local function k_resv(pfx, req) return pfx .. 'r:' .. req end
local function k_done(pfx, req) return pfx .. 'rd:' .. req end
local function k_key_inflight(pfx, key_id) return pfx .. 'kr:' .. key_id end
local function k_journal(pfx) return pfx .. 'j' end

-- The shard's epoch marker, written when the ledger is created and again by each rebuild. Absent:
-- this Redis lost the shard's data (restarted empty, flushed, a cluster node replaced), so no script
-- may act on what is left or half-create records; the caller gets {'no_ledger'} (503, spooled).
local function whole(pfx) return redis.call('EXISTS', pfx .. 'epoch') == 1 end

local function journal(pfx, now, ...)
  return redis.call('XADD', k_journal(pfx), '*', 'ts', fmt(now), ...)
end

-- Draw `want` from the account's unexpired buckets, soonest expiry first (ties: the older bucket id,
-- which sorts first). Returns taken, draws (array of {bucket_id, amount}).
local function draw(pfx, acct, want, now)
  local taken = 0
  local draws = {}
  if want <= 0 then return 0, draws end
  -- '(' .. now: a bucket is unusable from its expiry instant.
  local ids = redis.call('ZRANGEBYSCORE', k_buckets(pfx, acct), '(' .. fmt(now), '+inf')
  for _, bid in ipairs(ids) do
    local rem = num(redis.call('HGET', k_bucket(pfx, bid), 'remaining'))
    if rem > 0 then
      local x = math.min(rem, want - taken)
      redis.call('HINCRBY', k_bucket(pfx, bid), 'remaining', -x)
      taken = taken + x
      draws[#draws + 1] = {bid, x}
      if taken >= want then break end
    end
  end
  return taken, draws
end

local function available(pfx, acct, now)
  local total = 0
  local ids = redis.call('ZRANGEBYSCORE', k_buckets(pfx, acct), '(' .. fmt(now), '+inf')
  for _, bid in ipairs(ids) do
    total = total + num(redis.call('HGET', k_bucket(pfx, bid), 'remaining'))
  end
  return total
end

-- Put `x` back into a bucket. A bucket that expired meanwhile forfeits it at once, so the expiry
-- sweep (which only visits each bucket once) never misses credit. So does a closed account's: the
-- closure forfeited everything and took its buckets out of the sweep.
local function give_back(pfx, acct, bid, x, now)
  if x <= 0 then return end
  local exp = num(redis.call('HGET', k_bucket(pfx, bid), 'expires_at'))
  if exp <= now or redis.call('HGET', k_account(pfx, acct), 'status') == 'closed' then
    redis.call('HINCRBY', k_account(pfx, acct), 'forfeited', x)
    journal(pfx, now, 't', 'forfeited', 'account', acct, 'bucket', bid, 'amount', fmt(x))
  else
    redis.call('HINCRBY', k_bucket(pfx, bid), 'remaining', x)
  end
end

local function encode_draws(draws)
  local parts = {}
  for i, d in ipairs(draws) do parts[i] = d[1] .. ':' .. fmt(d[2]) end
  return table.concat(parts, ',')
end

local function decode_draws(s)
  local draws = {}
  if s == false or s == nil or s == '' then return draws end
  for bid, amt in string.gmatch(s, '([^:,]+):(%d+)') do draws[#draws + 1] = {bid, tonumber(amt)} end
  return draws
end

-- Low-balance crossing: recorded once per crossing (armed again when the balance rises above it).
local function check_low(pfx, acct, now)
  local a = k_account(pfx, acct)
  local threshold = num(redis.call('HGET', a, 'low_threshold'))
  if threshold <= 0 then return end
  local avail = available(pfx, acct, now)
  local low = redis.call('HGET', a, 'low') == '1'
  if avail < threshold and not low then
    redis.call('HSET', a, 'low', '1')
    journal(pfx, now, 't', 'low_balance', 'account', acct, 'available', fmt(avail), 'threshold', fmt(threshold))
  elseif avail >= threshold and low then
    redis.call('HSET', a, 'low', '0')
  end
end
