-- The admin API (`sluice admin`): plan prices, suspended tenants, rule-set
-- versions for optimistic concurrency, admin tokens and the audit log.

-- A plan's price per month, in cents; NULL: not priced (e.g. negotiated).
ALTER TABLE plans ADD COLUMN monthly_price_cents bigint
    CHECK (monthly_price_cents BETWEEN 0 AND 1000000000000);

-- A suspended tenant's API keys are refused as unknown keys are, until it
-- is resumed; its rules, keys and usage stay.
ALTER TABLE tenants ADD COLUMN suspended_at timestamptz;

-- One version per rule set (a domain's rules in one scope), raised by every
-- write: the admin API's ETag. An edit made against an older version is
-- refused, so two operators cannot overwrite each other silently.
-- scope: '' (the domain's), 'plan:NAME' or 'tenant:UUID'.
CREATE TABLE rule_set_versions (
    domain     text NOT NULL CHECK (domain <> ''),
    scope      text NOT NULL,
    version    bigint NOT NULL DEFAULT 0 CHECK (version >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (domain, scope)
);

-- Tokens for the admin API, shown once when issued; only a keyed BLAKE3
-- hash (sluice's --key-secret) is stored, as for API keys.
CREATE TABLE admin_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    token_hash  text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    prefix      text NOT NULL UNIQUE CHECK (prefix ~ '^sla_[0-9a-f]{8}$'),
    role        text NOT NULL CHECK (role IN ('admin', 'operator', 'tenant')),
    -- The one tenant a `tenant` token may see; the others have none.
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    description text NOT NULL DEFAULT '' CHECK (length(description) <= 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    CHECK ((role = 'tenant') = (tenant_id IS NOT NULL))
);

-- Every change made through the admin API. Append-only: the trigger below
-- refuses updates and deletes. No raw key or token is ever written here
-- (only prefixes).
CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    -- Who: an admin token's prefix, or an OIDC subject.
    actor     text NOT NULL,
    role      text NOT NULL,
    -- The tenant a `tenant` actor belongs to (NULL for the others).
    actor_tenant_id uuid,
    method    text NOT NULL,
    route     text NOT NULL,
    -- What was changed, e.g. 'tenant:acme', 'rules:api/plan:free'.
    object    text NOT NULL,
    before    jsonb,
    after     jsonb,
    status    integer NOT NULL,
    source    text NOT NULL
);

CREATE INDEX audit_log_at ON audit_log (at);

CREATE FUNCTION sluice_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_audit_append_only();

-- Usage queries per tenant and time range.
CREATE INDEX usage_hourly_tenant_hour ON usage_hourly (tenant_id, hour);
