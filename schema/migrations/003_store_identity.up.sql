-- The store's identity: a random id created once, by the migration that
-- creates this table, and never changed. The broadcaster sends it in every
-- state and drops statuses that name another store: the status queue is
-- named by the exchange prefix alone and outlives a store dropped and
-- migrated again, so it may still hold an earlier run's statuses.
CREATE TABLE @schema.store_identity (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    store_id text    NOT NULL CHECK (store_id <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO @schema.store_identity (store_id) VALUES (gen_random_uuid()::text);
