-- Fixed window, exactly as window.rs `fixed_in`: the window `window` (an
-- index, or a calendar window's start) ends at `ends`. Stored: a byte 1, the
-- window (a double) and the count (a u32), packed as the sliding window's
-- (text "window:count" is still read); the window is kept because PXAT has
-- millisecond precision and a key may outlive its window by a fraction of one.
local function fixed_in(stored, limit, hits, window, ends, now)
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
            expires = ends
        end
    end
    return admitted, math.max(limit - count, 0), ends - now, count, value, expires
end

-- Epoch-aligned windows of `period`, as window.rs `fixed`.
local function fixed_window(stored, limit, period, burst, hits, now)
    local window, elapsed = divmod(now, period)
    return fixed_in(stored, limit, hits, window, now - elapsed + period, now)
end

-- A calendar window, as window.rs `check` with a calendar: a fixed window
-- named by its start. `bounds` (batch.lua `operation`) are the starts of the
-- previous, the current and the next window and the next one's end, as
-- sluice placed them around its own clock, since Lua has no tz database.
-- The window is picked by Redis' time, so instances whose clocks disagree
-- by less than a window (a day at least) count in the same one; one further
-- off gets the nearest of the three.
local function calendar_window(stored, limit, bounds, burst, hits, now)
    local i = 2
    if now < bounds[2] then
        i = 1
    elseif now >= bounds[3] then
        i = 3
    end
    local start, ends = bounds[i], bounds[i + 1]
    return fixed_in(stored, limit, hits, start, math.max(ends, now + 1), now)
end
