-- The plugin's pure logic: no Kong, no ngx, no I/O, so plain Lua can test it.
--
--   build_request(conf, req)   -> the RateLimitRequest table to POST as JSON
--   decide(http_status, resp)  -> what to do with sluice's answer
--   parse_duration("1.500s")   -> 1.5
--
-- `req` is a plain table describing the request (handler.lua fills it from
-- the Kong PDK):
--
--   {
--     headers    = { ["x-client-id"] = "abc" },   -- lower-case names
--     client_ip  = "203.0.113.7",
--     consumer   = { id = "...", username = "acme", custom_id = "..." },
--     credential = { id = "..." },
--     route      = { id = "...", name = "weather" },
--     service    = { id = "...", name = "weather" },
--   }

local M = {}

local floor, ceil, max = math.floor, math.ceil, math.max

-- Multi-valued headers arrive as arrays: use the first value. Empty values
-- count as missing.
local function scalar(v)
  if type(v) == "table" then
    v = v[1]
  end
  if v == nil then
    return nil
  end
  v = tostring(v)
  if v == "" then
    return nil
  end
  return v
end

-- Where a descriptor entry's value comes from. Each returns nil when the
-- request has no such value; like Envoy's rate_limits actions, one missing
-- entry drops its whole descriptor.
local SOURCES = {
  -- The authenticated consumer: its username, else its id.
  consumer = function(req)
    local c = req.consumer
    return c and (c.username or c.id)
  end,
  -- The credential's id (never the secret itself).
  credential = function(req)
    return req.credential and req.credential.id
  end,
  header = function(req, entry)
    return req.headers and req.headers[entry.header:lower()]
  end,
  -- The constant `value` when the header is absent or empty (Envoy's
  -- header_value_match with expect_match: false, present_match: true), so
  -- that exactly one of a header descriptor and its fallback is sent.
  header_absent = function(req, entry)
    local v = req.headers and req.headers[entry.header:lower()]
    if scalar(v) == nil then
      return entry.value
    end
    return nil
  end,
  client_ip = function(req)
    return req.client_ip
  end,
  route = function(req)
    local r = req.route
    return r and (r.name or r.id)
  end,
  service = function(req)
    local s = req.service
    return s and (s.name or s.id)
  end,
  -- A constant (Envoy's generic_key).
  generic = function(_, entry)
    return entry.value
  end,
}

M.SOURCE_NAMES = {}
for name in pairs(SOURCES) do
  M.SOURCE_NAMES[#M.SOURCE_NAMES + 1] = name
end
table.sort(M.SOURCE_NAMES)

local NEEDS_HEADER = { header = true, header_absent = true }
local NEEDS_VALUE = { header_absent = true, generic = true }

-- Checks the `descriptors` part of the plugin configuration.
-- Returns true, or nil and a message naming the bad entry.
function M.validate_descriptors(descriptors)
  if type(descriptors) ~= "table" or #descriptors == 0 then
    return nil, "descriptors: at least one descriptor is required"
  end
  for i, d in ipairs(descriptors) do
    local entries = d.entries
    if type(entries) ~= "table" or #entries == 0 then
      return nil, ("descriptors[%d].entries: at least one entry is required"):format(i)
    end
    for j, e in ipairs(entries) do
      local at = ("descriptors[%d].entries[%d]"):format(i, j)
      if type(e.key) ~= "string" or e.key == "" then
        return nil, at .. ".key: required"
      end
      if not SOURCES[e.source] then
        return nil, ("%s.source: %q is not one of %s"):format(
          at, tostring(e.source), table.concat(M.SOURCE_NAMES, ", "))
      end
      if NEEDS_HEADER[e.source] and (type(e.header) ~= "string" or e.header == "") then
        return nil, ("%s.header: required with source %s"):format(at, e.source)
      end
      if NEEDS_VALUE[e.source] and (type(e.value) ~= "string" or e.value == "") then
        return nil, ("%s.value: required with source %s"):format(at, e.source)
      end
    end
  end
  return true
end

-- The descriptors for this request, in configuration order; those with a
-- missing entry are left out.
function M.build_descriptors(descriptors, req)
  local out = {}
  for _, d in ipairs(descriptors) do
    local entries, complete = {}, true
    for _, e in ipairs(d.entries) do
      local value = scalar(SOURCES[e.source](req, e))
      if value == nil then
        complete = false
        break
      end
      entries[#entries + 1] = { key = e.key, value = value }
    end
    if complete then
      out[#out + 1] = { entries = entries }
    end
  end
  return out
end

-- The RateLimitRequest in proto3 JSON form, or nil when no descriptor
-- applies (then there is nothing to ask).
function M.build_request(conf, req)
  local descriptors = M.build_descriptors(conf.descriptors, req)
  if #descriptors == 0 then
    return nil
  end
  return {
    domain = conf.domain,
    descriptors = descriptors,
    hitsAddend = conf.hits_addend or 1,
  }
end

-- A proto3 JSON Duration ("42s", "1.500s", "-0.5s") in seconds. Also takes
-- a bare number of seconds. nil for anything else.
function M.parse_duration(v)
  if type(v) == "number" then
    return v
  end
  if type(v) ~= "string" then
    return nil
  end
  local sign, int, frac = v:match("^(%-?)(%d+)%.?(%d*)s$")
  if not int then
    return nil
  end
  local seconds = tonumber(int) + (frac ~= "" and tonumber("0." .. frac) or 0)
  if sign == "-" then
    seconds = -seconds
  end
  return seconds
end

-- proto3 JSON names fields in lowerCamelCase, but parsers must also accept
-- the proto names; enums may come as names or numbers.
local function field(t, camel, snake)
  local v = t[camel]
  if v == nil then
    v = t[snake]
  end
  return v
end

local CODES = { [0] = "UNKNOWN", [1] = "OK", [2] = "OVER_LIMIT" }

local function code(v)
  if type(v) == "number" then
    return CODES[v] or "UNKNOWN"
  end
  return v or "UNKNOWN"
end

-- Of all statuses with a limit, the most constrained one: the fewest
-- requests remaining, then the latest reset. Returns limit, remaining and
-- reset (seconds), or nil when no status carries a limit.
local function most_constrained(statuses, only_code)
  local best
  for _, s in ipairs(statuses) do
    local limit = field(s, "currentLimit", "current_limit")
    if type(limit) == "table" and (only_code == nil or code(s.code) == only_code) then
      local c = {
        limit = tonumber(field(limit, "requestsPerUnit", "requests_per_unit")) or 0,
        -- proto3 JSON leaves out zero values: no limitRemaining means 0.
        remaining = tonumber(field(s, "limitRemaining", "limit_remaining")) or 0,
        reset = M.parse_duration(field(s, "durationUntilReset", "duration_until_reset")) or 0,
      }
      if best == nil
        or c.remaining < best.remaining
        or (c.remaining == best.remaining and c.reset > best.reset) then
        best = c
      end
    end
  end
  return best
end

-- Seconds as a whole number for headers: rounded up, after rounding to
-- milliseconds so that float noise does not add a second.
local function whole_seconds(s)
  if s <= 0 then
    return 0
  end
  return ceil(floor(s * 1000 + 0.5) / 1000)
end

-- Maps sluice's answer to a decision:
--
--   { allow = true,  headers = {...} }                 let the request through
--   { allow = false, status = 429, headers = {...} }   over the limit
--   nil, "why"                                         not an answer: the
--                                                      failure mode decides
--
-- `headers` holds RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset
-- from the most constrained status (and Retry-After when over the limit);
-- it is empty when the statuses carry no limits.
function M.decide(http_status, resp)
  if http_status ~= 200 and http_status ~= 429 then
    return nil, ("sluice answered HTTP %s"):format(tostring(http_status))
  end
  if type(resp) ~= "table" or resp[1] ~= nil then
    return nil, "sluice's answer is not a JSON object"
  end
  local overall = field(resp, "overallCode", "overall_code")
  if overall == nil then
    -- proto3 JSON leaves out a default (UNKNOWN) code: go by the HTTP status.
    overall = http_status == 429 and "OVER_LIMIT" or "OK"
  else
    overall = code(overall)
  end
  if overall ~= "OK" and overall ~= "OVER_LIMIT" then
    return nil, ("sluice answered overallCode %s"):format(tostring(overall))
  end
  local statuses = resp.statuses
  if type(statuses) ~= "table" then
    statuses = {}
  end

  local over = overall == "OVER_LIMIT"
  local headers = {}
  local best = most_constrained(statuses, over and "OVER_LIMIT" or nil)
    or (over and most_constrained(statuses))
  if best then
    headers["RateLimit-Limit"] = tostring(floor(best.limit))
    headers["RateLimit-Remaining"] = tostring(floor(max(best.remaining, 0)))
    headers["RateLimit-Reset"] = tostring(whole_seconds(best.reset))
  end
  if not over then
    return { allow = true, headers = headers }
  end

  -- A retry before every exceeded window has reset is refused again: wait
  -- for the latest one, and at least a second.
  local retry = 0
  for _, s in ipairs(statuses) do
    if code(s.code) == "OVER_LIMIT" then
      local reset = M.parse_duration(field(s, "durationUntilReset", "duration_until_reset")) or 0
      if reset > retry then
        retry = reset
      end
    end
  end
  headers["Retry-After"] = tostring(max(whole_seconds(retry), 1))
  return { allow = false, status = 429, headers = headers }
end

return M
