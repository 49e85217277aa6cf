-- Checks schema.lua, and the sample kong.yml against it.
--
-- Plain Lua cannot read YAML, so the kong.yml check needs the file as JSON
-- in $SLUICE_KONG_CONFIG_JSON (.ci/check-deploy.sh makes it); without it
-- that part is skipped.
local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
package.path = here .. "../?.lua;" .. here .. "?.lua;" .. package.path

local json = require "support.json"

-- Kong's typedefs, as far as schema.lua uses them.
package.loaded["kong.db.schema.typedefs"] = setmetatable({
  protocols_http = { type = "set", elements = { type = "string" }, default = { "http", "https" } },
  header_name = { type = "string" },
  url = setmetatable({ type = "string", url = true }, {
    __call = function(self, overrides)
      local t = {}
      for k, v in pairs(self) do t[k] = v end
      for k, v in pairs(overrides or {}) do t[k] = v end
      return t
    end,
  }),
}, { __index = function(_, name) error("schema.lua uses typedef " .. name .. " unknown to this test") end })

package.loaded["kong.plugins.sluice-ratelimit.schema"] = nil
local schema = require "kong.plugins.sluice-ratelimit.schema"

local function config_fields()
  for _, f in ipairs(schema.fields) do
    if f.config then return f.config end
  end
end

-- A small subset of Kong's schema validation: types, required, defaults,
-- one_of, between, len_min, arrays of records, custom_validator, and no
-- unknown fields. Returns the value with defaults filled in, or nil, error.
local validate

local function validate_record(def, value, path)
  if type(value) ~= "table" then return nil, path .. ": expected a record" end
  local known, out = {}, {}
  for _, f in ipairs(def.fields) do
    local name, fdef = next(f)
    known[name] = true
    local v = value[name]
    if v == nil then v = fdef.default end
    if v == nil then
      if fdef.required then return nil, path .. "." .. name .. ": required field missing" end
    else
      local checked, err = validate(fdef, v, path .. "." .. name)
      if err then return nil, err end
      out[name] = checked
    end
  end
  for k in pairs(value) do
    if not known[k] then return nil, path .. "." .. tostring(k) .. ": unknown field" end
  end
  return out
end

function validate(def, value, path)
  local t = def.type
  if t == "record" then
    local out, err = validate_record(def, value, path)
    if not out then return nil, err end
    value = out
  elseif t == "array" or t == "set" then
    if type(value) ~= "table" then return nil, path .. ": expected an array" end
    if def.len_min and #value < def.len_min then
      return nil, ("%s: at least %d element(s)"):format(path, def.len_min)
    end
    local out = {}
    for i, v in ipairs(value) do
      local checked, err = validate(def.elements, v, ("%s[%d]"):format(path, i))
      if err then return nil, err end
      out[i] = checked
    end
    value = out
  elseif t == "string" then
    if type(value) ~= "string" then return nil, path .. ": expected a string" end
    if def.len_min and #value < def.len_min then return nil, path .. ": too short" end
    if def.url and not value:match("^https?://[^/]+") then return nil, path .. ": not an http(s) URL" end
    if def.one_of then
      local found = false
      for _, allowed in ipairs(def.one_of) do found = found or allowed == value end
      if not found then return nil, path .. ": " .. value .. " is not allowed" end
    end
  elseif t == "integer" then
    if type(value) ~= "number" or value ~= math.floor(value) then return nil, path .. ": expected an integer" end
    if def.between and (value < def.between[1] or value > def.between[2]) then
      return nil, ("%s: must be between %d and %d"):format(path, def.between[1], def.between[2])
    end
  elseif t == "boolean" then
    if type(value) ~= "boolean" then return nil, path .. ": expected a boolean" end
  else
    return nil, path .. ": type " .. tostring(t) .. " unknown to this test"
  end
  if def.custom_validator then
    local ok, err = def.custom_validator(value)
    if not ok then return nil, path .. ": " .. tostring(err) end
  end
  return value
end

describe("schema.lua", function()
  it("is a plugin schema named sluice-ratelimit", function()
    assert.are.equal("sluice-ratelimit", schema.name)
    assert.truthy(config_fields(), "has a config record")
  end)

  it("fills in the defaults around a minimal configuration", function()
    local conf, err = validate(config_fields(), {
      domain = "weather",
      descriptors = { { entries = { { key = "remote_address", source = "client_ip" } } } },
    }, "config")
    assert.is_nil(err)
    assert.are.equal("http://sluice.sluice.svc.cluster.local:8080/json", conf.url)
    assert.are.equal(100, conf.timeout_ms)
    assert.is_true(conf.fail_open)
    assert.are.equal(1, conf.hits_addend)
    assert.are.equal(64, conf.keepalive_pool_size)
  end)

  local bad = {
    { { descriptors = { { entries = { { key = "k", source = "client_ip" } } } } }, "config.domain: required" },
    { { domain = "d", descriptors = {} }, "config.descriptors: at least 1" },
    { { domain = "d", descriptors = { { entries = { { key = "k", source = "ip" } } } } }, "ip is not allowed" },
    { { domain = "d", descriptors = { { entries = { { key = "k", source = "header" } } } } }, "header: required with source header" },
    { { domain = "d", timeout_ms = 0, descriptors = { { entries = { { key = "k", source = "client_ip" } } } } }, "config.timeout_ms: must be between" },
    { { domain = "d", fail_open = "yes", descriptors = { { entries = { { key = "k", source = "client_ip" } } } } }, "config.fail_open: expected a boolean" },
    { { domain = "d", failopen = true, descriptors = { { entries = { { key = "k", source = "client_ip" } } } } }, "config.failopen: unknown field" },
  }
  for _, case in ipairs(bad) do
    it("rejects a configuration with " .. case[2], function()
      local conf, err = validate(config_fields(), case[1], "config")
      assert.is_nil(conf)
      assert.truthy(err:find(case[2], 1, true), "message was: " .. tostring(err))
    end)
  end
end)

describe("kong.yml", function()
  local path = os.getenv("SLUICE_KONG_CONFIG_JSON")
  if not path or path == "" then
    pending("kong.yml check skipped: set SLUICE_KONG_CONFIG_JSON to kong.yml converted to JSON")
    return
  end

  it("configures sluice-ratelimit validly wherever it is used", function()
    local f = assert(io.open(path))
    local doc = assert(json.decode(f:read("*a")))
    f:close()
    assert.are.equal("3.0", doc._format_version)
    local found = 0
    local function check_plugins(plugins, where)
      for i, p in ipairs(plugins or {}) do
        if p.name == "sluice-ratelimit" then
          found = found + 1
          local _, err = validate(config_fields(), p.config or {}, ("%s.plugins[%d].config"):format(where, i))
          assert.is_nil(err)
        end
      end
    end
    check_plugins(doc.plugins, "")
    for i, s in ipairs(doc.services or {}) do
      check_plugins(s.plugins, ("services[%d]"):format(i))
      for j, r in ipairs(s.routes or {}) do
        check_plugins(r.plugins, ("services[%d].routes[%d]"):format(i, j))
      end
    end
    assert.truthy(found > 0, "kong.yml uses the plugin")
  end)
end)
