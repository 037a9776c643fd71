-- Written to be re-run over a store that has it (every statement checks
-- or replaces), so a store whose migration record lost it migrates again.
-- Who may acknowledge. Each agent process draws a random 32-byte token
-- with its incarnation and sends it with every status (wire v2). A row is
-- bound to one incarnation and the SHA-256 of its token: only a status
-- carrying that token changes the row (ack, heartbeat, goodbye, seq,
-- lease). A row is created, or taken over once its lease is over, only by
-- a sender whose principal (the broker user that published the status, or
-- the database role that called agent_sync) is allowed for the agent's
-- service: vouched_by names it. Rows written before this migration have no
-- token: no status can change them, and they expire with their lease.
ALTER TABLE @schema.agents ADD COLUMN IF NOT EXISTS token_sha256 bytea;
ALTER TABLE @schema.agents ADD COLUMN IF NOT EXISTS vouched_by text NOT NULL DEFAULT '';

-- The principals allowed to enrol agents of a service ('*': any service).
-- 'phasecast agents allow' and 'deny' write it, audited in access_audit.
CREATE TABLE IF NOT EXISTS @schema.principals (
    service  text        NOT NULL CHECK (service <> ''),
    kind     text        NOT NULL CHECK (kind IN ('amqp', 'db')),
    name     text        NOT NULL CHECK (name <> ''),
    added_by text        NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, kind, name)
);

-- Operators' changes to who may acknowledge: allow, deny, forget.
CREATE TABLE IF NOT EXISTS @schema.access_audit (
    id      bigserial   PRIMARY KEY,
    action  text        NOT NULL CHECK (action IN ('allow', 'deny', 'forget')),
    subject text        NOT NULL,
    detail  text        NOT NULL DEFAULT '',
    actor   text        NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);

-- principal_allowed reports whether principal ($1: 'amqp:<user>' or
-- 'db:<role>') may enrol agents of service $2.
CREATE OR REPLACE FUNCTION @schema.principal_allowed(text, text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM @schema.principals p
                   WHERE p.kind || ':' || p.name = $1 AND p.service IN ('*', $2))
$$;

