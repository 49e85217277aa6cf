-- Runs the specs with plain Lua, for machines without busted:
--
--   lua examples/kong/spec/run.lua [SPEC_FILE...]
--
-- Provides the small part of busted's API the specs use (describe, it,
-- before_each, assert.are.same/equal, assert.is_nil/is_true/is_false/
-- truthy/falsy, assert.has_error, pending) and prints
-- "lua: N passed, N failed[, N skipped]".
local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"

local DEFAULT_SPECS = { "logic_spec.lua", "handler_spec.lua", "config_spec.lua", "live_spec.lua" }

-- Assertions --------------------------------------------------------------

local function show(v)
  if type(v) == "string" then return ("%q"):format(v) end
  if type(v) ~= "table" then return tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = tostring(k) .. "=" .. show(v[k]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function deep_equal(a, b)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

local function check(ok, msg, level)
  if not ok then error(msg, (level or 1) + 2) end
end

local plain_assert = assert
local A = setmetatable({}, {
  __call = function(_, v, msg, ...)
    if not v then error(msg or "assertion failed!", 2) end
    return v, msg, ...
  end,
})
A.are = {
  same = function(expected, actual, msg)
    check(deep_equal(expected, actual), (msg and msg .. ": " or "")
      .. "expected " .. show(expected) .. "\n     got " .. show(actual))
  end,
  equal = function(expected, actual, msg)
    check(expected == actual, (msg and msg .. ": " or "")
      .. "expected " .. show(expected) .. ", got " .. show(actual))
  end,
}
A.same, A.equal = A.are.same, A.are.equal
A.is_nil = function(v, msg) check(v == nil, msg or ("expected nil, got " .. show(v))) end
A.is_true = function(v, msg) check(v == true, msg or ("expected true, got " .. show(v))) end
A.is_false = function(v, msg) check(v == false, msg or ("expected false, got " .. show(v))) end
A.truthy = function(v, msg) check(v, msg or ("expected a truthy value, got " .. show(v))) end
A.falsy = function(v, msg) check(not v, msg or ("expected a falsy value, got " .. show(v))) end
A.has_error = function(fn, msg) check(not pcall(fn), msg or "expected an error") end
A.is_not = { Nil = function(v, msg) check(v ~= nil, msg or "expected a value, got nil") end }

-- describe / it -----------------------------------------------------------

local passed, failed, skipped, failures = 0, 0, 0, {}
local stack = {} -- { name, before_each = {...} }

function describe(name, body)
  stack[#stack + 1] = { name = name, before = {} }
  body()
  stack[#stack] = nil
end

function before_each(fn)
  local top = stack[#stack]
  top.before[#top.before + 1] = fn
end

function it(name, body)
  local names = {}
  for _, level in ipairs(stack) do names[#names + 1] = level.name end
  names[#names + 1] = name
  local full = table.concat(names, " ")
  local ok, err = pcall(function()
    for _, level in ipairs(stack) do
      for _, fn in ipairs(level.before) do fn() end
    end
    body()
  end)
  if ok then
    passed = passed + 1
    io.write(".")
  else
    failed = failed + 1
    io.write("F")
    failures[#failures + 1] = full .. "\n    " .. tostring(err)
  end
end

function pending(name)
  skipped = skipped + 1
  io.write("-")
  failures.skipped = (failures.skipped or "") .. "SKIPPED: " .. tostring(name) .. "\n"
end

assert = A

local specs = { ... }
if #specs == 0 then
  for i, f in ipairs(DEFAULT_SPECS) do specs[i] = here .. f end
end
for _, file in ipairs(specs) do
  local chunk, err = loadfile(file)
  if not chunk then
    failed = failed + 1
    failures[#failures + 1] = file .. "\n    " .. tostring(err)
  else
    local ok, err2 = pcall(chunk)
    if not ok then
      failed = failed + 1
      failures[#failures + 1] = file .. " (top level)\n    " .. tostring(err2)
    end
  end
end
io.write("\n")
assert = plain_assert

for _, f in ipairs(failures) do
  io.write("FAILED: ", f, "\n")
end
io.write(failures.skipped or "")
io.write(("lua: %d passed, %d failed%s\n"):format(passed, failed,
  skipped > 0 and (", %d skipped"):format(skipped) or ""))
os.exit(failed == 0 and 0 or 1)
