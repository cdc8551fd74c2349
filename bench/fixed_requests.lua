-- wrk runs for a duration; the benchmark wants a fixed number of requests per case.
-- `wrk -t1 -c C -d LIMIT -s fixed_requests.lua URL -- REQUESTS BODY_FILE CONTENT_TYPE`
-- POSTs the body; after REQUESTS responses it stops and interrupts itself (SIGINT), which
-- makes wrk report at once, with the run's real duration. One thread, so the count is exact.
local ffi = require("ffi")
ffi.cdef("int kill(int pid, int sig); int getpid(void);")

local remaining, prepared

function init(args)
  remaining = tonumber(args[1])
  local file = assert(io.open(args[2], "rb"))
  local body = file:read("*a")
  file:close()
  prepared = wrk.format("POST", nil, {["Content-Type"] = args[3]}, body)
end

function request()
  return prepared
end

function response(status, headers, body)
  remaining = remaining - 1
  if remaining == 0 then
    wrk.thread:stop()
    ffi.C.kill(ffi.C.getpid(), 2)
  end
end

-- Latencies are in microseconds; `status` counts answers with an HTTP status above 399.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
