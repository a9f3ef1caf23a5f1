-- The request mix: varied paths, referrers and client addresses (through the trusted loopback
-- proxy header), with a real browser's user agent, as text/plain like the tracker sends.
local paths = {"/", "/blog", "/blog/hello-world", "/about", "/pricing", "/docs/getting-started",
               "/docs/api", "/contact", "/blog/second-post", "/changelog"}
local referrers = {"", "", "", "https://www.google.com/", "https://news.ycombinator.com/item?id=1",
                   "https://duckduckgo.com/", "https://example.com/blog", "https://t.co/abc"}
local domains = {"example.com", "blog.example.org", "shop.example.net"}

wrk.method = "POST"
wrk.headers["Content-Type"] = "text/plain;charset=UTF-8"
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
wrk.headers["Origin"] = "https://example.com"

local think_ms = tonumber(os.getenv("BENCH_THINK_MS") or "0")

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  local ip = string.format("%d.%d.%d.%d", math.random(1, 223), math.random(0, 255),
                           math.random(0, 255), math.random(1, 254))
  wrk.headers["X-Forwarded-For"] = ip
  local body = string.format('{"pathname":"%s","referrer":"%s","domain":"%s"}',
                             paths[math.random(#paths)], referrers[math.random(#referrers)],
                             domains[math.random(#domains)])
  return wrk.format(nil, "/api/pageview", nil, body)
end

function delay()
  return think_ms
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format("BENCH requests=%d duration_us=%d non2xx=%d errors=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration, errors.status, errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
