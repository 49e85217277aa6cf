-- Shared by every counter script (prepended with concat! in Rust): the
-- arithmetic and the clock. Then come the algorithms (sliding, fixed and
-- calendar windows, GCRA), each a function of a counter's stored value that
-- returns its decision and the value to store (nil: leave the counter as it
-- is), and last the script's own body:
-- batches of units, each one counter or one request's counters (batch.lua).
--
-- Redis runs Lua 5.1, whose numbers are doubles: integers are exact below
-- 2^53 (about 285 years of microseconds), and every value kept below is
-- under that bound. The one product that is not, a count times a period in
-- the sliding window, goes through muldiv.

-- `fixed` is empty in production: the time is Redis' own (TIME), so sluice
-- instances whose clocks disagree still agree on windows. Only the storage
-- contract tests pass a time, to replay exact sequences against window.rs.
local function now_us(fixed)
    if fixed and fixed ~= '' then
        return tonumber(fixed)
    end
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- floor(a / b) and a % b for integers 0 <= a < 2^53, 0 < b. A double
-- division can round across an integer; the fix-ups make it exact.
local function divmod(a, b)
    local q = math.floor(a / b)
    local r = a - q * b
    if r < 0 then
        q = q - 1
        r = r + b
    elseif r >= b then
        q = q + 1
        r = r - b
    end
    return q, r
end

-- floor(a * b / c) and its remainder, exactly, even when a * b is beyond
-- 2^53 (as long as the quotient and 2c are not): shift-and-add over the bits
-- of a, keeping the running product as quotient and remainder of c.
local function muldiv(a, b, c)
    if a * b < 9007199254740992 then
        -- The product is below 2^53, so exact: one division will do.
        return divmod(a * b, c)
    end
    local qb, rb = divmod(b, c)
    local q, r = 0, 0
    local bit = 1
    while bit * 2 <= a do
        bit = bit * 2
    end
    while bit >= 1 do
        q = q * 2
        r = r * 2
        if r >= c then
            q = q + 1
            r = r - c
        end
        if a >= bit then
            a = a - bit
            q = q + qb
            r = r + rb
            if r >= c then
                q = q + 1
                r = r - c
            end
        end
        bit = bit / 2
    end
    return q, r
end

-- Milliseconds for PXAT, rounded up so a key never outlives its use early.
local function expiry_ms(at_us)
    local q, r = divmod(at_us, 1000)
    if r > 0 then
        q = q + 1
    end
    return string.format('%.0f', q)
end
