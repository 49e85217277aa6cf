-- GCRA, exactly as window.rs `gcra`. Stored: the theoretical arrival time.
local function gcra(stored, limit, period, burst, hits, now)
    if limit == 0 then
        -- A zero rate admits nothing, ever.
        return hits == 0, 0, period, 0
    end
    local interval, interval_rem = divmod(period, limit)
    if interval_rem > 0 then
        interval = interval + 1
    end
    burst = math.max(burst, 1)
    local capacity = burst * interval
    local tat = now
    stored = tonumber(stored)
    if stored and stored > now then
        tat = stored
    end

    -- More hits than the bucket holds never fit; deciding that first also
    -- keeps hits * interval below 2^53 wherever it is computed.
    if hits <= burst then
        local new_tat = tat + hits * interval
        if new_tat - capacity <= now then
            local remaining = divmod(capacity - (new_tat - now), interval)
            local value
            if hits > 0 then
                value = string.format('%.0f', new_tat)
            end
            return true, remaining, new_tat - now, burst - remaining, value, new_tat
        end
    end

    local remaining = divmod(math.max(capacity - (tat - now), 0), interval)
    local reset
    if hits <= burst then
        reset = tat + hits * interval - capacity - now
    else
        reset = math.max(tat - now, interval)
    end
    return false, remaining, reset, burst - remaining
end
