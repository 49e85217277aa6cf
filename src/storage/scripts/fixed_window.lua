-- Fixed window, exactly as window.rs `fixed`. Stored: "window:count"; the
-- window index is kept because PXAT has millisecond precision and a key may
-- outlive its window by a fraction of one.
local window, elapsed = divmod(now, period)
local current = 0
local stored = redis.call('GET', KEYS[1])
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
if admitted and hits > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f:%.0f', window, count),
        'PXAT', expiry_ms((window + 1) * period))
end
return { admitted and 1 or 0, math.max(limit - count, 0), period - elapsed, count }
