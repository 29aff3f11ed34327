-- Central schema f0001: the tables. Runs as integrity_admin inside schema `integrity`.

CREATE TABLE integrity.host (
    id serial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    grp text,                                   -- pinned at enrolment; NULL: as reported
    enrolled timestamptz NOT NULL DEFAULT now(),
    enrolled_by text NOT NULL DEFAULT session_user
);

-- What the central side believes about a host; written by the trigger functions
-- below and by the admin (enrol, resolve), never by the host itself.
CREATE TABLE integrity.host_state (
    host_id int PRIMARY KEY REFERENCES integrity.host(id) ON DELETE CASCADE,
    epoch int NOT NULL DEFAULT 1,               -- bumped when a fork is resolved
    forked timestamptz,
    last_seen timestamptz,
    host_time timestamp,
    interval_s int,
    reported_group text,
    version text,
    watcher jsonb,
    unpushed bigint,
    reported_seq bigint,
    reported_head text,
    head_seq bigint,                            -- NULL: the next record sets the base
    head_digest text,
    base_digest text,
    chain_rows bigint NOT NULL DEFAULT 0,
    push bigint,                                -- the newest baseline push taken
    baseline_id bigint,
    generation bigint,                          -- its sealed generation (only grows)
    root text,
    signed boolean,
    signer bytea,
    entries bigint,
    central_entries bigint,
    ledger_seq bigint,
    baseline_received timestamptz
);

-- A host's event chain, record by record, as its local ledger wrote them.
CREATE TABLE integrity.ledger (
    host_id int NOT NULL REFERENCES integrity.host(id),
    epoch int NOT NULL DEFAULT 0,
    seq bigint NOT NULL,
    time timestamp NOT NULL,
    kind text NOT NULL,
    ref bigint NOT NULL,
    content text NOT NULL,
    prev text NOT NULL,
    digest text NOT NULL,
    received timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_id, epoch, seq)
);

CREATE TABLE integrity.ledger_rejected (
    id bigserial PRIMARY KEY,
    host_id int NOT NULL REFERENCES integrity.host(id),
    epoch int NOT NULL,
    seq bigint NOT NULL,
    time timestamp,
    kind text,
    ref bigint,
    content text,
    prev text,
    digest text,
    received timestamptz NOT NULL DEFAULT now(),
    reason text NOT NULL
);
CREATE INDEX ix_ledger_rejected_host ON integrity.ledger_rejected (host_id, id);

-- The latest state of every event a host's chain carried (diffs are the redacted
-- ones the host keeps; kept texts themselves never leave the host).
CREATE TABLE integrity.event (
    uid bigserial PRIMARY KEY,
    host_id int NOT NULL REFERENCES integrity.host(id),
    epoch int NOT NULL,
    id bigint NOT NULL,
    first_seen timestamp NOT NULL,
    key bytea NOT NULL,
    kind text NOT NULL,
    changed text,
    source text,
    rule text,
    severity text NOT NULL,
    classification text,
    status text NOT NULL,
    count int,
    last_seen timestamp NOT NULL,
    old text,
    new text,
    actor text,
    approval_id bigint,
    evidence text,
    diff text,
    seq bigint NOT NULL,
    chain text NOT NULL,                        -- digest of the record of this state
    received timestamptz NOT NULL DEFAULT now(),
    UNIQUE (host_id, id, first_seen)
);
CREATE INDEX ix_event_open ON integrity.event (host_id, severity) WHERE status = 'open';
CREATE INDEX ix_event_last_seen ON integrity.event (last_seen);
CREATE INDEX ix_event_critical ON integrity.event (received) WHERE severity = 'critical';

CREATE TABLE integrity.approval (
    uid bigserial PRIMARY KEY,
    host_id int NOT NULL REFERENCES integrity.host(id),
    epoch int NOT NULL,
    id bigint NOT NULL,
    time timestamp NOT NULL,
    "user" text,
    sudo_user text,
    reason text,
    mode text,
    baseline_id bigint,
    entries bigint,
    events bigint,
    seq bigint NOT NULL,
    UNIQUE (host_id, id, time)
);

