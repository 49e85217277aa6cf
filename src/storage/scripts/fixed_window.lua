-- Fixed window, exactly as window.rs `fixed`. Stored: "window:count"; the
-- window index is kept because PXAT has millisecond precision and a key may
-- outlive its window by a fraction of one.
local function fixed_window(stored, limit, period, burst, hits, now)
    local window, elapsed = divmod(now, period)
    local current = 0
    if stored then
        local w, c = string.match(stored, '^(%d+):(%d+)$')
        if tonumber(w) == window then
            current = tonumber(c)
        end
    end
    local admitted = current + hits <= limit
    local count = current
    if admitted then
        count = current + hits
    end
    local value, expires
    if admitted and hits > 0 then
        value = string.format('%.0f:%.0f', window, count)
        expires = (window + 1) * period
    end
    return admitted, math.max(limit - count, 0), period - elapsed, count, value, expires
end
