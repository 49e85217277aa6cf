-- Sliding window, exactly as window.rs `sliding`. Stored: a byte 1, then the
-- window (a double: exact below 2^53), the count and the previous window's
-- count (u32 each: limits are u32), packed little-endian: struct.pack and
-- unpack cost a fraction of formatting and matching text. Values written as
-- "window:count:previous" text (sluice before 2026-12) are still read.
local function sliding_window(stored, limit, period, burst, hits, now)
    local window, elapsed = divmod(now, period)
    local current, previous = 0, 0
    local same = false
    if stored then
        local w, c, p
        if string.byte(stored, 1) == 1 then
            w, c, p = struct.unpack('<dI4I4', stored, 2)
        else
            w, c, p = string.match(stored, '^(%d+):(%d+):(%d+)$')
            w, c, p = tonumber(w), tonumber(c), tonumber(p)
        end
        if w == window then
            current, previous, same = c, p, true
        elseif w and w + 1 == window then
            current, previous = 0, c
        end
    end

    -- window.rs compares previous * (period - elapsed) + (current + hits) * period
    -- with limit * period. The right side is a multiple of the period, so
    -- ceil(previous * (period - elapsed) / period), the previous window's
    -- share, decides the same comparison without the product.
    local share, share_rem = muldiv(previous, period - elapsed, period)
    if share_rem > 0 then
        share = share + 1
    end
    local admitted = current + hits + share <= limit
    local count = current
    if admitted then
        count = current + hits
    end
    local remaining = math.max(limit - count - share, 0)
    local used = count + share

    local until_end = period - elapsed
    local reset
    if admitted then
        reset = until_end
    elseif current + hits <= limit then
        -- Only the previous window's weight is in the way; it fades in this window.
        local room = limit - current - hits
        local divisor = math.max(previous, 1)
        local fits = period
        if room < divisor then
            fits = muldiv(room, period, divisor)
        end
        reset = math.max(period - fits - elapsed, 1)
    elseif hits <= limit and count > 0 then
        -- Wait for the next window, where this window's count fades in turn.
        local room = limit - hits
        local fits = period
        if room < count then
            fits = muldiv(room, period, count)
        end
        reset = until_end + period - fits
    else
        reset = until_end + period
    end

    -- The expiry only changes with the window (nil: keep the key's).
    local value, expires
    if admitted and hits > 0 then
        value = struct.pack('<BdI4I4', 1, window, count, previous)
        if not same then
            expires = (window + 2) * period
        end
    end
    return admitted, remaining, reset, used, value, expires
end
