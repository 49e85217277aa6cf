package = "sluice-ratelimit"
version = "0.1.0-1"
source = {
  url = "file://.",
}
description = {
  summary = "Kong plugin asking sluice (Envoy's rate-limit API, JSON form) whether a request may pass",
  license = "Apache-2.0",
}
dependencies = {
  "lua-resty-http >= 0.16",
}
build = {
  type = "builtin",
  modules = {
    ["kong.plugins.sluice-ratelimit.handler"] = "kong/plugins/sluice-ratelimit/handler.lua",
    ["kong.plugins.sluice-ratelimit.schema"] = "kong/plugins/sluice-ratelimit/schema.lua",
    ["kong.plugins.sluice-ratelimit.logic"] = "kong/plugins/sluice-ratelimit/logic.lua",
  },
}
