-- Configuration of the sluice-ratelimit plugin.
local typedefs = require "kong.db.schema.typedefs"
local logic = require "kong.plugins.sluice-ratelimit.logic"

-- One descriptor entry: `key` and where its value comes from.
--   consumer       the consumer's username (else its id)
--   credential     the credential's id (never the secret)
--   header         the value of `header`
--   header_absent  `value` when `header` is missing (else the descriptor is dropped)
--   client_ip      the client address (honours trusted_ips / real_ip_header)
--   route          the route's name (else its id)
--   service        the service's name (else its id)
--   generic        the constant `value`
local entry = {
  type = "record",
  fields = {
    { key = { type = "string", required = true, len_min = 1 } },
    { source = { type = "string", required = true, one_of = logic.SOURCE_NAMES } },
    { header = typedefs.header_name },
    { value = { type = "string", len_min = 1 } },
  },
}

return {
  name = "sluice-ratelimit",
  fields = {
    { protocols = typedefs.protocols_http },
    {
      config = {
        type = "record",
        fields = {
          -- sluice's JSON decision endpoint.
          { url = typedefs.url({ required = true, default = "http://sluice.sluice.svc.cluster.local:8080/json" }) },
          { domain = { type = "string", required = true, len_min = 1 } },
          -- Each descriptor is sent when all of its entries have a value.
          {
            descriptors = {
              type = "array",
              required = true,
              len_min = 1,
              elements = {
                type = "record",
                fields = {
                  { entries = { type = "array", required = true, len_min = 1, elements = entry } },
                },
              },
              custom_validator = logic.validate_descriptors,
            },
          },
          { hits_addend = { type = "integer", required = true, default = 1, between = { 1, 1000000 } } },
          -- The whole call to sluice (connect, send, read) must fit in this.
          { timeout_ms = { type = "integer", required = true, default = 100, between = { 1, 60000 } } },
          -- When sluice cannot answer in time: true lets the request through,
          -- false rejects it with 503.
          { fail_open = { type = "boolean", required = true, default = true } },
          -- Add RateLimit-* headers to allowed responses too (429s always have them).
          { response_headers = { type = "boolean", required = true, default = true } },
          { ssl_verify = { type = "boolean", required = true, default = true } },
          { keepalive_timeout_ms = { type = "integer", required = true, default = 60000, between = { 1000, 3600000 } } },
          { keepalive_pool_size = { type = "integer", required = true, default = 64, between = { 1, 10000 } } },
        },
      },
    },
  },
}
