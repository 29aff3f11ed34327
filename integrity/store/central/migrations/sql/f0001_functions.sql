-- Central schema f0001: what hosts' rows mean for their state, decided on arrival by
-- functions that run with the owner's rights (SECURITY DEFINER, fixed search_path)
-- and never trust a value the host could forge (epoch, arrival, transaction id).

-- The enrolled host behind this session (login role = host name), for RLS checks.
CREATE FUNCTION integrity.current_host() RETURNS int
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT id FROM integrity.host WHERE name = session_user
$$;

CREATE FUNCTION integrity.raise_flag(h int, k text, d text) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO integrity.flag (host_id, kind, detail) VALUES (h, k, d)
$$;

-- Mark a host forked (once: until resolved, everything it sends is held back).
CREATE FUNCTION integrity.fork(h int, why text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE integrity.host_state SET forked = now() WHERE host_id = h AND forked IS NULL;
    IF FOUND THEN
        PERFORM integrity.raise_flag(h, 'forked',
            why || ': the local database was rolled back or rewritten');
    END IF;
END $$;

-- A chain record, row by row: one the central copy holds already is dropped (a batch
-- sent again); one that contradicts a held record (same number, other digest) is kept
-- aside and forks the host. The rest is judged as a whole by ledger_chain below.
CREATE FUNCTION integrity.ledger_in() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    current_epoch int;
    held text;
    reason text;
BEGIN
    IF NEW.host_id IS DISTINCT FROM integrity.current_host() THEN
        RETURN NEW;  -- not a host's own row: row-level security refuses it (or an admin)
    END IF;
    SELECT epoch INTO current_epoch FROM integrity.host_state WHERE host_id = NEW.host_id;
    NEW.epoch := current_epoch;
    NEW.received := now();
    SELECT digest INTO held FROM integrity.ledger
     WHERE host_id = NEW.host_id AND epoch = current_epoch AND seq = NEW.seq;
    IF NOT FOUND THEN
        RETURN NEW;
    END IF;
    IF held = NEW.digest THEN
        RETURN NULL;
    END IF;
    reason := format('chain record %s is %s, the central copy holds %s', NEW.seq,
                     left(NEW.digest, 16), left(held, 16));
    INSERT INTO integrity.ledger_rejected
        (host_id, epoch, seq, time, kind, ref, content, prev, digest, reason)
    VALUES (NEW.host_id, current_epoch, NEW.seq, NEW.time, NEW.kind, NEW.ref, NEW.content,
            NEW.prev, NEW.digest, reason);
    PERFORM integrity.fork(NEW.host_id, reason);
    RETURN NULL;
END $$;

-- The new records of one INSERT, in order: accepted up to the first that does not
-- extend the chain held centrally (the first record ever, or after a resolved fork,
-- sets the base); from there on they are kept aside and the host is forked. Accepted
-- event and approval records update the current copies (the latest state of each);
-- records of owed alerts, baseline snapshots, tombstones and checkpoints only chain.
CREATE FUNCTION integrity.ledger_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    me int := integrity.current_host();
    st integrity.host_state;
    bad bigint;
    why text;
    last record;
BEGIN
    IF me IS NULL OR NOT EXISTS (SELECT 1 FROM added WHERE host_id = me) THEN
        RETURN NULL;
    END IF;
    SELECT * INTO st FROM integrity.host_state WHERE host_id = me FOR UPDATE;
    IF st.forked IS NOT NULL THEN
        SELECT min(seq) INTO bad FROM added WHERE host_id = me;
        why := 'held back: the chain forked earlier';
    ELSE
        SELECT x.seq, CASE WHEN x.rn = 1 AND x.seq <= st.head_seq THEN
                   format('chain record %s arrived after record %s', x.seq, st.head_seq)
               ELSE format('chain record %s follows %s, not %s (record %s)', x.seq,
                           left(x.prev, 16), left(coalesce(x.before, st.head_digest), 16),
                           coalesce(x.before_seq, st.head_seq)) END
          INTO bad, why
          FROM (SELECT seq, prev, row_number() OVER w AS rn, lag(digest) OVER w AS before,
                       lag(seq) OVER w AS before_seq
                  FROM added WHERE host_id = me WINDOW w AS (ORDER BY seq)) x
         WHERE (x.rn = 1 AND st.head_seq IS NOT NULL
                AND (x.seq <= st.head_seq OR x.prev <> st.head_digest))
            OR (x.rn > 1 AND x.prev <> x.before)
         ORDER BY x.seq LIMIT 1;
    END IF;
    IF bad IS NOT NULL THEN
        INSERT INTO integrity.ledger_rejected
            (host_id, epoch, seq, time, kind, ref, content, prev, digest, reason)
        SELECT host_id, epoch, seq, time, kind, ref, content, prev, digest, why
          FROM added WHERE host_id = me AND seq >= bad;
        DELETE FROM integrity.ledger l USING added a
         WHERE a.host_id = me AND a.seq >= bad
           AND l.host_id = a.host_id AND l.epoch = a.epoch AND l.seq = a.seq;
        PERFORM integrity.fork(me, why);
    END IF;
    SELECT seq, digest, prev INTO last FROM added
     WHERE host_id = me AND (bad IS NULL OR seq < bad) ORDER BY seq DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE integrity.host_state
       SET head_seq = last.seq, head_digest = last.digest,
           chain_rows = chain_rows + (SELECT count(*) FROM added
                                       WHERE host_id = me AND (bad IS NULL OR seq < bad)),
           base_digest = CASE WHEN st.head_seq IS NULL THEN
               (SELECT prev FROM added WHERE host_id = me ORDER BY seq LIMIT 1)
               ELSE base_digest END
     WHERE host_id = me;
    -- Each record's JSON is parsed once (jsonb_to_record), not once per field.
    INSERT INTO integrity.event AS e
        (host_id, epoch, id, first_seen, key, kind, changed, source, rule, severity,
         classification, status, count, last_seen, old, new, actor, approval_id,
         evidence, diff, seq, chain)
    SELECT DISTINCT ON (c.id, c.first_seen)
           me, a.epoch, c.id, c.first_seen, decode(c.key, 'hex'), c.kind, c.changed,
           c.source, c.rule, c.severity, c.classification, c.status, c.count, a.time,
           c.old, c.new, c.actor, c.approval_id, c.evidence, c.diff, a.seq, a.digest
      FROM added a,
           jsonb_to_record(a.content::jsonb) AS c(
               id bigint, first_seen timestamp, key text, kind text, changed text,
               source text, rule text, severity text, classification text, status text,
               count int, old text, new text, actor text, approval_id bigint,
               evidence text, diff text)
     WHERE a.host_id = me AND a.kind = 'event' AND (bad IS NULL OR a.seq < bad)
       AND c.id IS NOT NULL AND c.first_seen IS NOT NULL  -- not a tombstone
     ORDER BY c.id, c.first_seen, a.seq DESC
    ON CONFLICT (host_id, id, first_seen) DO UPDATE SET
        kind = EXCLUDED.kind, changed = EXCLUDED.changed, source = EXCLUDED.source,
        rule = EXCLUDED.rule, severity = EXCLUDED.severity,
        classification = EXCLUDED.classification, status = EXCLUDED.status,
        count = EXCLUDED.count, last_seen = EXCLUDED.last_seen, old = EXCLUDED.old,
        new = EXCLUDED.new, actor = EXCLUDED.actor, approval_id = EXCLUDED.approval_id,
        evidence = EXCLUDED.evidence, diff = EXCLUDED.diff, seq = EXCLUDED.seq,
        chain = EXCLUDED.chain, epoch = EXCLUDED.epoch
    WHERE e.epoch < EXCLUDED.epoch OR e.seq < EXCLUDED.seq;
    INSERT INTO integrity.approval
        (host_id, epoch, id, time, "user", sudo_user, reason, mode, baseline_id, entries,
         events, seq)
    SELECT me, a.epoch, c.id, c.time, c."user", c.sudo_user, c.reason, c.mode,
           c.baseline_id, c.entries, c.events, a.seq
      FROM added a,
           jsonb_to_record(a.content::jsonb) AS c(
               id bigint, time timestamp, "user" text, sudo_user text, reason text,
               mode text, baseline_id bigint, entries bigint, events bigint)
     WHERE a.host_id = me AND a.kind = 'approval' AND (bad IS NULL OR a.seq < bad)
       AND c.id IS NOT NULL AND c.time IS NOT NULL
    ON CONFLICT (host_id, id, time) DO NOTHING;
    RETURN NULL;
END $$;

-- A heartbeat: liveness and what the host says its newest chain record is. A host
-- that reports an older or different newest record than the central copy holds was
-- rolled back (a restored database copy), even if it sends nothing new.
CREATE FUNCTION integrity.heartbeat_in() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st integrity.host_state;
    reason text;
BEGIN
    IF NEW.host_id IS DISTINCT FROM integrity.current_host() THEN
        RETURN NEW;  -- not a host's own row: row-level security refuses it (or an admin)
    END IF;
    SELECT * INTO st FROM integrity.host_state WHERE host_id = NEW.host_id FOR UPDATE;
    IF st.forked IS NULL AND st.head_seq IS NOT NULL AND NEW.head_seq IS NOT NULL THEN
        IF NEW.head_seq < st.head_seq THEN
            reason := format('the host reports chain record %s as its newest, the central '
                             'copy holds records up to %s', NEW.head_seq, st.head_seq);
        ELSIF NEW.head_seq = st.head_seq AND NEW.head_digest IS DISTINCT FROM st.head_digest
        THEN
            reason := format('the host''s chain record %s is %s, the central copy holds %s',
                             NEW.head_seq, left(NEW.head_digest, 16),
                             left(st.head_digest, 16));
        END IF;
    END IF;
    IF reason IS NOT NULL THEN
        PERFORM integrity.fork(NEW.host_id, reason);
    END IF;
    UPDATE integrity.host_state
       SET last_seen = now(), host_time = NEW.time, interval_s = NEW.interval_s,
           reported_group = NEW.grp, version = NEW.version, watcher = NEW.watcher,
           unpushed = NEW.unpushed, reported_seq = NEW.head_seq,
           reported_head = NEW.head_digest,
           head_seq = CASE WHEN st.head_seq IS NULL AND st.forked IS NULL
                           THEN NEW.head_seq ELSE head_seq END,
           head_digest = CASE WHEN st.head_seq IS NULL AND st.forked IS NULL
                              THEN NEW.head_digest ELSE head_digest END,
           base_digest = CASE WHEN st.head_seq IS NULL AND st.forked IS NULL
                              THEN NEW.head_digest ELSE base_digest END
     WHERE host_id = NEW.host_id;
    RETURN NULL;
END $$;

-- A baseline push (its entries follow in the same transaction). The sealed generation
-- only grows: an older one forks the host (rolled back). A root or generation that
-- moved without an approval record and a chained snapshot of this very baseline
-- naming that root (both since the previous push), entries that changed under an
-- unchanged seal, or a baseline replaced by init, are flagged.
CREATE FUNCTION integrity.baseline_in() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st integrity.host_state;
    held integrity.baseline;
    approved boolean;
BEGIN
    IF NEW.host_id IS DISTINCT FROM integrity.current_host() THEN
        RETURN NEW;  -- not a host's own row: row-level security refuses it (or an admin)
    END IF;
    SELECT * INTO st FROM integrity.host_state WHERE host_id = NEW.host_id FOR UPDATE;
    NEW.epoch := st.epoch;
    NEW.received := now();
    NEW.xid := pg_current_xact_id();
    SELECT * INTO held FROM integrity.baseline
     WHERE host_id = NEW.host_id AND epoch = st.epoch AND push = NEW.push;
    IF FOUND THEN
        IF held.kind = NEW.kind AND held.baseline_id = NEW.baseline_id
           AND held.root IS NOT DISTINCT FROM NEW.root
           AND held.generation = NEW.generation THEN
            RETURN NULL;  -- sent again
        END IF;
        PERFORM integrity.fork(NEW.host_id, format(
            'baseline push %s has root %s (generation %s), the central copy holds %s '
            '(generation %s)', NEW.push, left(coalesce(NEW.root, '-'), 16), NEW.generation,
            left(coalesce(held.root, '-'), 16), held.generation));
        RETURN NULL;
    END IF;
    IF st.forked IS NOT NULL THEN
        RETURN NULL;
    END IF;
    IF st.push IS NOT NULL AND NEW.push < st.push THEN
        PERFORM integrity.fork(NEW.host_id, format(
            'baseline push %s is older than push %s held centrally', NEW.push, st.push));
        RETURN NULL;
    END IF;
    IF st.generation IS NOT NULL AND NEW.generation < st.generation THEN
        PERFORM integrity.fork(NEW.host_id, format(
            'baseline generation %s is older than generation %s held centrally',
            NEW.generation, st.generation));
        RETURN NULL;
    END IF;
    IF st.push IS NOT NULL THEN
        approved := EXISTS (
                SELECT 1 FROM integrity.ledger l
                 WHERE l.host_id = NEW.host_id AND l.epoch = st.epoch
                   AND l.seq > coalesce(st.ledger_seq, -1) AND l.seq <= NEW.ledger_seq
                   AND l.kind = 'approval')
            AND EXISTS (
                SELECT 1 FROM integrity.ledger l
                 WHERE l.host_id = NEW.host_id AND l.epoch = st.epoch
                   AND l.seq > coalesce(st.ledger_seq, -1) AND l.seq <= NEW.ledger_seq
                   AND l.kind = 'baseline' AND l.ref = NEW.baseline_id
                   AND l.content::jsonb ->> 'root' = NEW.root
                   AND l.content::jsonb ->> 'generation' = NEW.generation::text);
        IF NEW.kind = 'full' AND NEW.baseline_id <> st.baseline_id THEN
            PERFORM integrity.raise_flag(NEW.host_id, 'replaced', format(
                'baseline replaced without an approval (init --force): root %s -> %s, '
                'generation %s -> %s, %s entries', left(coalesce(st.root, '-'), 16),
                left(coalesce(NEW.root, '-'), 16), st.generation, NEW.generation,
                NEW.entries));
        ELSIF (NEW.root IS DISTINCT FROM st.root OR NEW.generation <> st.generation)
              AND NOT approved THEN
            PERFORM integrity.raise_flag(NEW.host_id, 'root', format(
                'baseline root changed without an approval: %s -> %s (generation %s -> '
                '%s, %s entries changed)', left(coalesce(st.root, '-'), 16),
                left(coalesce(NEW.root, '-'), 16), st.generation, NEW.generation,
                NEW.changes));
        ELSIF NEW.kind = 'delta' AND NEW.changes > 0 AND NEW.root IS NOT DISTINCT FROM st.root
        THEN
            PERFORM integrity.raise_flag(NEW.host_id, 'root', format(
                'baseline entries changed without an approval and without a new root '
                '(%s entries, generation %s): the database was edited', NEW.changes,
                NEW.generation));
        END IF;
    END IF;
    UPDATE integrity.host_state
       SET push = NEW.push, baseline_id = NEW.baseline_id, generation = NEW.generation,
           root = NEW.root, signed = NEW.signature IS NOT NULL, signer = NEW.signer,
           entries = NEW.entries, ledger_seq = NEW.ledger_seq, baseline_received = now()
     WHERE host_id = NEW.host_id;
    RETURN NEW;
END $$;

-- Entries of one INSERT statement: kept only when their baseline push was accepted in
-- this very transaction; they supersede the versions they replace (a full push
-- replaces the whole copy), and removals are closed at once.
CREATE FUNCTION integrity.entries_in() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g record;
    gk text;
    me xid8 := pg_current_xact_id();
    mine int := integrity.current_host();
BEGIN
    FOR g IN SELECT DISTINCT host_id, push FROM added WHERE host_id = mine LOOP
        SELECT kind INTO gk FROM integrity.baseline
         WHERE host_id = g.host_id AND push = g.push AND xid = me;
        IF NOT FOUND THEN
            DELETE FROM integrity.entry
             WHERE host_id = g.host_id AND superseded IS NULL AND push = g.push AND xid = me;
            CONTINUE;
        END IF;
        -- Keys as arrays: the (host, key) index is probed for each, whatever the
        -- planner would guess about the size of a transition table.
        IF gk = 'full' THEN
            UPDATE integrity.entry SET superseded = me
             WHERE host_id = g.host_id AND superseded IS NULL AND xid <> me;
        ELSE
            UPDATE integrity.entry SET superseded = me
             WHERE host_id = g.host_id AND superseded IS NULL AND xid <> me
               AND key = ANY (ARRAY(SELECT key FROM added
                                     WHERE host_id = g.host_id AND push = g.push));
        END IF;
        UPDATE integrity.entry SET superseded = me
         WHERE host_id = g.host_id AND superseded IS NULL AND xid = me AND push = g.push
           AND removed
           AND key = ANY (ARRAY(SELECT key FROM added
                                 WHERE host_id = g.host_id AND push = g.push AND removed));
        UPDATE integrity.host_state
           SET central_entries = (SELECT count(*) FROM integrity.entry
                                   WHERE host_id = g.host_id AND superseded IS NULL)
         WHERE host_id = g.host_id;
    END LOOP;
    RETURN NULL;
END $$;

-- A host's answer to a request: once, and only to its own request.
CREATE FUNCTION integrity.result_in() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.host_id IS DISTINCT FROM integrity.current_host() THEN
        RETURN NEW;  -- not a host's own row: row-level security refuses it (or an admin)
    END IF;
    IF EXISTS (SELECT 1 FROM integrity.request_result
                WHERE host_id = NEW.host_id AND request_id = NEW.request_id)
       OR NOT EXISTS (SELECT 1 FROM integrity.request
                       WHERE id = NEW.request_id AND host_id = NEW.host_id) THEN
        RETURN NULL;
    END IF;
    NEW.received := now();
    UPDATE integrity.request SET answered = now() WHERE id = NEW.request_id;
    RETURN NEW;
END $$;

CREATE TRIGGER ledger_in BEFORE INSERT ON integrity.ledger
    FOR EACH ROW EXECUTE FUNCTION integrity.ledger_in();
CREATE TRIGGER ledger_chain AFTER INSERT ON integrity.ledger
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION integrity.ledger_chain();
CREATE TRIGGER heartbeat_in BEFORE INSERT ON integrity.heartbeat
    FOR EACH ROW EXECUTE FUNCTION integrity.heartbeat_in();
CREATE TRIGGER baseline_in BEFORE INSERT ON integrity.baseline
    FOR EACH ROW EXECUTE FUNCTION integrity.baseline_in();
CREATE TRIGGER entries_in AFTER INSERT ON integrity.entry
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION integrity.entries_in();
CREATE TRIGGER result_in BEFORE INSERT ON integrity.request_result
    FOR EACH ROW EXECUTE FUNCTION integrity.result_in();
