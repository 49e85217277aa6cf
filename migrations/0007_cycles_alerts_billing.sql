-- Billing cycles, quota alerts, webhooks and invoices.
--
-- A tenant's monthly quota is counted in calendar months (billing cycles)
-- in the tenant's time zone, UTC by default, both by the decision path and
-- by every report: a cycle is named by its first day (a date).

-- === Plans: the product's quotas, and prices ===

UPDATE plans SET name = 'pro' WHERE name = 'professional';
UPDATE plans SET monthly_quota = 1000000 WHERE name = 'startup';
UPDATE plans SET monthly_quota = 10000000 WHERE name = 'pro';

-- (The plan's price per cycle, monthly_price_cents, came with 0006.)
ALTER TABLE plans
    -- NULL: the monthly quota is a hard limit (requests over it are
    -- denied). Set: the quota is soft; requests over it are allowed and
    -- billed at this price per 1 000 (rounded up to a cent per cycle).
    ADD COLUMN overage_cents_per_1000 bigint
        CHECK (overage_cents_per_1000 BETWEEN 0 AND 1000000000000);

COMMENT ON COLUMN plans.monthly_quota IS
    'requests per calendar month (billing cycle, in the tenant''s time zone); NULL: no quota';

-- === Tenants: the time zone of their cycles ===

ALTER TABLE tenants
    ADD COLUMN time_zone text NOT NULL DEFAULT 'UTC'
        CHECK (time_zone <> '' AND now() AT TIME ZONE time_zone IS NOT NULL);

-- === Usage per cycle ===

-- Written beside usage_hourly, from the same minutes, so that a cycle's
-- total is exact in every time zone (an hour row may straddle a cycle's
-- start in a zone offset by half an hour).
CREATE TABLE usage_monthly (
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    domain    text NOT NULL,
    cycle     date NOT NULL CHECK (extract(day FROM cycle) = 1),
    allowed   bigint NOT NULL DEFAULT 0,
    denied    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, cycle, domain)
);

-- What the alerts and billing consumers have counted, each its own.
CREATE TABLE cycle_usage (
    consumer  text NOT NULL CHECK (consumer IN ('alerts', 'billing')),
    tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    cycle     date NOT NULL CHECK (extract(day FROM cycle) = 1),
    requests  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, tenant_id, cycle)
);

-- === Quota alerts ===

-- One row per tenant, cycle and threshold, ever: the primary key is what
-- makes an alert fire once, whichever consumer replica sees the crossing.
CREATE TABLE quota_alerts (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    cycle      date NOT NULL,
    threshold  smallint NOT NULL CHECK (threshold IN (80, 90, 100)),
    used       bigint NOT NULL,
    quota      bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, cycle, threshold)
);

-- === Webhooks ===

CREATE TABLE webhooks (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url        text NOT NULL CHECK (url ~ '^https?://'),
    -- The HMAC-SHA256 key of the signatures; needed to sign, so kept.
    secret     text NOT NULL CHECK (length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhooks_tenant ON webhooks (tenant_id);

-- One row per event and webhook: the outbox the delivery worker drains.
CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    webhook_id      uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id        uuid NOT NULL,
    body            jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    give_up_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (webhook_id, event_id)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE state = 'pending';

-- Every attempt, with the receiver's status code (NULL: no response).
CREATE TABLE webhook_attempts (
    delivery_id uuid NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    status_code integer,
    error       text,
    PRIMARY KEY (delivery_id, attempt)
);

-- Events a consumer made (quota-alerts, billing), published to the broker
-- after the transaction that made them commits.
CREATE TABLE event_outbox (
    id           uuid PRIMARY KEY,
    topic        text NOT NULL,
    routing_key  text NOT NULL,
    body         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

CREATE INDEX event_outbox_pending ON event_outbox (created_at) WHERE published_at IS NULL;

-- === Invoices ===

-- Written once when a cycle closes (its end in the tenant's time zone,
-- plus the billing consumer's grace for late events).
CREATE TABLE invoices (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    cycle       date NOT NULL,
    plan        text NOT NULL,
    requests    bigint NOT NULL,
    total_cents bigint NOT NULL,
    closed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, cycle)
);

CREATE TABLE invoice_lines (
    tenant_id        uuid NOT NULL,
    cycle            date NOT NULL,
    line             smallint NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('subscription', 'included', 'overage')),
    description      text NOT NULL,
    quantity         bigint NOT NULL,
    -- Per unit for subscription, per 1 000 requests for overage.
    unit_price_cents bigint NOT NULL,
    amount_cents     bigint NOT NULL,
    PRIMARY KEY (tenant_id, cycle, line),
    FOREIGN KEY (tenant_id, cycle) REFERENCES invoices (tenant_id, cycle) ON DELETE CASCADE
);
