-- sluice schema: plans, tenants, API keys, rate-limit rules, usage and
-- violations. Applied by `sluice migrate` (sqlx migrations, embedded in the
-- binary; re-running is a no-op).
--
-- Every change to plans, tenants, api_keys or rules sends NOTIFY on the
-- channel `sluice_config`; running sluice instances reload within a second.

-- === Plans ===

CREATE TABLE plans (
    name          text PRIMARY KEY
                  CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- Requests a tenant on this plan may make per month (sluice's month:
    -- 30 days, as a `unit: month` rule counts); NULL: no quota.
    -- At most 2^32-1: Envoy reports limits as uint32.
    monthly_quota bigint
                  CHECK (monthly_quota BETWEEN 1 AND 4294967295),
    created_at    timestamptz NOT NULL DEFAULT now()
);

INSERT INTO plans (name, monthly_quota) VALUES
    ('free',         100000),
    ('startup',      5000000),
    ('professional', 50000000),
    ('enterprise',   NULL);

-- === Tenants and API keys ===

CREATE TABLE tenants (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL UNIQUE
               CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    plan       text NOT NULL REFERENCES plans (name) ON UPDATE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Keyed BLAKE3 of the raw key (sluice's --key-secret); the raw key is
    -- shown once when issued and never stored.
    key_hash   text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    -- The first characters of the raw key, to recognise and revoke it.
    prefix     text NOT NULL UNIQUE CHECK (prefix ~ '^slk_[0-9a-f]{8}$'),
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- Overrides the tenant's plan for this key's limits (not its quota).
    plan       text REFERENCES plans (name) ON UPDATE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz,
    CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);

CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- === Rules ===

-- One row per node of an envoyproxy/ratelimit descriptor tree, in file
-- order (`position`, a pre-order index within its domain and scope): the
-- path from the root is (path_keys[i], path_values[i]); an empty value
-- matches any value. `sluice rules apply` writes whole domains; a row
-- without a limit is an intermediate node or a whitelisted value.
CREATE TABLE rules (
    id              bigserial PRIMARY KEY,
    domain          text NOT NULL CHECK (domain <> '' AND length(domain) <= 255),
    -- Scope: NULL/NULL for the domain's rules; a plan's (or one tenant's)
    -- rules replace the domain's rules for the requests of its API keys.
    plan            text REFERENCES plans (name) ON UPDATE CASCADE ON DELETE CASCADE,
    tenant_id       uuid REFERENCES tenants (id) ON DELETE CASCADE,
    position        integer NOT NULL CHECK (position >= 0),
    path_keys       text[] NOT NULL,
    path_values     text[] NOT NULL,
    unit            text CHECK (unit IN ('second', 'minute', 'hour', 'day', 'week', 'month', 'year')),
    requests_per_unit bigint CHECK (requests_per_unit BETWEEN 1 AND 4294967295),
    unlimited       boolean NOT NULL DEFAULT false,
    algorithm       text CHECK (algorithm IN ('sliding_window', 'fixed_window', 'gcra')),
    burst           bigint CHECK (burst BETWEEN 1 AND 4294967295),
    name            text CHECK (name <> ''),
    replaces        text[] NOT NULL DEFAULT '{}',
    shadow_mode     boolean NOT NULL DEFAULT false,
    quota_mode      boolean NOT NULL DEFAULT false,
    detailed_metric boolean NOT NULL DEFAULT false,
    value_to_metric boolean NOT NULL DEFAULT false,
    share_threshold boolean NOT NULL DEFAULT false,
    metadata        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    updated_at      timestamptz NOT NULL DEFAULT now(),

    CHECK (plan IS NULL OR tenant_id IS NULL),
    CHECK (cardinality(path_keys) BETWEEN 1 AND 16
           AND cardinality(path_keys) = cardinality(path_values)
           AND array_position(path_keys, '') IS NULL
           AND array_position(path_keys, NULL) IS NULL
           AND array_position(path_values, NULL) IS NULL),
    -- A limit has a unit and a rate; `unlimited` has neither; a node
    -- without a rate limit has none of the rate-limit fields.
    CHECK (CASE
        WHEN unlimited THEN unit IS NULL AND requests_per_unit IS NULL
                            AND algorithm IS NULL AND burst IS NULL
        ELSE (unit IS NULL) = (requests_per_unit IS NULL)
             AND (unit IS NOT NULL OR (algorithm IS NULL AND burst IS NULL
                                       AND name IS NULL AND cardinality(replaces) = 0))
    END),
    CHECK (burst IS NULL OR algorithm = 'gcra'),
    CHECK (NOT share_threshold OR path_values[cardinality(path_values)] LIKE '%*')
);

-- Unique paths per domain and scope (expressions, so NULL scopes compare
-- equal without PostgreSQL 15's NULLS NOT DISTINCT).
CREATE UNIQUE INDEX rules_unique_path ON rules
    (domain, coalesce(plan, ''), coalesce(tenant_id::text, ''), path_keys, path_values);
CREATE UNIQUE INDEX rules_unique_position ON rules
    (domain, coalesce(plan, ''), coalesce(tenant_id::text, ''), position);

-- === Change notification ===

CREATE FUNCTION sluice_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Delivered at commit, once per transaction and payload.
    PERFORM pg_notify('sluice_config', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER plans_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON plans
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_notify_change();
CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_notify_change();
CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_notify_change();
CREATE TRIGGER rules_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rules
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_notify_change();

-- === Usage and violations ===

-- Allowed and denied requests per tenant, domain and hour (UTC), written in
-- batches by every sluice instance (upserts add up).
CREATE TABLE usage_hourly (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    domain    text NOT NULL CHECK (domain <> ''),
    hour      timestamptz NOT NULL
              CHECK (date_trunc('hour', hour AT TIME ZONE 'UTC') = hour AT TIME ZONE 'UTC'),
    allowed   bigint NOT NULL DEFAULT 0 CHECK (allowed >= 0),
    denied    bigint NOT NULL DEFAULT 0 CHECK (denied >= 0),
    PRIMARY KEY (tenant_id, domain, hour)
);

-- Denials, for analytics: one row per (batch, tenant, domain, rule, client)
-- with the number of denied hits in that batch and the time of the first.
-- The client is a keyed hash, never the raw identifier. Partitioned by
-- month, so old months are dropped with DROP TABLE violations_YYYY_MM.
-- No foreign key to tenants: the history outlives a deleted tenant.
CREATE TABLE violations (
    at        timestamptz NOT NULL,
    tenant_id uuid,
    domain    text NOT NULL CHECK (domain <> ''),
    rule      text NOT NULL CHECK (rule <> ''),
    client_id text NOT NULL CHECK (client_id ~ '^[0-9a-f]{16}$'),
    hits      bigint NOT NULL DEFAULT 1 CHECK (hits > 0)
) PARTITION BY RANGE (at);

CREATE INDEX violations_tenant_at ON violations (tenant_id, at);

-- Creates the month's partition for `at` if it is missing; sluice calls it
-- before writing a batch, so partitions appear as months begin.
CREATE FUNCTION sluice_violations_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    -- Calendar months in UTC, whatever the session's time zone.
    month_start timestamp := date_trunc('month', at AT TIME ZONE 'UTC');
    part text := 'violations_' || to_char(month_start, 'YYYY_MM');
BEGIN
    IF to_regclass(part) IS NULL THEN
        BEGIN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF violations FOR VALUES FROM (%L) TO (%L)',
                part,
                month_start AT TIME ZONE 'UTC',
                (month_start + interval '1 month') AT TIME ZONE 'UTC');
        EXCEPTION WHEN duplicate_table THEN
            NULL; -- another instance created it first
        END;
    END IF;
    RETURN part;
END
$$;

SELECT sluice_violations_partition(now());
SELECT sluice_violations_partition(now() + interval '1 month');
