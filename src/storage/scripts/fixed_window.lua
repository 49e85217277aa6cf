-- Fixed window, exactly as window.rs `fixed`. Stored: a byte 1, the window
-- (a double) and the count (a u32), packed as the sliding window's (text
-- "window:count" is still read); the window index is kept because PXAT has
-- millisecond precision and a key may outlive its window by a fraction of one.
local function fixed_window(stored, limit, period, burst, hits, now)
    local window, elapsed = divmod(now, period)
    local current = 0
    local same = false
    if stored then
        local w, c
        if string.byte(stored, 1) == 1 then
            w, c = struct.unpack('<dI4', stored, 2)
        else
            w, c = string.match(stored, '^(%d+):(%d+)$')
            w, c = tonumber(w), tonumber(c)
        end
        if w == window then
            current, same = c, true
        end
    end
    local admitted = current + hits <= limit
    local count = current
    if admitted then
        count = current + hits
    end
    local value, expires
    if admitted and hits > 0 then
        value = struct.pack('<BdI4', 1, window, count)
        if not same then
            -- The expiry only changes with the window (nil: keep the key's).
            expires = (window + 1) * period
        end
    end
    return admitted, math.max(limit - count, 0), period - elapsed, count, value, expires
end
