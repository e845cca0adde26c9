-- wrk script for `make bench-http`: POSTs the JSON body in the file named by WRK_BODY (with the
-- Prefer header in WRK_PREFER, when set), or GETs when WRK_BODY is unset, and prints how many answers
-- of each status came back ("status 200 51234"), so a run that was refused or timed out shows it.
--   WRK_BODY=body.json WRK_PREFER=respond-async wrk -t2 -c32 -d10s --latency -s bench/wrk_post.lua URL

local body_file = os.getenv("WRK_BODY")
if body_file and body_file ~= "" then
  local f = assert(io.open(body_file, "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end
local prefer = os.getenv("WRK_PREFER")
if prefer and prefer ~= "" then
  wrk.headers["Prefer"] = prefer
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(_args)
  statuses = {}
end

function response(status, _headers, _body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(_summary, _latency, _requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
  end
  for status, count in pairs(total) do
    io.write(string.format("status %d %d\n", status, count))
  end
end
