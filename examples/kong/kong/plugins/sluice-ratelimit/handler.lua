-- sluice-ratelimit: asks sluice (POST /json, Envoy's RateLimitRequest in
-- proto3 JSON) whether a request may pass. The decisions live in logic.lua;
-- this file is the Kong glue: read the request, call sluice, act.
local cjson = require "cjson.safe"
local http = require "resty.http"
local logic = require "kong.plugins.sluice-ratelimit.logic"

local kong = kong
local ngx = ngx

local SluiceRateLimit = {
  -- After the authentication plugins (so consumer and credential are known),
  -- like Kong's own rate-limiting plugin.
  PRIORITY = 910,
  VERSION = "0.1.0",
}

-- The request as the plain table logic.lua reads, with only what the
-- configured sources need.
local function request_view(conf)
  local view = { headers = {} }
  for _, d in ipairs(conf.descriptors) do
    for _, e in ipairs(d.entries) do
      local s = e.source
      if s == "header" or s == "header_absent" then
        local name = e.header:lower()
        view.headers[name] = view.headers[name] or kong.request.get_header(name)
      elseif s == "client_ip" then
        view.client_ip = view.client_ip or kong.client.get_forwarded_ip()
      elseif s == "consumer" then
        view.consumer = view.consumer or kong.client.get_consumer()
      elseif s == "credential" then
        view.credential = view.credential or kong.client.get_credential()
      elseif s == "route" then
        view.route = view.route or kong.router.get_route()
      elseif s == "service" then
        view.service = view.service or kong.router.get_service()
      end
    end
  end
  return view
end

local function now_ms()
  ngx.update_time()
  return ngx.now() * 1000
end

-- POSTs body to sluice within conf.timeout_ms in all, reusing pooled
-- connections. Returns the HTTP status and body, or nil and an error.
local function ask_sluice(conf, body)
  local deadline = now_ms() + conf.timeout_ms
  local httpc = http.new()

  -- Each phase gets what is left of the budget.
  local function budget()
    local left = math.floor(deadline - now_ms())
    if left <= 0 then
      return nil
    end
    httpc:set_timeout(left)
    return left
  end

  local uri, err = httpc:parse_uri(conf.url)
  if not uri then
    return nil, "bad url: " .. tostring(err)
  end
  local scheme, host, port, path = uri[1], uri[2], uri[3], uri[4]

  budget()
  local ok
  ok, err = httpc:connect({
    scheme = scheme,
    host = host,
    port = port,
    ssl_verify = conf.ssl_verify,
    pool_size = conf.keepalive_pool_size,
  })
  if not ok then
    return nil, "connect: " .. tostring(err)
  end

  local default_port = (scheme == "https" and 443) or 80
  if not budget() then
    httpc:close()
    return nil, "timeout"
  end
  local res
  res, err = httpc:request({
    method = "POST",
    path = path,
    body = body,
    headers = {
      ["Host"] = port == default_port and host or (host .. ":" .. port),
      ["Content-Type"] = "application/json",
      ["Accept"] = "application/json",
    },
  })
  if not res then
    httpc:close()
    return nil, "request: " .. tostring(err)
  end

  if not budget() then
    httpc:close()
    return nil, "timeout"
  end
  local resp_body
  resp_body, err = res:read_body()
  if not resp_body then
    httpc:close()
    return nil, "read: " .. tostring(err)
  end
  httpc:set_keepalive(conf.keepalive_timeout_ms, conf.keepalive_pool_size)
  return res.status, resp_body
end

function SluiceRateLimit:access(conf)
  local request = logic.build_request(conf, request_view(conf))
  if not request then
    return -- no descriptor applies: nothing to limit
  end

  local status, body = ask_sluice(conf, cjson.encode(request))
  local decision, err
  if status then
    decision, err = logic.decide(status, cjson.decode(body))
  else
    err = body
  end

  if not decision then
    if conf.fail_open then
      kong.log.warn("sluice unavailable, letting the request through: ", err)
      return
    end
    kong.log.err("sluice unavailable, rejecting the request: ", err)
    return kong.response.exit(503, { message = "Rate limit service unavailable" })
  end

  if not decision.allow then
    return kong.response.exit(decision.status, { message = "API rate limit exceeded" }, decision.headers)
  end
  if conf.response_headers and next(decision.headers) then
    kong.ctx.plugin.headers = decision.headers
  end
end

function SluiceRateLimit:header_filter(conf)
  local headers = kong.ctx.plugin.headers
  if headers then
    kong.response.set_headers(headers)
  end
end

return SluiceRateLimit
