-- Agent identity beyond the configured ID. Every agent process draws a
-- random incarnation when it is created and sends it with each status.
-- A row belongs to one incarnation at a time: seq orders statuses within
-- it only, and another incarnation takes the row only once the holder's
-- lease has run out (or it said goodbye). Rows written before this
-- migration, and agents built before it, have the empty incarnation.
ALTER TABLE @schema.agents ADD COLUMN incarnation text NOT NULL DEFAULT '';

-- Statuses refused because another live incarnation holds their ID: two
-- processes claim one ID. One row per rival incarnation; it counts while
-- expires_at (the lease the rival asked for) is ahead. While one counts,
-- the ID is not acknowledged and 'phasecast status' shows both.
CREATE TABLE @schema.agent_conflicts (
    id          text        NOT NULL,
    incarnation text        NOT NULL,
    service     text        NOT NULL,
    host        text        NOT NULL,
    pid         int         NOT NULL,
    version     text        NOT NULL DEFAULT '',
    seq         bigint      NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (id, incarnation)
);
