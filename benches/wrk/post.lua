-- wrk script: unique events (no id repeats, across threads too), 997 references.
-- README, Memory:
-- wrk -t2 -c64 -d20s -s benches/wrk/post.lua "http://127.0.0.1:8080/webhooks/cellosign?token=TOKEN"

-- In the main state: numbers the threads.
local threads = 0
function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

-- In each thread's state: `thread_id` is the global set above.
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  local n = thread_id * 100000000 + counter
  local body = string.format('{"event":{"type":"WHEF_SESSION_CREATED","timestamp":"2025-01-26T08:49:33.000001"},"session":{"id":"s-%d","reference":"ref-%d","process_id":"p-1","process_number":51,"transaction_number":%d,"recipient":{"id":1,"name":"client"},"labels":{"CUSTOMER_TAG":"CUSTOMER_VALUE"}}}', n, n % 997, n)
  return wrk.format(nil, nil, nil, body)
end
