-- All the counters of one request, checked and updated atomically, so that a
-- denied request consumes nothing (as storage/memory.rs `apply_request_at`):
-- when an operation marked as a veto is denied, no counter changes, the
-- denied operations report their denials, and the others what a check with
-- 0 hits would. Only where every key is on one server (standalone Redis).
--
-- KEYS[i]  the i-th operation's counter
-- ARGV     now_us, denied (1: the request is denied already, by an answer
--          sluice knows without Redis), then per operation: algorithm
--          (1 sliding, 2 fixed, 3 gcra), limit, period_us, burst, hits, veto (0/1)
-- returns  { admitted (0/1), remaining, reset_us, used } per operation, flat
local algorithms = { sliding_window, fixed_window, gcra }
local now = now_us(ARGV[1])
local vetoed = ARGV[2] == '1'
local n = #KEYS

local function op(i)
    local base = 2 + (i - 1) * 6
    return algorithms[tonumber(ARGV[base + 1])], tonumber(ARGV[base + 2]),
        math.max(tonumber(ARGV[base + 3]), 1), tonumber(ARGV[base + 4]),
        tonumber(ARGV[base + 5]), ARGV[base + 6] == '1'
end

-- What the request would do, in order; an operation on a counter an earlier
-- one changed sees that change.
local pending, order = {}, {}
local results = {}
for i = 1, n do
    local decide, limit, period, burst, hits, veto = op(i)
    local key = KEYS[i]
    local stored
    if pending[key] then
        stored = pending[key][1]
    else
        stored = redis.call('GET', key)
    end
    local admitted, remaining, reset, used, value, expires =
        decide(stored, limit, period, burst, hits, now)
    if value then
        if not pending[key] then
            order[#order + 1] = key
        end
        pending[key] = { value, expires }
    end
    results[i] = { admitted, remaining, reset, used }
    if veto and not admitted then
        vetoed = true
    end
end

if vetoed then
    -- Nothing is written; the admitted operations are checked again against
    -- the counters as they are.
    for i = 1, n do
        if results[i][1] then
            local decide, limit, period, burst = op(i)
            local admitted, remaining, reset, used =
                decide(redis.call('GET', KEYS[i]), limit, period, burst, 0, now)
            results[i] = { admitted, remaining, reset, used }
        end
    end
else
    for _, key in ipairs(order) do
        redis.call('SET', key, pending[key][1], 'PXAT', expiry_ms(pending[key][2]))
    end
end

local reply = {}
for i = 1, n do
    local r = results[i]
    reply[#reply + 1] = r[1] and 1 or 0
    reply[#reply + 1] = r[2]
    reply[#reply + 1] = r[3]
    reply[#reply + 1] = r[4]
end
return reply
