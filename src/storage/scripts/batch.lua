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
-- ARGV     per unit: operation count, denied (1: the request is denied
--          already, by an answer sluice knows without Redis: only check),
--          now_us ('': Redis' own TIME), then per operation: algorithm
--          (1 sliding, 2 fixed, 3 gcra), limit, period_us, burst, hits, veto (0/1)
-- returns  { admitted (0/1), remaining, reset_us, used } per operation, flat
local algorithms = { sliding_window, fixed_window, gcra }
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

-- The arguments of the operation at ARGV[base]: algorithm, limit, period,
-- burst, hits, veto.
local function operation(base)
    return algorithms[tonumber(ARGV[base])], tonumber(ARGV[base + 1]),
        math.max(tonumber(ARGV[base + 2]), 1), tonumber(ARGV[base + 3]),
        tonumber(ARGV[base + 4]), ARGV[base + 5] == '1'
end

local function answer(admitted, remaining, reset, used)
    local n = #reply
    reply[n + 1] = admitted and 1 or 0
    reply[n + 2] = remaining
    reply[n + 3] = reset
    reply[n + 4] = used
end

local key_at, arg_at = 0, 1
while arg_at <= #ARGV do
    local n = tonumber(ARGV[arg_at])
    local vetoed = ARGV[arg_at + 1] == '1'
    local now = ARGV[arg_at + 2]
    if now == '' then
        -- One clock read per script call: its units run at one instant anyway.
        redis_now = redis_now or now_us('')
        now = redis_now
    else
        now = tonumber(now)
    end
    local args, keys = arg_at + 3, key_at
    -- The i-th operation's arguments (no closure per unit: a batch has many).
    local function op(i)
        return operation(args + (i - 1) * 6)
    end

    if n == 1 and not vetoed then
        -- One counter: a denial writes nothing anyway.
        local decide, limit, period, burst, hits = operation(args)
        local key = KEYS[keys + 1]
        local admitted, remaining, reset, used, value, expires =
            decide(redis.call('GET', key), limit, period, burst, hits, now)
        if value then
            write(key, value, expires)
        end
        answer(admitted, remaining, reset, used)
    else
        -- What the request would do, in order; an operation on a counter an
        -- earlier one changed sees that change.
        local pending, order, results = {}, {}, {}
        for i = 1, n do
            local decide, limit, period, burst, hits, veto = op(i)
            local key = KEYS[keys + i]
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
                    local decide, limit, period, burst = op(i)
                    results[i] = { decide(redis.call('GET', KEYS[keys + i]), limit, period, burst, 0, now) }
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
    arg_at = arg_at + 3 + n * 6
end
return reply
