-- One counter, checked and updated atomically (`decide` is the algorithm).
--
-- KEYS[1]  the counter
-- ARGV     limit, period_us, burst, hits, now_us
-- returns  { admitted (0/1), remaining, reset_us, used }
local hits = tonumber(ARGV[4])
local period = math.max(tonumber(ARGV[2]), 1)
local admitted, remaining, reset, used, value, expires = decide(
    redis.call('GET', KEYS[1]), tonumber(ARGV[1]), period, tonumber(ARGV[3]), hits,
    now_us(ARGV[5]))
if value then
    redis.call('SET', KEYS[1], value, 'PXAT', expiry_ms(expires))
end
return { admitted and 1 or 0, remaining, reset, used }
