-- A batch of units, each checked and updated atomically, one after another,
-- in one script call: sluice coalesces the calls that are waiting for one
-- Redis node into one EVALSHA, so Redis parses, looks up and enters a script
-- once per batch instead of once per decision.
--
-- A unit is one counter operation, or all the counters of one request. In a
-- request, when an operation marked as a veto is denied, no counter changes,
-- the denied operations report their denials, and the others what a check
-- with 0 hits would (as storage/memory.rs `apply_request_at`): a denied
-- request consumes nothing. A later unit sees what earlier ones wrote.
--
-- KEYS     every operation's counter, in order (on a Cluster, all in one slot)
-- ARGV     one binary string per unit (scripts.rs `encode_unit`), packed
--          little-endian: operation count (u16), denied (u8; 1: the request
--          is denied already, by an answer sluice knows without Redis: only
--          check), clock (u8; 0: Redis' own TIME, 1: a double now_us
--          follows), then per operation: algorithm (u8: 1 sliding, 2 fixed,
--          3 gcra, 4 calendar), limit, period_us, burst, hits (doubles:
--          integers below 2^53), veto (u8), and for a calendar window four
--          more doubles: the bounds of the windows around sluice's clock
--          (fixed_window.lua `calendar_window`). One struct.unpack reads what
--          would otherwise be nine arguments for Redis to parse and Lua to
--          convert.
-- returns  one binary string, packed little-endian per operation: admitted
--          (u8: 0/1), remaining, reset_us, used (doubles: integers below
--          2^53, truncated as Redis truncates a number it replies). One
--          bulk string costs Redis and sluice far less than four integer
--          replies per operation (scripts.rs `parse_outcomes`).
local algorithms = { sliding_window, fixed_window, gcra, calendar_window }
local reply = {}
local redis_now

-- `expires` nil: the expiry stands (the same window was written before).
local function write(key, value, expires)
    if expires then
        redis.call('SET', key, value, 'PXAT', expiry_ms(expires))
    else
        redis.call('SET', key, value, 'KEEPTTL')
    end
end

-- The operation at `pos` of `unit`: its algorithm, limit, period (for a
-- calendar window, its bounds), burst, hits, veto, and where the next one
-- starts.
local function operation(unit, pos)
    local algorithm, limit, period, burst, hits, veto, next_pos =
        struct.unpack('<BddddB', unit, pos)
    if algorithm == 4 then
        local b1, b2, b3, b4
        b1, b2, b3, b4, next_pos = struct.unpack('<dddd', unit, next_pos)
        period = { b1, b2, b3, b4 }
    else
        period = math.max(period, 1)
    end
    return algorithms[algorithm], limit, period, burst, hits, veto == 1, next_pos
end

local function answer(admitted, remaining, reset, used)
    local n = #reply
    reply[n + 1] = admitted and 1 or 0
    reply[n + 2] = remaining
    reply[n + 3] = reset
    reply[n + 4] = used
end

local key_at = 0
for u = 1, #ARGV do
    local unit = ARGV[u]
    local n, denied, clock, pos = struct.unpack('<I2BB', unit)
    local vetoed = denied == 1
    local now
    if clock == 1 then
        now, pos = struct.unpack('<d', unit, pos)
    else
        -- One clock read per script call: its units run at one instant anyway.
        redis_now = redis_now or now_us('')
        now = redis_now
    end

    if n == 1 and not vetoed then
        -- One counter: a denial writes nothing anyway.
        local decide, limit, period, burst, hits = operation(unit, pos)
        local key = KEYS[key_at + 1]
        local admitted, remaining, reset, used, value, expires =
            decide(redis.call('GET', key), limit, period, burst, hits, now)
        if value then
            write(key, value, expires)
        end
        answer(admitted, remaining, reset, used)
    else
        local ops = {}
        for i = 1, n do
            local decide, limit, period, burst, hits, veto
            decide, limit, period, burst, hits, veto, pos = operation(unit, pos)
            ops[i] = { decide, limit, period, burst, hits, veto }
        end
        -- What the request would do, in order; an operation on a counter an
        -- earlier one changed sees that change.
        local pending, order, results = {}, {}, {}
        for i = 1, n do
            local decide, limit, period, burst, hits, veto = unpack(ops[i])
            local key = KEYS[key_at + i]
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
                -- A later operation in the same window keeps the expiry an
                -- earlier one set (nil: none new), which a new key needs.
                pending[key] = { value, expires or (pending[key] and pending[key][2]) }
            end
            results[i] = { admitted, remaining, reset, used }
            if veto and not admitted then
                vetoed = true
            end
        end
        if vetoed then
            -- Nothing is written; the admitted operations are checked again
            -- against the counters as they are.
            for i = 1, n do
                if results[i][1] then
                    local decide, limit, period, burst = unpack(ops[i])
                    results[i] = { decide(redis.call('GET', KEYS[key_at + i]), limit, period, burst, 0, now) }
                end
            end
        else
            for _, key in ipairs(order) do
                write(key, pending[key][1], pending[key][2])
            end
        end
        for i = 1, n do
            local r = results[i]
            answer(r[1], r[2], r[3], r[4])
        end
    end

    key_at = key_at + n
end
return struct.pack('<' .. string.rep('Bddd', #reply / 4), unpack(reply))
