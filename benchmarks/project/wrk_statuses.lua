-- wrk script for bench_project.py: logged-in requests, and responses counted by status.
--
-- Usage: wrk ... -s wrk_statuses.lua URL -- KEY1,KEY2,... [ORIGIN]
-- Each request carries the session cookie of one of the given session keys,
-- taken in turn (each thread starting at a different one), so requests load
-- different sessions and users, as a site's logged-in traffic does. wrk counts
-- only "Non-2xx or 3xx" in all; done() prints every status with its count on
-- one line, "BENCH_STATUSES {json}", for the harness to read. With ORIGIN, every
-- request also carries "Origin: ORIGIN" (a cross-origin call, as a front end's).

local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  prepared = {}
  local keys = args[1] or ""
  local origin = args[2] or ""
  for key in string.gmatch(keys, "[^,]+") do
    local headers = {}
    -- wrk.headers holds the Host header wrk built from the URL.
    for name, value in pairs(wrk.headers) do
      headers[name] = value
    end
    headers["Cookie"] = "sessionid=" .. key
    if origin ~= "" then
      headers["Origin"] = origin
    end
    table.insert(prepared, wrk.format("GET", wrk.path, headers))
  end
  if #prepared == 0 then
    table.insert(prepared, wrk.format("GET", wrk.path))
  end
  -- Threads start 31 keys apart, so they do not send the same cookie in step.
  counter = (id or 0) * 31
end

function request()
  counter = counter + 1
  return prepared[(counter % #prepared) + 1]
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses") or {}
    for status, n in pairs(counts) do
      total[status] = (total[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(total) do
    table.insert(parts, string.format('"%s": %d', status, n))
  end
  io.write("BENCH_STATUSES {" .. table.concat(parts, ", ") .. "}\n")
end
