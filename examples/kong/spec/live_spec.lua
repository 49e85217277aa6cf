-- The plugin's logic against a real sluice: builds requests as the plugin
-- does, POSTs them to sluice's /json with curl, and maps the real answers.
-- Needs $SLUICE_JSON_URL (e.g. http://127.0.0.1:8080/json) of a sluice
-- serving examples/rules; skipped without it. .ci/check-deploy.sh starts one.
local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
package.path = here .. "../?.lua;" .. here .. "?.lua;" .. package.path

local logic = require "kong.plugins.sluice-ratelimit.logic"
local json = require "support.json"

local URL = os.getenv("SLUICE_JSON_URL")

describe("against a real sluice", function()
  if not URL or URL == "" then
    pending("live test skipped: set SLUICE_JSON_URL to a sluice /json endpoint serving examples/rules")
    return
  end

  -- What the plugin would do for one request: nil, "why" when it asks nothing.
  local function ask(conf, req)
    local body = logic.build_request(conf, req)
    if not body then return nil, "no descriptor" end
    local file = os.tmpname()
    local f = assert(io.open(file, "w"))
    f:write(json.encode(body))
    f:close()
    local p = assert(io.popen(("curl -s --max-time 5 -w '\\n%%{http_code}' -H 'Content-Type: application/json' --data-binary @%s '%s'")
      :format(file, URL)))
    local out = p:read("*a")
    p:close()
    os.remove(file)
    local resp, status = out:match("^(.*)\n(%d+)$")
    assert(status, "no answer from " .. URL .. ": " .. out)
    return logic.decide(tonumber(status), json.decode(resp))
  end

  local WEATHER = {
    domain = "weather",
    descriptors = {
      { entries = { { key = "client_id", source = "header", header = "x-client-id" } } },
      { entries = {
        { key = "header_match", source = "header_absent", header = "x-client-id", value = "anonymous" },
        { key = "remote_address", source = "client_ip" },
      } },
    },
  }
  -- Fresh identities, so that earlier runs' counts do not matter: a
  -- temporary file's name is unique among concurrent and earlier runs.
  local tmp = os.tmpname()
  os.remove(tmp)
  local run = tmp:gsub("[^%w]", "")
  local sum = 0
  for i = 1, #run do
    sum = (sum * 31 + run:byte(i)) % 65021
  end

  it("allows a client 60 requests a minute, then answers 429 with Retry-After", function()
    local req = { headers = { ["x-client-id"] = "kong-live-" .. run }, client_ip = "192.0.2.1" }
    for i = 1, 60 do
      local d, err = ask(WEATHER, req)
      assert.is_nil(err)
      assert.is_true(d.allow, "request " .. i)
      assert.are.equal("60", d.headers["RateLimit-Limit"])
      assert.are.equal(tostring(60 - i), d.headers["RateLimit-Remaining"])
    end
    local d = ask(WEATHER, req)
    assert.is_false(d.allow)
    assert.are.equal(429, d.status)
    assert.are.equal("0", d.headers["RateLimit-Remaining"])
    local retry = tonumber(d.headers["Retry-After"])
    assert.truthy(retry >= 1 and retry <= 60, "Retry-After " .. tostring(retry))
  end)

  it("limits clients without an id by address, separately", function()
    local ip = ("198.51.%d.%d"):format(math.floor(sum / 254) % 256, sum % 254 + 1)
    local d, err = ask(WEATHER, { headers = {}, client_ip = ip })
    assert.is_nil(err)
    assert.is_true(d.allow)
    assert.are.equal("60", d.headers["RateLimit-Limit"])
    assert.are.equal("59", d.headers["RateLimit-Remaining"])
  end)

  it("lets an unlimited client through without limit headers", function()
    local conf = { domain = "business", descriptors = {
      { entries = { { key = "client_id", source = "header", header = "x-client-id" } } } } }
    for _ = 1, 3 do
      local d = ask(conf, { headers = { ["x-client-id"] = "internal-reporting" } })
      assert.is_true(d.allow)
      assert.are.same({}, d.headers)
    end
  end)

  it("counts hits_addend", function()
    local conf = { domain = "business", hits_addend = 400, descriptors = {
      { entries = { { key = "api_key", source = "header", header = "x-api-key" } } } } }
    local req = { headers = { ["x-api-key"] = "kong-live-" .. run } }
    assert.are.equal("600", ask(conf, req).headers["RateLimit-Remaining"])
    assert.are.equal("200", ask(conf, req).headers["RateLimit-Remaining"])
    assert.is_false(ask(conf, req).allow, "a third 400 is over 1000 a minute")
  end)

  it("lets everything through for a domain without rules", function()
    local conf = { domain = "no-such-domain-" .. run, descriptors = {
      { entries = { { key = "k", source = "generic", value = "v" } } } } }
    local d, err = ask(conf, {})
    assert.is_nil(err)
    assert.is_true(d.allow)
  end)
end)
