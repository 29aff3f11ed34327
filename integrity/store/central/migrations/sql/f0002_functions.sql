-- Central schema f0002: entries pushed under the seal central already holds are
-- compared with the copy it holds, not taken on the host's word.
--
-- f0001 flagged such a push only when the host's own `changes` said entries changed:
-- a host's role could push a delta or a whole baseline under the held root, claim no
-- change, and rewrite the central copy (what `fleet drift` reads) unflagged. Only an
-- approval (a new root) or init (a new baseline) changes entries honestly; a baseline
-- sent again (a resync, repaired spool triggers) holds the same rows.

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
