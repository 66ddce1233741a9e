-- wrk script for scenario (c): POST a 1 KiB request body on every request.
--
--   wrk -t1 -c64 -d10s --latency -H 'Host: t1.example.com' -s post_1k.lua http://127.0.0.1:18080/
--
-- No request() function is defined, so wrk builds the request once (adding
-- Content-Length) and replays the same bytes: no per-request Lua cost.

wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