-- record_agents is the one definition of which statuses the store records,
-- as migration 010 redefines it (the token check only; the rule is this).
-- for the broadcaster's batches and agent_sync alike. batch is a JSON array
-- of wire statuses, each with its token (hex) and the principal that sent
-- it; lease_ms the lease; any_principal skips the principal check (a
-- broadcaster run with --insecure). It holds the epoch row FOR SHARE, taken
-- first, so a flip is ordered before or after the whole batch, and returns
-- the epoch with what it did: kept and conflicts as [{agent_id,
-- incarnation}], refused as [{agent_id, incarnation, reason}].
--
-- A status is recorded when
--   (a) it comes from the row's incarnation with the row's token and a
--       newer seq, at most 2^40 ahead (a far-future seq is refused, so no
--       one can park a row at the top), or
--   (b) it enrols: its agent has no row, or the row's lease is over and
--       the status comes from another incarnation, and its sender's
--       principal is allowed for the status's service (and for the row's,
--       so one service cannot take over another's dead ID). The row is
--       then bound to its incarnation, token hash and principal.
-- Another incarnation while the row is live, from a principal allowed for
-- the row's service, is a conflict, kept in agent_conflicts (two processes
-- claim one ID). Anything else is refused and changes nothing: no token,
-- the wrong token, a principal not allowed. A replay (the right token, a
-- seq not newer) is neither recorded nor refused.
--
-- The lease never moves earlier than one already granted, whatever lease
-- this status asks for; only a goodbye (leaving) ends it at once.
--
-- candidate picks one status per agent from the snapshot the statement
-- reads, since ON CONFLICT cannot touch a row twice; the ON CONFLICT WHERE
-- decides again on the row as locked, so concurrent writers cannot both
-- take it.
CREATE OR REPLACE FUNCTION @schema.record_agents(batch jsonb, lease_ms bigint, any_principal boolean,
    OUT epoch bigint, OUT kept json, OUT conflicts json, OUT refused json)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    SELECT e.value INTO epoch FROM @schema.epoch e FOR SHARE;
    WITH
    s AS (
        SELECT s.agent_id, COALESCE(s.incarnation, '') AS incarnation, s.service, s.host, s.pid, s.version,
               s.releases, s.app_name, s.seq, s.applied_epoch, s.drained_epoch, s.inflight,
               COALESCE(s.leaving, false) AS leaving, COALESCE(s.principal, '') AS principal,
               CASE WHEN s.token ~ '^[0-9a-f]{64}$' THEN sha256(decode(s.token, 'hex')) END AS token_sha256,
               CASE WHEN s.leaving THEN now() ELSE now() + lease_ms * interval '1 millisecond' END AS expires_at,
               a.incarnation AS holder, a.seq AS holder_seq, a.lease_expires_at > now() AS holder_live,
               a.token_sha256 AS holder_token, a.service AS holder_service
        FROM jsonb_to_recordset(batch) AS s(agent_id text, incarnation text, service text, host text, pid int, version text,
            releases jsonb, app_name text, seq bigint, applied_epoch bigint, drained_epoch bigint, inflight bigint,
            leaving boolean, token text, principal text)
        LEFT JOIN @schema.agents a ON a.id = s.agent_id
    ),
    x AS (
        SELECT s.*,
            CASE
            WHEN s.incarnation = s.holder AND s.token_sha256 = s.holder_token THEN
                CASE WHEN s.seq <= s.holder_seq THEN 'replay'
                     WHEN s.seq - s.holder_seq > (1::bigint << 40) THEN 'seq_bound'
                     ELSE 'own' END
            WHEN s.token_sha256 IS NULL OR s.incarnation = ''
              OR NOT (any_principal OR (@schema.principal_allowed(s.principal, s.service)
                                        AND (s.holder IS NULL OR @schema.principal_allowed(s.principal, s.holder_service))))
                THEN 'unauthenticated'
            WHEN s.holder IS NULL OR (NOT s.holder_live AND s.incarnation <> s.holder) THEN 'enrol'
            WHEN s.holder_live AND s.incarnation <> s.holder THEN 'conflict'
            ELSE 'unauthenticated'
            END AS verdict
        FROM s
    ),
    candidate AS (
        SELECT DISTINCT ON (agent_id) * FROM x
        WHERE verdict IN ('own', 'enrol')
        ORDER BY agent_id, verdict = 'own' DESC, seq DESC
    ),
    recorded AS (
        INSERT INTO @schema.agents AS a (id, incarnation, service, host, pid, version, releases, app_name, seq,
            applied_epoch, drained_epoch, inflight, last_seen, lease_expires_at, token_sha256, vouched_by)
        SELECT agent_id, incarnation, service, host, pid, version,
               ARRAY(SELECT jsonb_array_elements_text(COALESCE(releases, '[]'))), COALESCE(app_name, ''), seq,
               applied_epoch, drained_epoch, inflight, now(), expires_at, token_sha256, principal
        FROM candidate
        ON CONFLICT (id) DO UPDATE SET
            incarnation = EXCLUDED.incarnation, service = EXCLUDED.service, host = EXCLUDED.host, pid = EXCLUDED.pid,
            version = EXCLUDED.version, releases = EXCLUDED.releases, app_name = EXCLUDED.app_name, seq = EXCLUDED.seq,
            applied_epoch = EXCLUDED.applied_epoch, drained_epoch = EXCLUDED.drained_epoch,
            inflight = EXCLUDED.inflight, last_seen = EXCLUDED.last_seen,
            lease_expires_at = CASE WHEN EXCLUDED.lease_expires_at <= now() THEN EXCLUDED.lease_expires_at
                                    ELSE GREATEST(a.lease_expires_at, EXCLUDED.lease_expires_at) END,
            token_sha256 = EXCLUDED.token_sha256,
            -- The row's own statuses keep the principal that enrolled it.
            vouched_by = CASE WHEN a.incarnation = EXCLUDED.incarnation THEN a.vouched_by ELSE EXCLUDED.vouched_by END
        WHERE (a.incarnation = EXCLUDED.incarnation AND a.token_sha256 = EXCLUDED.token_sha256
               AND a.seq < EXCLUDED.seq AND EXCLUDED.seq - a.seq <= (1::bigint << 40))
           OR (a.incarnation <> EXCLUDED.incarnation AND a.lease_expires_at <= now()
               AND (any_principal OR @schema.principal_allowed(EXCLUDED.vouched_by, a.service)))
        RETURNING a.id, a.incarnation, a.lease_expires_at > now() AS live
    ),
    rivals AS (
        INSERT INTO @schema.agent_conflicts AS c (id, incarnation, service, host, pid, version, seq, last_seen, expires_at)
        SELECT x.agent_id, x.incarnation, x.service, x.host, x.pid, COALESCE(x.version, ''), x.seq, now(), x.expires_at
        FROM x LEFT JOIN recorded r ON r.id = x.agent_id
        WHERE x.verdict IN ('enrol', 'conflict')
          AND x.incarnation <> COALESCE(r.incarnation, x.holder) AND COALESCE(r.live, x.holder_live)
        ON CONFLICT (id, incarnation) DO UPDATE SET
            service = EXCLUDED.service, host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version,
            seq = EXCLUDED.seq, last_seen = EXCLUDED.last_seen,
            expires_at = CASE WHEN EXCLUDED.expires_at <= now() THEN EXCLUDED.expires_at
                              ELSE GREATEST(c.expires_at, EXCLUDED.expires_at) END
        WHERE c.seq < EXCLUDED.seq
        RETURNING c.id, c.incarnation
    ),
    -- An incarnation that now holds its row is nobody's rival any more.
    settled AS (
        DELETE FROM @schema.agent_conflicts c USING recorded r WHERE c.id = r.id AND c.incarnation = r.incarnation
    )
    SELECT COALESCE((SELECT json_agg(json_build_object('agent_id', id, 'incarnation', incarnation)) FROM recorded), '[]'),
           COALESCE((SELECT json_agg(json_build_object('agent_id', id, 'incarnation', incarnation)) FROM rivals), '[]'),
           COALESCE((SELECT json_agg(json_build_object('agent_id', agent_id, 'incarnation', incarnation, 'reason', verdict))
                     FROM x WHERE verdict IN ('unauthenticated', 'seq_bound')), '[]')
    INTO kept, conflicts, refused;
