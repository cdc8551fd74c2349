-- wrk runs for a duration; the benchmark wants a fixed number of requests per case.
-- `wrk -t1 -c C -d LIMIT -s fixed_requests.lua URL -- REQUESTS BODY_FILE CONTENT_TYPE [PATHS_FILE S]`
-- POSTs the body; after REQUESTS responses it stops and interrupts itself (SIGINT), which
-- makes wrk report at once, with the run's real duration. One thread, so the count is exact.
-- With PATHS_FILE (one URL path per line, most popular first) each request goes to one of them,
-- the one of rank k with probability proportional to 1 / k^S (Zipf): many deployments, few busy.
local ffi = require("ffi")
ffi.cdef("int kill(int pid, int sig); int getpid(void);")

local remaining, prepared, cumulative

function init(args)
  remaining = tonumber(args[1])
  local file = assert(io.open(args[2], "rb"))
  local body = file:read("*a")
  file:close()
  local headers = {["Content-Type"] = args[3]}
  if args[4] == nil then
    prepared = {wrk.format("POST", nil, headers, body)}
    cumulative = {1}
    return
  end
  local s = tonumber(args[5])
  prepared, cumulative = {}, {}
  local total, k = 0, 0
  for path in io.lines(args[4]) do
    k = k + 1
    total = total + 1 / (k ^ s)
    cumulative[k] = total
    prepared[k] = wrk.format("POST", path, headers, body)
  end
  for i = 1, k do cumulative[i] = cumulative[i] / total end
  math.randomseed(20261127)
end

function request()
  if #prepared == 1 then
    return prepared[1]
  end
  local u = math.random()
  local low, high = 1, #cumulative
  while low < high do
    local middle = math.floor((low + high) / 2)
    if cumulative[middle] < u then low = middle + 1 else high = middle end
  end
  return prepared[low]
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
