-- Many deployments, few of them busy: each request goes to one of N prediction URLs, the one
-- of rank k with probability proportional to 1 / k^S (Zipf), as traffic to a host's models is.
-- `wrk -t1 -c C -d LIMIT -s zipf_requests.lua BASE_URL -- REQUESTS PATHS_FILE BODY_FILE S`
-- PATHS_FILE: one URL path per line, most popular first. Stops after REQUESTS answers, as
-- fixed_requests.lua does, and reports the same RESULT line.
local ffi = require("ffi")
ffi.cdef("int kill(int pid, int sig); int getpid(void);")

local remaining, prepared, cumulative

function init(args)
  remaining = tonumber(args[1])
  local file = assert(io.open(args[3], "rb"))
  local body = file:read("*a")
  file:close()
  local s = tonumber(args[4])
  prepared, cumulative = {}, {}
  local total = 0
  local k = 0
  for path in io.lines(args[2]) do
    k = k + 1
    total = total + 1 / (k ^ s)
    cumulative[k] = total
    prepared[k] = wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
  end
  for i = 1, k do cumulative[i] = cumulative[i] / total end
  math.randomseed(20261127)
end

function request()
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

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