END
$$;
REVOKE ALL ON FUNCTION @schema.record_agents(jsonb, bigint, boolean) FROM PUBLIC;

-- agent_state is the whole current state as JSON {epoch, store_id,
-- releases: [{name, phase, removals: [{table, columns}]}]}, releases by
-- name. Removals keep the manifest's spelling of the table
-- ("nova.instances"), which is how services name it. One statement, so one
-- snapshot: the releases match the epoch. It is what agents read, and a
-- stable interface: services' roles may execute it (docs/SECURITY.md).
CREATE OR REPLACE FUNCTION @schema.agent_state() RETURNS json
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT json_build_object(
        'epoch', (SELECT value FROM @schema.epoch),
        'store_id', (SELECT store_id FROM @schema.store_identity),
        'releases', COALESCE((
            SELECT json_agg(json_build_object('name', r.name, 'phase', r.phase, 'removals', r.removals) ORDER BY r.name)
            FROM (SELECT r.name, r.phase,
                         COALESCE(json_agg(json_build_object(
                             'table', CASE WHEN rm.table_schema = '' THEN rm.table_name ELSE rm.table_schema || '.' || rm.table_name END,
                             'columns', rm.columns) ORDER BY rm.ordinal) FILTER (WHERE rm.release IS NOT NULL), '[]') AS removals
                  FROM @schema.releases r
                  LEFT JOIN @schema.removals rm ON rm.release = r.name
                  GROUP BY r.name, r.phase) r), '[]'))
$$;

-- agent_digest is the digest of the current state as the last change
-- wrote it (wire.State.Digest), NULL before any change wrote one.
CREATE OR REPLACE FUNCTION @schema.agent_digest() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT state_digest FROM @schema.epoch
$$;

-- agent_sync is an agent's path to the truth without the broker, for a
-- service's role that has no privilege on any table: in one transaction,
-- under the epoch row FOR SHARE, it reads the state and records status
-- (a wire status; any token or principal in it is ignored) with token and
-- the caller's role as principal ('db:' || session_user), by
-- record_agents' rule: so a role can change only rows whose token it holds,
-- and enrol only agents of services it is allowed for. It returns
-- {state, kept, conflict, refused (the reason, or null), holder:
-- {incarnation, host, pid, seq, live}}.
CREATE OR REPLACE FUNCTION @schema.agent_sync(status jsonb, token bytea, lease_ms bigint) RETURNS json
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st json;
    rec record;
    holder json;
    agent text := status->>'agent_id';
BEGIN
    -- A client cannot leave this transaction idle: it is one statement.
    PERFORM 1 FROM @schema.epoch FOR SHARE;
    st := @schema.agent_state();
    SELECT * INTO rec FROM @schema.record_agents(
        jsonb_build_array((status - 'token' - 'principal') || jsonb_build_object(
            'token', encode(token, 'hex'), 'principal', 'db:' || session_user)),
        lease_ms, false);
    -- The holder is shown to a rival (allowed for the service) and to the
    -- holder's own replay (it carried the token); never to a refused status.
    IF json_array_length(rec.kept) = 0 AND (json_array_length(rec.conflicts) > 0 OR json_array_length(rec.refused) = 0) THEN
        SELECT json_build_object('incarnation', a.incarnation, 'host', a.host, 'pid', a.pid, 'seq', a.seq,
                                 'live', a.lease_expires_at > now())
        INTO holder FROM @schema.agents a WHERE a.id = agent;
    END IF;
    RETURN json_build_object(
        'state', st,
        'kept', json_array_length(rec.kept) > 0,
        'conflict', json_array_length(rec.conflicts) > 0,
        'refused', (SELECT r->>'reason' FROM json_array_elements(rec.refused) r LIMIT 1),
        'holder', holder);
END
$$;

-- Functions are executable by PUBLIC unless revoked: only the grants in
-- docs/SECURITY.md give them to services' roles.
REVOKE ALL ON FUNCTION @schema.principal_allowed(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema.agent_state() FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema.agent_digest() FROM PUBLIC;
REVOKE ALL ON FUNCTION @schema.agent_sync(jsonb, bytea, bigint) FROM PUBLIC;
