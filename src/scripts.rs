//! The Lua scripts of cluster scope, each run atomically by Redis on one tenant's keys
//! (`bulkhead:{TENANT}:…`, one hash slot: they run unchanged on a Redis Cluster), by
//! [`crate::store::Store`]. Each one is idempotent: the sync per (instance, boot, seq),
//! the reserve per id (settled by the next sync when its answer came too late), the
//! reset per id; the usage read changes nothing.

/// KEYS: rate, members, day, month, generation, applied, held, reserved (this
///       instance's reserves, see [`RESERVE_LUA`]), epoch.
/// ARGV: instance, boot, seq, rate, burst, rate_return, rate_want,
///       day_limit, day_return, day_push, day_want, day_expire_at,
///       month_limit, month_return, month_push, month_want, month_expire_at,
///       generation, member_ttl_ms, rate_used, reserve_floor,
///       unsettled reserves ("id:admitted,…", admitted = 1 or 0),
///       rate_held, epoch (as of the last sync; 0 = none), known_day, known_month.
///
/// The rate part is a token bucket (`rate`: tokens, ts) whose tokens are leased out;
/// `held` counts, per instance, tokens leased and not yet reported used or given back.
/// The invariant `tokens + Σ held ≤ burst` bounds what the fleet can admit in any
/// window of length T by `burst + rate · (T + sync_interval)`, whatever the number of
/// instances. An instance that stops syncing for `member_ttl_ms` loses its holding
/// (its leases are no longer valid locally long before that).
pub(crate) const SYNC_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1] .. '/' .. ARGV[2]
local ttl = tonumber(ARGV[19])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
  redis.call('HDEL', KEYS[7], unpack(gone))
end
redis.call('ZADD', KEYS[2], now, member)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
local n = redis.call('ZCARD', KEYS[2])
local gen = tonumber(redis.call('GET', KEYS[5]) or '0')

-- The epoch: made when the tenant's keys are first written, and again after Redis
-- lost them (FLUSHALL, a restart without persistence). An instance that saw another
-- epoch at its last sync holds leases the new keys know nothing about: its holding
-- and its counts are taken over from what it reports (below).
local epoch = redis.call('GET', KEYS[9])
if not epoch then
  epoch = tostring(now)
  redis.call('SET', KEYS[9], epoch)
end
redis.call('EXPIRE', KEYS[9], 86400 * 32)
local lost = ARGV[24] ~= '0' and ARGV[24] ~= epoch
if lost and tonumber(ARGV[18]) > gen then
  gen = tonumber(ARGV[18])
  redis.call('SET', KEYS[5], gen)
  redis.call('EXPIRE', KEYS[5], 86400 * 400)
end

-- Each request is applied once per (instance, boot, seq): a reply lost to a timeout
-- is followed by the same request again, which gets the first answer back (grants
-- included) and changes nothing, so nothing is counted twice or leased into the void.
local seq = tonumber(ARGV[3])
local last = tonumber(redis.call('HGET', KEYS[6], member) or '0')
redis.call('EXPIRE', KEYS[6], 86400 * 32)
if seq <= last then
  local cached = redis.call('HGET', KEYS[6], member .. ':reply')
  if seq == last and cached then return cjson.decode(cached) end
  return {0, 0, 0, tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(redis.call('GET', KEYS[4]) or '0'), gen, n, tonumber(epoch)}
end
redis.call('HSET', KEYS[6], member, seq)

local rate = tonumber(ARGV[4])
local rate_grant = 0
if rate > 0 then
  local burst = tonumber(ARGV[5])
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  if now > ts then
    tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
    ts = now
  end
  local mine = tonumber(redis.call('HGET', KEYS[7], member) or '0')
  local held = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[7])) do held = held + tonumber(v) end
  held = held - mine
  local back = math.min(mine, tonumber(ARGV[6]))
  mine = math.max(0, mine - back - tonumber(ARGV[20]))
  if lost then
    -- What it holds now (after this request's returns and uses), counted as leased
    -- and unused: the new bucket makes room for it.
    back = 0
    mine = math.max(0, tonumber(ARGV[23]))
  end
  tokens = tokens + back
  tokens = math.max(0, math.min(tokens, burst - held - mine))
  local want = tonumber(ARGV[7])
  rate_grant = math.max(0, math.min(want, math.floor(tokens)))
  tokens = tokens - rate_grant
  mine = mine + rate_grant
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'ts', ts)
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 60000)
  redis.call('HSET', KEYS[7], member, mine)
  redis.call('PEXPIRE', KEYS[7], ttl * 2)
end