-- One row per push that changed a host's baseline copy: the whole baseline (`full`,
-- after init or a resync) or the entries changed since the previous push (`delta`),
-- with the seal they lead to.
CREATE TABLE integrity.baseline (
    host_id int NOT NULL REFERENCES integrity.host(id),
    epoch int NOT NULL DEFAULT 0,
    push bigint NOT NULL,                       -- the host's spool number: idempotency
    kind text NOT NULL CHECK (kind IN ('full', 'delta')),
    baseline_id bigint NOT NULL,
    generation bigint NOT NULL,
    activated timestamp,
    root text,
    signature bytea,
    signer bytea,
    seal_version int,
    policy_digest text,                         -- of the sealed policy
    entries bigint NOT NULL,
    changes bigint NOT NULL,
    ledger_seq bigint NOT NULL,
    host_time timestamp,
    received timestamptz NOT NULL DEFAULT now(),
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (host_id, epoch, push)
);

-- Every version of every entry a host pushed; the current copy is the rows not
-- superseded (by the transaction that pushed a newer version or a new baseline).
CREATE TABLE integrity.entry (
    host_id int NOT NULL REFERENCES integrity.host(id),
    push bigint NOT NULL,
    key bytea NOT NULL,
    removed boolean NOT NULL DEFAULT false,
    type text,
    content bytea,
    size bigint,
    mode int,
    uid bigint,
    gid bigint,
    inode bigint,
    nlink bigint,
    mtime bigint,
    ctime bigint,
    link bytea,
    xattrs bytea,
    dev bigint,
    package text,
    kept bytea,                                 -- digest of the text kept on the host
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    superseded xid8,
    -- The path and what drift compares of it (type, content, link target, mode) in 8
    -- bytes each, so that a group's current entries are compared from the narrow index
    -- below (32 bytes an entry) rather than from the table (about 300).
    key_hash bigint GENERATED ALWAYS AS (hashtextextended(encode(key, 'hex'), 0)) STORED,
    variant bigint GENERATED ALWAYS AS (hashtextextended(
        coalesce(type, '') || '/' || coalesce(encode(content, 'hex'), '') || '/'
        || coalesce(encode(link, 'hex'), '') || '/' || coalesce(mode::text, ''), 0)) STORED
);
CREATE INDEX ix_entry_current ON integrity.entry (host_id, key) WHERE superseded IS NULL;
CREATE INDEX ix_entry_drift ON integrity.entry (key_hash) INCLUDE (host_id, variant)
    WHERE superseded IS NULL;

-- A host's report of itself; folded into host_state on arrival, never stored.
CREATE TABLE integrity.heartbeat (
    host_id int NOT NULL,
    time timestamp,
    interval_s int,
    grp text,
    version text,
    watcher jsonb,
    head_seq bigint,
    head_digest text,
    unpushed bigint
);

CREATE TABLE integrity.flag (
    id bigserial PRIMARY KEY,
    host_id int NOT NULL REFERENCES integrity.host(id) ON DELETE CASCADE,
    kind text NOT NULL,
    detail text NOT NULL,
    raised timestamptz NOT NULL DEFAULT now(),
    resolved timestamptz,
    resolved_by text,
    resolution text
);
CREATE INDEX ix_flag_open ON integrity.flag (host_id) WHERE resolved IS NULL;

CREATE TABLE integrity.request (
    id bigserial PRIMARY KEY,
    host_id int NOT NULL REFERENCES integrity.host(id) ON DELETE CASCADE,
    kind text NOT NULL CHECK (kind IN ('approve', 'resync')),
    paths text[] NOT NULL DEFAULT '{}',
    "all" boolean NOT NULL DEFAULT false,
    reason text,
    requested_by text NOT NULL DEFAULT session_user,
    requested timestamptz NOT NULL DEFAULT now(),
    expires timestamptz NOT NULL,
    answered timestamptz
);
CREATE INDEX ix_request_open ON integrity.request (host_id) WHERE answered IS NULL;

CREATE TABLE integrity.request_result (
    host_id int NOT NULL REFERENCES integrity.host(id) ON DELETE CASCADE,
    request_id bigint NOT NULL REFERENCES integrity.request(id) ON DELETE CASCADE,
    time timestamp,
    outcome text NOT NULL,
    approval_id bigint,
    root text,
    detail text,
    received timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_id, request_id)
);

-- What `fleet monitor` raised and still owes to which sinks (names).
CREATE TABLE integrity.monitor_alert (
    id bigserial PRIMARY KEY,
    host_id int REFERENCES integrity.host(id) ON DELETE CASCADE,
    kind text NOT NULL,
    key text NOT NULL UNIQUE,
    created timestamptz NOT NULL DEFAULT now(),
    event jsonb NOT NULL,
    pending text[] NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX ix_monitor_alert_pending ON integrity.monitor_alert (id)
    WHERE cardinality(pending) > 0;
