-- wrk script for scenario (f): scenario (a) at one offered load for every proxy.
--
--   PACE_MS=1 wrk -t1 -c64 -d10s --latency -H 'Host: t1.example.com' -s pace.lua http://127.0.0.1:18080/
--
-- Each connection waits PACE_MS milliseconds (default 1; wrk's timers count whole
-- milliseconds) after each response before it sends its next request, so 64
-- connections offer about 64 / (PACE_MS + latency) requests per millisecond: well
-- under every proxy's ceiling, where the load generator's core is not saturated and
-- a tail is the proxy's, not the queue behind the slowest or fastest one. wrk
-- measures each latency from the request's own write, after the wait.
-- No request() function: wrk replays the same request bytes.

local pace = tonumber(os.getenv("PACE_MS") or "") or 1

function delay()
  return pace
end
