-- The event stream's consumers (`sluice consume ...`) record the id of
-- every event they apply, in the transaction that applies it: a redelivered
-- event finds its id and changes nothing. Keyed by consumer, since several
-- consumers (usage, billing, alerts) apply the same event each once.
CREATE TABLE applied_events (
    consumer   text NOT NULL CHECK (consumer <> ''),
    id         uuid NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, id)
);

-- For pruning: ids older than any redelivery can be deleted
-- (DELETE FROM applied_events WHERE applied_at < now() - interval '30 days').
CREATE INDEX applied_events_applied_at ON applied_events (applied_at);
