-- The versioning store. "@schema" is replaced by the quoted schema name.
-- Every writer bumps the epoch row before it writes anything else, so a
-- reader holding the epoch row FOR SHARE sees a consistent state.

CREATE TABLE @schema.epoch (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    value bigint  NOT NULL
);
INSERT INTO @schema.epoch (id, value) VALUES (true, 0);

CREATE TABLE @schema.releases (
    name           text        PRIMARY KEY,
    description    text        NOT NULL DEFAULT '',
    phase          text        NOT NULL
        CHECK (phase IN ('expand', 'migrate', 'contract', 'contracting', 'complete')),
    manifest       jsonb       NOT NULL,
    digest         text        NOT NULL,
    phase_epoch    bigint      NOT NULL,
    -- epoch of the latest flip to contract: what agents must have drained
    contract_epoch bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE @schema.removals (
    release      text    NOT NULL REFERENCES @schema.releases (name) ON DELETE CASCADE,
    ordinal      int     NOT NULL,
    table_schema text    NOT NULL DEFAULT '',
    table_name   text    NOT NULL,
    columns      text[]  NOT NULL DEFAULT '{}',
    "cascade"    boolean NOT NULL DEFAULT false,
    PRIMARY KEY (release, ordinal)
);

-- The outbox: one row per accepted change, published by the broadcaster.
CREATE TABLE @schema.events (
    epoch        bigint      PRIMARY KEY,
    release      text        NOT NULL,
    from_phase   text,
    to_phase     text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX events_unpublished ON @schema.events (epoch) WHERE published_at IS NULL;

CREATE TABLE @schema.audit (
    id         bigserial   PRIMARY KEY,
    release    text        NOT NULL,
    from_phase text,
    to_phase   text        NOT NULL,
    epoch      bigint      NOT NULL,
    actor      text        NOT NULL,
    note       text        NOT NULL DEFAULT '',
    at         timestamptz NOT NULL DEFAULT now()
);

-- The agent registry. Leases are on the database clock.
CREATE TABLE @schema.agents (
    id               text        PRIMARY KEY,
    service          text        NOT NULL,
    host             text        NOT NULL,
    pid              int         NOT NULL,
    version          text        NOT NULL DEFAULT '',
    releases         text[]      NOT NULL DEFAULT '{}',
    app_name         text        NOT NULL DEFAULT '',
    seq              bigint      NOT NULL,
    applied_epoch    bigint      NOT NULL,
    drained_epoch    bigint      NOT NULL,
    inflight         bigint      NOT NULL DEFAULT 0,
    first_seen       timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz NOT NULL,
    lease_expires_at timestamptz NOT NULL
);
CREATE INDEX agents_lease ON @schema.agents (lease_expires_at);

CREATE TABLE @schema.broadcasters (
    id         text        PRIMARY KEY,
    host       text        NOT NULL,
    pid        int         NOT NULL,
    leader     boolean     NOT NULL DEFAULT false,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);
