-- GCRA, exactly as window.rs `gcra`. Stored: the theoretical arrival time.
if limit == 0 then
    -- A zero rate admits nothing, ever.
    return { hits == 0 and 1 or 0, 0, period, 0 }
end
local interval, interval_rem = divmod(period, limit)
if interval_rem > 0 then
    interval = interval + 1
end
burst = math.max(burst, 1)
local capacity = burst * interval
local tat = now
local stored = tonumber(redis.call('GET', KEYS[1]))
if stored and stored > now then
    tat = stored
end

-- More hits than the bucket holds never fit; deciding that first also keeps
-- hits * interval below 2^53 wherever it is computed.
if hits <= burst then
    local new_tat = tat + hits * interval
    if new_tat - capacity <= now then
        local remaining = divmod(capacity - (new_tat - now), interval)
        if hits > 0 then
            redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PXAT', expiry_ms(new_tat))
        end
        return { 1, remaining, new_tat - now, burst - remaining }
    end
end

local remaining = divmod(math.max(capacity - (tat - now), 0), interval)
local reset
if hits <= burst then
    reset = tat + hits * interval - capacity - now
else
    reset = math.max(tat - now, interval)
end
return { 0, remaining, reset, burst - remaining }
