"""Database schema as SQLAlchemy Core tables (the store writes rows in bulk, not ORM objects).

Types are portable (no SQLite-only types) so the same schema runs on PostgreSQL.
Times are naive UTC datetimes; mtime/ctime are integer nanoseconds.
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, Column, DateTime, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Table, Text)

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

#: One baseline generation. Exactly one is `active`; `init` retires it, fills a
#: `building` one and activates it in a single transaction, so a crash never leaves a
#: half baseline in force. `building`/`retired` rows left by older versions (which
#: committed batch by batch) are swept on the next init.
baseline = Table(
    "baseline", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("state", String(16), nullable=False),
    Column("created", DateTime, nullable=False),
    Column("activated", DateTime),
    Column("policy_source", Text, nullable=False),
    Column("policy_digest", String(64), nullable=False),
    Column("entries", Integer, nullable=False, default=0),
    Column("root", String(64)),
    Column("actor", String(128)),
    Column("signature", LargeBinary),
    # Grows by one with every init and approval: sealed, so a rolled-back database
    # shows against a kept root.
    Column("generation", Integer, nullable=False, server_default="1"),
    # The sealed part of the policy (policy/sealed.py) the baseline is verified with.
    Column("policy", Text),
    # The raw Ed25519 public key that made `signature`, so a pinned fingerprint can
    # be checked whatever key file the host holds.
    Column("signer", LargeBinary),
    Column("seal_version", Integer, nullable=False, server_default="1"),
)

#: One recorded path. `key` is the path with '/' stored as NUL (paths.to_key), so
#: primary-key order is depth-first walk order.
entry = Table(
    "entry", metadata,
    Column("baseline_id", Integer, ForeignKey("baseline.id", ondelete="CASCADE"),
           primary_key=True),
    Column("key", LargeBinary, primary_key=True),
    Column("type", String(8), nullable=False),
    Column("content", LargeBinary),
    Column("size", BigInteger, nullable=False),
    Column("mode", Integer, nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("gid", BigInteger, nullable=False),
    Column("inode", BigInteger, nullable=False),
    Column("nlink", BigInteger, nullable=False),
    Column("mtime", BigInteger, nullable=False),
    Column("ctime", BigInteger, nullable=False),
    Column("link", LargeBinary),
    Column("xattrs", LargeBinary),
    Column("dev", BigInteger, nullable=False),
    # Which package installed the path when it was recorded (dpkg/rpm), so that its
    # later removal can be explained by that package's removal or upgrade only.
    Column("package", String(255)),
    # The digest of the text kept for it (the content table), when one is kept.
    Column("kept", LargeBinary),
    # In SQLite the table is the primary key's B-tree: a rowid table kept every key
    # twice, in the rows and in the key's index (migration 0012).
    sqlite_with_rowid=False,
)

#: Entry columns in FileRecord field order (after baseline_id).
ENTRY_COLUMNS = ("key", "type", "content", "size", "mode", "uid", "gid", "inode",
                 "nlink", "mtime", "ctime", "link", "xattrs", "dev")

#: Every init / verify run, so history and status can build on it.
run = Table(
    "run", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("command", String(16), nullable=False),
    Column("started", DateTime, nullable=False),
    Column("finished", DateTime),
    Column("baseline_id", Integer),
    Column("paths", Text),
    Column("fast", Integer, nullable=False, default=0),
    Column("scanned", Integer, nullable=False, default=0),
    Column("added", Integer, nullable=False, default=0),
    Column("removed", Integer, nullable=False, default=0),
    Column("modified", Integer, nullable=False, default=0),
    Column("errors", Integer, nullable=False, default=0),
    Column("exit_code", Integer),
    Index("ix_run_started", "started"),
)

#: A change seen at a time by a source. While open, later sightings of the same path
#: update this row (count, last_seen, latest state) instead of adding rows.
event = Table(
    "event", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", LargeBinary, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("changed", Text, nullable=False),
    Column("source", String(16), nullable=False),
    Column("rule", Text),
    Column("severity", String(16), nullable=False),
    Column("classification", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("count", Integer, nullable=False),
    Column("first_seen", DateTime, nullable=False),
    Column("last_seen", DateTime, nullable=False),
    Column("old", Text),
    Column("new", Text),
    Column("actor", Text),
    Column("approval_id", Integer, ForeignKey("approval.id")),
    Column("evidence", String(32)),
    # A modification of a kept text: the unified diff, baseline -> live, redacted.
    Column("diff", Text),
    # The maintenance window a change was expected in (0008; ledger.py leaves it out
    # of the snapshot while it is NULL, so rows chained before it still match).
    Column("window_id", Integer),
    Index("ix_event_status_key", "status", "key"),
    Index("ix_event_last_seen", "last_seen"),
)

#: The act that moved the current state of paths into the baseline.
approval = Table(
    "approval", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", DateTime, nullable=False),
    Column("user", String(128), nullable=False),
    Column("sudo_user", String(128)),
    Column("reason", Text),
    Column("mode", String(32), nullable=False),
    Column("baseline_id", Integer, nullable=False),
    Column("entries", Integer, nullable=False),
    Column("events", Integer, nullable=False),
)

#: Liveness of running watchers: `status` calls one stale when its heartbeat is old.
watcher = Table(
    "watcher", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started", DateTime, nullable=False),
    Column("heartbeat", DateTime, nullable=False),
    Column("interval", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("watches", Integer, nullable=False),
    Column("unwatched", Text),
    # inotify queue overflows this watcher lived through (0008): the sum over all
    # rows only grows, which is what a Prometheus counter needs.
    Column("overflows", Integer, nullable=False, server_default="0"),
)

#: Append-only hash chain over every state an event or approval row has had: each
#: row carries the digest of its predecessor. A deleted or edited event breaks it.
ledger = Table(
    "ledger", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("time", DateTime, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("ref", Integer, nullable=False),
    Column("content", Text, nullable=False),
    Column("prev", String(64), nullable=False),
    Column("digest", String(64), nullable=False),
    # 0008: a row's own records, for ledger.journaled() (windows honoured per change).
    Index("ix_ledger_kind_ref", "kind", "ref"),
)

#: Texts kept for diffs and restore, by the BLAKE3 digest of the stored text (which
#: is the file's own digest unless values were redacted), zlib-compressed. Rows no
#: entry names any more are deleted when a baseline is written or approved.
content = Table(
    "content", metadata,
    Column("digest", LargeBinary, primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False),
    Column("redacted", Integer, nullable=False),
)

#: Chain rows removed by pruning, in chain order (`seq`), each with what proves its
#: digest: the digest of its content (rows chained since 0013) or the content itself
#: (rows chained before). A head kept off the host before a prune is an ancestor only
#: through rows that hash to it. Rows of 0008 (a digest alone, seq NULL) prove nothing.
ledger_archive = Table(
    "ledger_archive", metadata,
    Column("digest", String(64), primary_key=True),
    Column("seq", Integer),
    Column("kind", String(16)),
    Column("ref", Integer),
    Column("prev", String(64)),
    Column("content_digest", LargeBinary),
    Column("content", Text),
    Index("ix_ledger_archive_seq", "seq", unique=True),
)

#: Alerts not yet delivered: one row per (sink, event), written in the transaction
#: that records the event, deleted once the sink took it. A webhook outage or a
#: restart loses nothing; `attempts` and `last_error` let status name a failing sink.
outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sink", String(255), nullable=False),
    Column("event_id", Integer, nullable=False),
    Column("created", DateTime, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt", DateTime, nullable=False),
    Column("last_error", Text),
    Index("ix_outbox_sink", "sink", "id"),
)

#: A maintenance window (`integrity expect`): changes under `paths` (JSON list; empty
#: for every protected path) made between `start` and `end` are expected. Chained in
#: the ledger like events: a forged or stretched window is tampering, and not honoured.
maintenance_window = Table(
    "maintenance_window", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created", DateTime, nullable=False),
    Column("start", DateTime, nullable=False),
    Column("end", DateTime, nullable=False),
    Column("reason", Text, nullable=False),
    Column("paths", Text, nullable=False),
    Column("user", String(128), nullable=False),
    Column("sudo_user", String(128)),
    Column("cancelled", DateTime),
    Column("cancelled_by", String(128)),
)

#: Who opened a file under an `access = true` rule: one row per (file, hour, exe,
#: uid) with a count, so a busy reader makes one row an hour. Chained in the ledger:
#: deleting the record of a read of /etc/shadow is tampering.
access = Table(
    "access", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", LargeBinary, nullable=False),
    Column("hour", DateTime, nullable=False),
    Column("exe", Text),
    Column("uid", BigInteger),
    Column("rule", Text),
    Column("count", Integer, nullable=False),
    Column("first_seen", DateTime, nullable=False),
    Column("last_seen", DateTime, nullable=False),
    Column("actor", Text),
    Index("ix_access_hour_key", "hour", "key"),
)

# -- a fleet host's spool (store/spool.py): what the central database still lacks -------

#: One row once the host first pushed: what the central copy holds of its baseline.
fleet_state = Table(
    "fleet_state", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("enabled", DateTime, nullable=False),
    # The spool number of the last baseline push the central database took.
    Column("push", Integer),
    Column("baseline_id", Integer),
    Column("generation", Integer),
    Column("root", String(64)),
    Column("last_digest", String(64)),
)

#: A copy of every ledger row, numbered by a sequence that is never reused (the
#: central side keys a host's records by it), until the central database holds it.
fleet_ledger = Table(
    "fleet_ledger", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("time", DateTime, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("ref", Integer, nullable=False),
    Column("content", Text, nullable=False),
    Column("prev", String(64), nullable=False),
    Column("digest", String(64), nullable=False),
    sqlite_autoincrement=True,
)

#: Keys written into the active baseline since the last push; a NULL key marks a new
#: baseline in force (the next push sends it whole).
fleet_entry = Table(
    "fleet_entry", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("baseline_id", Integer, nullable=False),
    Column("key", LargeBinary),
    sqlite_autoincrement=True,
)

#: Approval requests from the fleet's admin: claimed before they are applied (so at
#: most once), with their outcome until the central database has it.
fleet_request = Table(
    "fleet_request", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("received", DateTime, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("outcome", String(16)),
    Column("approval_id", Integer),
    Column("root", String(64)),
    Column("detail", Text),
    Column("reported", DateTime),
)
