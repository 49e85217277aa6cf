-- Tests of the plugin's pure logic. Run with `busted` in examples/kong, or
-- with plain Lua: `lua examples/kong/spec/run.lua`.
local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
package.path = here .. "../?.lua;" .. here .. "?.lua;" .. package.path

local logic = require "kong.plugins.sluice-ratelimit.logic"
local json = require "support.json"

-- The weather API's descriptors: the client id when the client sends one,
-- else its address (the same descriptors k8s/envoy-gateway.yaml builds).
local WEATHER = {
  domain = "weather",
  hits_addend = 1,
  descriptors = {
    { entries = { { key = "client_id", source = "header", header = "X-Client-Id" } } },
    {
      entries = {
        { key = "header_match", source = "header_absent", header = "x-client-id", value = "anonymous" },
        { key = "remote_address", source = "client_ip" },
      },
    },
  },
}

describe("build_request", function()
  it("sends the client id when the header is there (the JSON the issue specifies)", function()
    local req = { headers = { ["x-client-id"] = "abc" }, client_ip = "203.0.113.7" }
    local body = logic.build_request(WEATHER, req)
    assert.are.same(
      json.decode('{"domain":"weather","descriptors":[{"entries":[{"key":"client_id","value":"abc"}]}],"hitsAddend":1}'),
      body)
    assert.are.equal(
      '{"descriptors":[{"entries":[{"key":"client_id","value":"abc"}]}],"domain":"weather","hitsAddend":1}',
      json.encode(body))
  end)

  it("falls back to the client address when the header is missing", function()
    local body = logic.build_request(WEATHER, { headers = {}, client_ip = "203.0.113.7" })
    assert.are.same({
      { entries = {
        { key = "header_match", value = "anonymous" },
        { key = "remote_address", value = "203.0.113.7" },
      } },
    }, body.descriptors)
  end)

  it("treats an empty header as missing", function()
    local body = logic.build_request(WEATHER, { headers = { ["x-client-id"] = "" }, client_ip = "::1" })
    assert.are.equal(1, #body.descriptors)
    assert.are.equal("remote_address", body.descriptors[1].entries[2].key)
  end)

  it("uses the first value of a repeated header", function()
    local body = logic.build_request(WEATHER, { headers = { ["x-client-id"] = { "a", "b" } } })
    assert.are.same({ { entries = { { key = "client_id", value = "a" } } } }, body.descriptors)
  end)

  it("asks nothing when no descriptor is complete", function()
    assert.is_nil(logic.build_request(WEATHER, { headers = {} }))
  end)

  it("reads consumer, credential, route, service and constants", function()
    local conf = {
      domain = "business",
      hits_addend = 3,
      descriptors = {
        { entries = {
          { key = "tier", source = "generic", value = "gold" },
          { key = "consumer", source = "consumer" },
          { key = "credential", source = "credential" },
          { key = "route", source = "route" },
          { key = "service", source = "service" },
        } },
      },
    }
    local req = {
      consumer = { id = "c-1", username = "acme" },
      credential = { id = "cred-1", key = "SECRET" },
      route = { id = "r-1", name = "business" },
      service = { id = "s-1" }, -- no name: falls back to the id
    }
    local body = logic.build_request(conf, req)
    assert.are.equal(3, body.hitsAddend)
    assert.are.same({
      { key = "tier", value = "gold" },
      { key = "consumer", value = "acme" },
      { key = "credential", value = "cred-1" },
      { key = "route", value = "business" },
      { key = "service", value = "s-1" },
    }, body.descriptors[1].entries)
    assert.is_nil(json.encode(body):find("SECRET", 1, true), "the credential's secret is never sent")
  end)

  it("falls back to the consumer id without a username", function()
    local conf = { domain = "d", descriptors = { { entries = { { key = "c", source = "consumer" } } } } }
    local body = logic.build_request(conf, { consumer = { id = "c-1" } })
    assert.are.equal("c-1", body.descriptors[1].entries[1].value)
    assert.are.equal(1, body.hitsAddend)
    assert.is_nil(logic.build_request(conf, {}), "anonymous requests have no consumer descriptor")
  end)

  it("drops only the incomplete descriptors and keeps the order", function()
    local conf = { domain = "d", descriptors = {
      { entries = { { key = "a", source = "generic", value = "1" } } },
      { entries = { { key = "b", source = "consumer" } } },
      { entries = { { key = "c", source = "client_ip" } } },
    } }
    local body = logic.build_request(conf, { client_ip = "10.0.0.1" })
    assert.are.same({
      { entries = { { key = "a", value = "1" } } },
      { entries = { { key = "c", value = "10.0.0.1" } } },
    }, body.descriptors)
  end)
end)

describe("validate_descriptors", function()
  it("accepts the weather descriptors", function()
    assert.is_true(logic.validate_descriptors(WEATHER.descriptors))
  end)

  local cases = {
    { {}, "at least one descriptor" },
    { { { entries = {} } }, "descriptors%[1%]%.entries: at least one entry" },
    { { { entries = { { source = "client_ip" } } } }, "entries%[1%]%.key: required" },
    { { { entries = { { key = "k", source = "cookie" } } } }, 'source: "cookie" is not one of' },
    { { { entries = { { key = "k", source = "header" } } } }, "header: required with source header" },
    { { { entries = { { key = "k", source = "header_absent", header = "x" } } } }, "value: required with source header_absent" },
    { { { entries = { { key = "k", source = "generic" } } } }, "value: required with source generic" },
  }
  for _, case in ipairs(cases) do
    it("rejects " .. case[2]:gsub("%%", ""), function()
      local ok, err = logic.validate_descriptors(case[1])
      assert.is_nil(ok)
      assert.truthy(err:find(case[2]), "message was: " .. tostring(err))
    end)
  end
end)

describe("parse_duration", function()
  it("reads proto3 JSON durations", function()
    assert.are.equal(42, logic.parse_duration("42s"))
    assert.are.equal(1.5, logic.parse_duration("1.500s"))
    assert.are.equal(0, logic.parse_duration("0s"))
    assert.are.equal(1e-9, logic.parse_duration("0.000000001s"))
    assert.are.equal(-0.5, logic.parse_duration("-0.5s"))
    assert.are.equal(7, logic.parse_duration(7))
  end)

  it("rejects anything else", function()
    assert.is_nil(logic.parse_duration("42"))
    assert.is_nil(logic.parse_duration("1m"))
    assert.is_nil(logic.parse_duration("s"))
    assert.is_nil(logic.parse_duration("1.5.0s"))
    assert.is_nil(logic.parse_duration({ seconds = 1 }))
    assert.is_nil(logic.parse_duration(nil))
  end)
end)

describe("decide", function()
  local function answer(status, body)
    return logic.decide(status, json.decode(body))
  end

  it("lets an OK answer through with the limit headers", function()
    local d = answer(200, [[{"overallCode":"OK","statuses":[{"code":"OK","currentLimit":{"requestsPerUnit":60,"unit":"MINUTE"},"limitRemaining":59,"durationUntilReset":"42s"}]}]])
    assert.are.same({
      allow = true,
      headers = { ["RateLimit-Limit"] = "60", ["RateLimit-Remaining"] = "59", ["RateLimit-Reset"] = "42" },
    }, d)
  end)

  it("rejects an OVER_LIMIT answer with 429, limit headers and Retry-After", function()
    -- proto3 JSON leaves out limitRemaining when it is 0.
    local d = answer(429, [[{"overallCode":"OVER_LIMIT","statuses":[{"code":"OVER_LIMIT","currentLimit":{"requestsPerUnit":60,"unit":"MINUTE"},"durationUntilReset":"1.500s"}]}]])
    assert.are.same({
      allow = false,
      status = 429,
      headers = {
        ["RateLimit-Limit"] = "60",
        ["RateLimit-Remaining"] = "0",
        ["RateLimit-Reset"] = "2",
        ["Retry-After"] = "2",
      },
    }, d)
  end)

  it("reports the most constrained of several statuses", function()
    local d = answer(200, [[{"overallCode":"OK","statuses":[
      {"code":"OK","currentLimit":{"requestsPerUnit":1000,"unit":"HOUR"},"limitRemaining":10,"durationUntilReset":"3000s"},
      {"code":"OK","currentLimit":{"requestsPerUnit":60,"unit":"MINUTE"},"limitRemaining":3,"durationUntilReset":"20s"},
      {"code":"OK"}]}]])
    assert.are.equal("60", d.headers["RateLimit-Limit"])
    assert.are.equal("3", d.headers["RateLimit-Remaining"])
    assert.are.equal("20", d.headers["RateLimit-Reset"])
  end)

  it("waits for the latest reset among the exceeded limits", function()
    local d = answer(429, [[{"overallCode":"OVER_LIMIT","statuses":[
      {"code":"OK","currentLimit":{"requestsPerUnit":1000,"unit":"HOUR"},"limitRemaining":999,"durationUntilReset":"3500s"},
      {"code":"OVER_LIMIT","currentLimit":{"requestsPerUnit":10,"unit":"SECOND"},"durationUntilReset":"0.250s"},
      {"code":"OVER_LIMIT","currentLimit":{"requestsPerUnit":60,"unit":"MINUTE"},"durationUntilReset":"30s"}]}]])
    assert.is_false(d.allow)
    assert.are.equal("60", d.headers["RateLimit-Limit"])
    assert.are.equal("0", d.headers["RateLimit-Remaining"])
    assert.are.equal("30", d.headers["RateLimit-Reset"])
    assert.are.equal("30", d.headers["Retry-After"])
  end)

  it("asks for a retry after at least a second", function()
    local d = answer(429, [[{"overallCode":"OVER_LIMIT","statuses":[{"code":"OVER_LIMIT"}]}]])
    assert.are.same({ ["Retry-After"] = "1" }, d.headers)
    d = answer(429, [[{"overallCode":"OVER_LIMIT","statuses":[{"code":"OVER_LIMIT","durationUntilReset":"0.000001s"}]}]])
    assert.are.equal("1", d.headers["Retry-After"])
  end)

  it("has no limit headers when the statuses carry no limit", function()
    local d = answer(200, [[{"overallCode":"OK","statuses":[{"code":"OK"}]}]])
    assert.are.same({ allow = true, headers = {} }, d)
    d = answer(200, [[{"overallCode":"OK"}]])
    assert.are.same({ allow = true, headers = {} }, d)
  end)

  it("accepts proto field names and numeric enums", function()
    local d = answer(429, [[{"overall_code":2,"statuses":[{"code":2,"current_limit":{"requests_per_unit":5,"unit":"SECOND"},"limit_remaining":0,"duration_until_reset":"1s"}]}]])
    assert.are.same({
      allow = false,
      status = 429,
      headers = {
        ["RateLimit-Limit"] = "5",
        ["RateLimit-Remaining"] = "0",
        ["RateLimit-Reset"] = "1",
        ["Retry-After"] = "1",
      },
    }, d)
  end)

  it("goes by the HTTP status when overallCode is left out", function()
    assert.is_true(answer(200, "{}").allow)
    assert.is_false(answer(429, "{}").allow)
  end)

  it("treats anything else as no answer", function()
    local cases = {
      { 500, [[{"overallCode":"OK"}]], "HTTP 500" },
      { 400, [[{"error":"unknown domain"}]], "HTTP 400" },
      { 503, "", "HTTP 503" },
      { 200, "not json", "not a JSON object" },
      { 200, "[1]", "not a JSON object" },
      { 200, [[{"overallCode":"UNKNOWN"}]], "overallCode UNKNOWN" },
      { 200, [[{"overallCode":0}]], "overallCode UNKNOWN" },
    }
    for _, c in ipairs(cases) do
      local d, err = answer(c[1], c[2])
      assert.is_nil(d, c[2])
      assert.truthy(err:find(c[3], 1, true), "message was: " .. tostring(err))
    end
  end)
end)
