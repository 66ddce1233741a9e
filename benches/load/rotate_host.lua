-- wrk script for scenario (b): spread the load over many tenants by rotating
-- the Host header across t1.example.com .. tN.example.com (N = first script
-- argument, default 1000):
--
--   wrk -t1 -c64 -d10s --latency -s rotate_host.lua http://127.0.0.1:18080/ -- 1000
--
-- Every request is formatted once in init(); request() only picks the next one,
-- so the Lua cost per request is a table lookup and the load generator stays as
-- cheap as possible (it shares a core with the backend).

local reqs = {}
local n = 0
local i = 0

function init(args)
  n = tonumber(args[1]) or 1000
  for k = 1, n do
    -- wrk.format(method, path, headers, body): the headers table replaces
    -- wrk.headers (and so any -H 'Host: ...' given on the command line).
    reqs[k] = wrk.format("GET", "/", { ["Host"] = "t" .. k .. ".example.com" })
  end
  -- Start each thread at a different offset so threads do not march in step.
  i = math.random(0, n - 1)
end

function request()
  i = i % n + 1
  return reqs[i]
end
