-- Central schema f0002: what a host says of its baseline is checked against what the
-- central copy holds.
--
-- Entries: f0001 flagged a push under the seal already held only when the host's own
-- `changes` said entries changed: a host's role could push a delta or a whole
-- baseline under the held root, claim no change, and rewrite the central copy (what
-- `fleet drift` reads) unflagged. Only an approval (a new root) or init (a new
-- baseline) changes entries honestly; a baseline sent again (a resync, repaired spool
-- triggers) holds the same rows.
--
-- Heartbeats: a baseline re-sealed on the host with the spool's triggers dropped
-- (and its own note of what it pushed edited) was never pushed, and central kept the
-- old root unflagged. A heartbeat now names the seal the host holds; one that owes no
-- baseline change yet names another seal than the one held is flagged (once).
ALTER TABLE integrity.heartbeat ADD COLUMN root text, ADD COLUMN generation bigint;
GRANT INSERT (root, generation) ON integrity.heartbeat TO integrity_host;

-- A heartbeat: liveness, what the host says its newest chain record is, and the seal
-- of its baseline. A host that reports an older or different newest record than the
-- central copy holds was rolled back (a restored database copy), even if it sends
-- nothing new; one that owes nothing and holds another seal changed it unseen.
CREATE OR REPLACE FUNCTION integrity.heartbeat_in() RETURNS trigger
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
    ELSIF st.forked IS NULL AND st.push IS NOT NULL AND NEW.unpushed = 0
          AND NEW.root IS NOT NULL
          AND (NEW.root IS DISTINCT FROM st.root OR NEW.generation <> st.generation) THEN
        -- Nothing owed, yet not the seal held: the baseline moved behind the spool.
        reason := format('the host holds baseline root %s (generation %s) and owes no '
                         'baseline change, the central copy holds root %s (generation '
                         '%s): the baseline changed behind the spool', left(NEW.root, 16),
                         NEW.generation, left(coalesce(st.root, '-'), 16), st.generation);
        IF NOT EXISTS (SELECT 1 FROM integrity.flag WHERE host_id = NEW.host_id
                          AND kind = 'root' AND detail = reason AND resolved IS NULL) THEN
            PERFORM integrity.raise_flag(NEW.host_id, 'root', reason);
        END IF;
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

CREATE OR REPLACE FUNCTION integrity.entries_in() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g record;
    cur integrity.baseline;
    prior integrity.baseline;
    moved bigint;
    me xid8 := pg_current_xact_id();
    mine int := integrity.current_host();
BEGIN
    FOR g IN SELECT DISTINCT host_id, push FROM added WHERE host_id = mine LOOP
        SELECT * INTO cur FROM integrity.baseline
         WHERE host_id = g.host_id AND push = g.push AND xid = me;
        IF NOT FOUND THEN
            DELETE FROM integrity.entry
             WHERE host_id = g.host_id AND superseded IS NULL AND push = g.push AND xid = me;
            CONTINUE;
        END IF;
        -- Under the seal already held (baseline_in flagged a delta that said so itself):
        -- every row that is not the held row for its key, and for a whole baseline
        -- every held key it leaves out, is a change central sees for itself.
        SELECT * INTO prior FROM integrity.baseline
         WHERE host_id = g.host_id AND epoch = cur.epoch AND push < g.push
         ORDER BY push DESC LIMIT 1;
        IF FOUND AND prior.baseline_id = cur.baseline_id
           AND prior.root IS NOT DISTINCT FROM cur.root
           AND prior.generation = cur.generation
           AND NOT (cur.kind = 'delta' AND cur.changes > 0) THEN
            SELECT count(*) INTO moved
              FROM added a
              LEFT JOIN integrity.entry e
                ON e.host_id = a.host_id AND e.key = a.key AND e.superseded IS NULL
               AND e.xid <> me
             WHERE a.host_id = g.host_id AND a.push = g.push
               AND CASE WHEN e.key IS NULL THEN NOT a.removed
                        ELSE a.removed OR (a.type, a.content, a.size, a.mode, a.uid, a.gid,
                                           a.inode, a.nlink, a.mtime, a.ctime, a.link,
                                           a.xattrs, a.dev, a.package, a.kept)
                             IS DISTINCT FROM (e.type, e.content, e.size, e.mode, e.uid,
                                               e.gid, e.inode, e.nlink, e.mtime, e.ctime,
                                               e.link, e.xattrs, e.dev, e.package, e.kept)
                   END;
            IF cur.kind = 'full' THEN
                moved := moved + (SELECT count(*) FROM integrity.entry e
                                   WHERE e.host_id = g.host_id AND e.superseded IS NULL
                                     AND e.xid <> me
                                     AND NOT EXISTS (SELECT 1 FROM added a
                                                      WHERE a.host_id = g.host_id
                                                        AND a.push = g.push
                                                        AND a.key = e.key));
            END IF;
            IF moved > 0 THEN
                PERFORM integrity.raise_flag(g.host_id, 'root', format(
                    'baseline entries changed without an approval and without a new root '
                    '(%s entries, generation %s; the push said %s): the database was edited',
                    moved, cur.generation, cur.changes));
            END IF;
        END IF;
        -- Keys as arrays: the (host, key) index is probed for each, whatever the
        -- planner would guess about the size of a transition table.
        IF cur.kind = 'full' THEN
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