-- Reserves that timed out on this instance, settled now that Redis has applied them
-- or never will (RESERVE_LUA refuses an id at or below the floor). One applied and
-- admitted here anyway ("open") is in this request's push already: it is not counted
-- again. One applied while this instance refused its request ("closed", or the local
-- quota) is given back. Only in the generation and period the reserve counted in.
local settled = {[KEYS[3]] = {0, 0}, [KEYS[4]] = {0, 0}}
for rid, admitted in string.gmatch(ARGV[22], '(%d+):(%d)') do
  local rec = redis.call('ZRANGEBYSCORE', KEYS[8], rid, rid)
  if #rec > 0 then
    local rgen, rday, rmonth = string.match(rec[1], '^%d+|(%-?%d+)|([^|]*)|(.*)$')
    if tonumber(rgen) == gen then
      local i = (admitted == '1') and 1 or 2
      for _, k in ipairs({rday, rmonth}) do
        if settled[k] then settled[k][i] = settled[k][i] + 1 end
      end
    end
  end
end
local floor = tonumber(ARGV[21])
if floor > tonumber(redis.call('HGET', KEYS[6], member .. ':rfloor') or '0') then
  redis.call('HSET', KEYS[6], member .. ':rfloor', floor)
end
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', floor)

local function period(key, limit, give_back, push, want, expire_at, known)
  limit = tonumber(limit)
  local used = tonumber(redis.call('GET', key) or '0')
  if limit <= 0 then return 0, used end
  -- The count as this instance last knew it (its leases included, given back below).
  if lost then used = math.max(used, tonumber(known)) end
  if tonumber(ARGV[18]) == gen then
    push = math.max(0, tonumber(push) - settled[key][1])
    used = math.max(0, used - tonumber(give_back) + push)
  end
  used = math.max(0, used - settled[key][2])
  -- Lease at most a fair share of half of what is left: the rest stays for the
  -- other instances and for requests reserved one by one.
  local share = math.floor((limit - used) / (2 * math.max(n, 1)))
  local grant = math.max(0, math.min(tonumber(want), share))
  used = used + grant
  redis.call('SET', key, used)
  redis.call('EXPIREAT', key, expire_at)
  return grant, used
end
local dg, du = period(KEYS[3], ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[25])
local mg, mu = period(KEYS[4], ARGV[13], ARGV[14], ARGV[15], ARGV[16], ARGV[17], ARGV[26])
local reply = {rate_grant, dg, mg, du, mu, gen, n, tonumber(epoch)}
redis.call('HSET', KEYS[6], member .. ':reply', cjson.encode(reply))
return reply
"#;

/// KEYS: day, month, reserved, applied, generation.
/// ARGV: day_limit, day_expire_at, month_limit, month_expire_at, member, reserve id.
/// One unit of every configured period, or none: 0 ok, 1 day used up, 2 month used up,
/// 3 settled already (this id timed out, and a sync has since counted it as never
/// applied: it must not be applied now).
///
/// A reserve applied is recorded in `reserved` (a sorted set per instance and boot,
/// scored by reserve id, with the generation and the keys it counted in), so that a
/// reserve whose answer came too late is settled by the next sync (SYNC_LUA) rather
/// than counted twice ("open": admitted and pushed) or charged for a refused request
/// ("closed"). The sync prunes the records up to its floor: the set holds about the
/// reserves of one sync interval.
pub(crate) const RESERVE_LUA: &str = r#"
local rid = tonumber(ARGV[6])
if rid <= tonumber(redis.call('HGET', KEYS[4], ARGV[5] .. ':rfloor') or '0') then return 3 end
local dl, ml = tonumber(ARGV[1]), tonumber(ARGV[3])
if dl > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= dl then return 1 end
if ml > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= ml then return 2 end
if dl > 0 then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
end
if ml > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIREAT', KEYS[2], ARGV[4])
end
local gen = redis.call('GET', KEYS[5]) or '0'
redis.call('ZADD', KEYS[3], rid, rid .. '|' .. gen .. '|' .. (dl > 0 and KEYS[1] or '') .. '|' .. (ml > 0 and KEYS[2] or ''))
redis.call('EXPIRE', KEYS[3], 86400 * 2)
return 0
"#;

/// KEYS: day, month, generation, applied. ARGV: member, reset id.
/// A new generation: leases and pushes of the old one are not applied any more.
/// Returns {generation, 1 when this id had been applied already (nothing done now)}:
/// a reset whose answer was lost to `store_timeout` and is sent again by the operator
/// starts one generation, not two (a second would also forget what was admitted in
/// between).
pub(crate) const RESET_LUA: &str = r#"
local f = ARGV[1] .. ':reset'
local last = redis.call('HGET', KEYS[4], f)
if last then
  local id, g = string.match(last, '^(%d+):(%d+)$')
  if id == ARGV[2] then return {tonumber(g), 1} end
end
redis.call('DEL', KEYS[1], KEYS[2])
local g = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], 86400 * 400)
redis.call('HSET', KEYS[4], f, ARGV[2] .. ':' .. g)
redis.call('EXPIRE', KEYS[4], 86400 * 32)
return {g, 0}
"#;

/// KEYS: day, month.
pub(crate) const USAGE_LUA: &str = r#"
return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0')}
"#;
