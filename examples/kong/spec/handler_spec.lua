-- Tests of handler.lua, the Kong glue, against stand-ins for the Kong PDK,
-- ngx, lua-resty-http and lua-cjson: what it sends to sluice, how it uses
-- the connection pool and the time budget, and what the client gets back.
local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
package.path = here .. "../?.lua;" .. here .. "?.lua;" .. package.path

local json = require "support.json"

-- Stand-ins ------------------------------------------------------------------

local clock_ms       -- the fake ngx clock
local sluice         -- what the fake sluice does: { status, body } or { err_at = "connect"|... }
local calls          -- everything the handler did to the HTTP client
local exited         -- kong.response.exit's arguments
local set_headers    -- kong.response.set_headers' argument
local logged         -- kong.log lines
local request        -- what the fake Kong PDK reports about the request

local fake_http = {}
function fake_http.new()
  local c = {}
  function c:parse_uri(uri)
    local scheme, host, port, path = uri:match("^(https?)://([^:/]+):?(%d*)(.*)$")
    if not scheme then return nil, "bad uri" end
    port = tonumber(port) or (scheme == "https" and 443 or 80)
    return { scheme, host, port, path ~= "" and path or "/", "" }
  end
  function c:set_timeout(ms) calls[#calls + 1] = { "set_timeout", ms } end
  function c:connect(opts)
    calls[#calls + 1] = { "connect", opts }
    clock_ms = clock_ms + (sluice.connect_ms or 0)
    if sluice.err_at == "connect" then return nil, "connection refused" end
    return true
  end
  function c:request(params)
    calls[#calls + 1] = { "request", params }
    clock_ms = clock_ms + (sluice.request_ms or 0)
    if sluice.err_at == "request" then return nil, "timeout" end
    return {
      status = sluice.status,
      read_body = function()
        calls[#calls + 1] = { "read_body" }
        if sluice.err_at == "read" then return nil, "timeout" end
        return sluice.body
      end,
    }
  end
  function c:set_keepalive(timeout, size) calls[#calls + 1] = { "set_keepalive", timeout, size } end
  function c:close() calls[#calls + 1] = { "close" } end
  return c
end

local function install_stubs()
  clock_ms, calls, exited, set_headers, logged = 1000000, {}, nil, nil, {}
  request = { headers = {}, ip = "203.0.113.7" }
  sluice = {
    status = 200,
    body = [[{"overallCode":"OK","statuses":[{"code":"OK","currentLimit":{"requestsPerUnit":60,"unit":"MINUTE"},"limitRemaining":59,"durationUntilReset":"42s"}]}]],
  }
  _G.ngx = {
    update_time = function() end,
    now = function() return clock_ms / 1000 end,
  }
  local plugin_ctx = {}
  _G.kong = {
    request = { get_header = function(name) return request.headers[name] end },
    client = {
      get_forwarded_ip = function() return request.ip end,
      get_consumer = function() return request.consumer end,
      get_credential = function() return request.credential end,
    },
    router = {
      get_route = function() return request.route end,
      get_service = function() return request.service end,
    },
    response = {
      exit = function(status, body, headers)
        exited = { status = status, body = body, headers = headers }
        return "exited"
      end,
      set_headers = function(h) set_headers = h end,
    },
    log = {
      warn = function(...) logged[#logged + 1] = { "warn", table.concat({ ... }) } end,
      err = function(...) logged[#logged + 1] = { "err", table.concat({ ... }) } end,
    },
    ctx = { plugin = plugin_ctx },
  }
  package.loaded["resty.http"] = fake_http
  package.loaded["cjson.safe"] = json
  package.loaded["kong.plugins.sluice-ratelimit.handler"] = nil
  return require "kong.plugins.sluice-ratelimit.handler"
end

local function conf(overrides)
  local c = {
    url = "http://sluice.sluice.svc.cluster.local:8080/json",
    domain = "weather",
    hits_addend = 1,
    timeout_ms = 100,
    fail_open = true,
    response_headers = true,
    ssl_verify = true,
    keepalive_timeout_ms = 60000,
    keepalive_pool_size = 64,
    descriptors = {
      { entries = { { key = "client_id", source = "header", header = "X-Client-Id" } } },
      { entries = {
        { key = "header_match", source = "header_absent", header = "x-client-id", value = "anonymous" },
        { key = "remote_address", source = "client_ip" },
      } },
    },
  }
  for k, v in pairs(overrides or {}) do c[k] = v end
  return c
end

local function find_call(name)
  for _, c in ipairs(calls) do
    if c[1] == name then return c end
  end
end

-- Tests ----------------------------------------------------------------------

describe("handler", function()
  local handler
  before_each(function()
    handler = install_stubs()
  end)

  it("runs after the authentication plugins", function()
    assert.are.equal(910, handler.PRIORITY)
    assert.truthy(handler.VERSION)
  end)

  it("POSTs the RateLimitRequest as JSON to the configured URL", function()
    request.headers["x-client-id"] = "abc"
    handler:access(conf())
    local connect = find_call("connect")[2]
    assert.are.same({
      scheme = "http", host = "sluice.sluice.svc.cluster.local", port = 8080,
      ssl_verify = true, pool_size = 64,
    }, connect)
    local req = find_call("request")[2]
    assert.are.equal("POST", req.method)
    assert.are.equal("/json", req.path)
    assert.are.equal("sluice.sluice.svc.cluster.local:8080", req.headers["Host"])
    assert.are.equal("application/json", req.headers["Content-Type"])
    assert.are.same(
      json.decode('{"domain":"weather","descriptors":[{"entries":[{"key":"client_id","value":"abc"}]}],"hitsAddend":1}'),
      json.decode(req.body))
  end)

  it("keeps the connection for the next request", function()
    handler:access(conf())
    assert.are.same({ "set_keepalive", 60000, 64 }, calls[#calls])
    assert.is_nil(find_call("close"))
  end)

  it("lets an allowed request through and adds the RateLimit headers to the response", function()
    assert.is_nil(handler:access(conf()))
    assert.is_nil(exited)
    handler:header_filter(conf())
    assert.are.same({ ["RateLimit-Limit"] = "60", ["RateLimit-Remaining"] = "59", ["RateLimit-Reset"] = "42" }, set_headers)
  end)

  it("adds no headers to allowed responses when response_headers is off", function()
    handler:access(conf({ response_headers = false }))
    handler:header_filter(conf({ response_headers = false }))
    assert.is_nil(set_headers)
  end)

  it("answers 429 with RateLimit and Retry-After headers when over the limit", function()
    sluice.status = 429
    sluice.body = [[{"overallCode":"OVER_LIMIT","statuses":[{"code":"OVER_LIMIT","currentLimit":{"requestsPerUnit":60,"unit":"MINUTE"},"durationUntilReset":"42s"}]}]]
    assert.are.equal("exited", handler:access(conf()))
    assert.are.equal(429, exited.status)
    assert.are.same({
      ["RateLimit-Limit"] = "60", ["RateLimit-Remaining"] = "0",
      ["RateLimit-Reset"] = "42", ["Retry-After"] = "42",
    }, exited.headers)
    assert.truthy(exited.body.message)
  end)

  it("does not call sluice when no descriptor applies", function()
    local c = conf({ descriptors = { { entries = { { key = "c", source = "consumer" } } } } })
    handler:access(c)
    assert.are.equal(0, #calls)
    assert.is_nil(exited)
  end)

  local failures = {
    { "connection refused", { err_at = "connect" } },
    { "a send timeout", { err_at = "request" } },
    { "a read timeout", { err_at = "read" } },
    { "HTTP 500", { status = 500, body = "internal error" } },
    { "a body that is not JSON", { status = 200, body = "<html>" } },
  }
  for _, f in ipairs(failures) do
    it("lets the request through on " .. f[1] .. " when fail_open", function()
      for k, v in pairs(f[2]) do sluice[k] = v end
      assert.is_nil(handler:access(conf({ fail_open = true })))
      assert.is_nil(exited)
      assert.are.equal("warn", logged[1][1])
    end)

    it("answers 503 on " .. f[1] .. " when not fail_open", function()
      for k, v in pairs(f[2]) do sluice[k] = v end
      handler:access(conf({ fail_open = false }))
      assert.are.equal(503, exited.status)
      assert.are.equal("err", logged[1][1])
    end)
  end

  it("closes, not pools, a connection that failed", function()
    sluice.err_at = "read"
    handler:access(conf())
    assert.truthy(find_call("close"))
    assert.is_nil(find_call("set_keepalive"))
  end)

  it("gives each phase only what is left of timeout_ms", function()
    sluice.connect_ms = 30
    sluice.request_ms = 50
    handler:access(conf({ timeout_ms = 100 }))
    local timeouts = {}
    for _, c in ipairs(calls) do
      if c[1] == "set_timeout" then timeouts[#timeouts + 1] = c[2] end
    end
    assert.are.same({ 100, 70, 20 }, timeouts)
    assert.is_nil(exited)
  end)

  it("gives up once timeout_ms is spent, and applies the failure mode", function()
    sluice.connect_ms = 60
    sluice.request_ms = 60
    handler:access(conf({ timeout_ms = 100, fail_open = false }))
    assert.are.equal(503, exited.status)
    assert.is_nil(find_call("read_body"))
    assert.truthy(logged[1][2]:find("timeout", 1, true))
  end)

  it("sends Host without the port for a default port", function()
    handler:access(conf({ url = "https://sluice.example.com/json" }))
    local connect = find_call("connect")[2]
    assert.are.equal("https", connect.scheme)
    assert.are.equal(443, connect.port)
    assert.are.equal("sluice.example.com", find_call("request")[2].headers["Host"])
  end)
end)
