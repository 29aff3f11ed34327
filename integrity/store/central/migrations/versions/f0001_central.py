"""central: hosts, their chains, baselines, events, approvals; checks on arrival; RLS

Revision ID: f0001
Revises:
Create Date: 2026-12-01

Runs as `integrity_admin` (fleet init sets the role), inside schema `integrity`, so
every object is owned by that role: owners bypass row-level security, host roles do
not. Hosts only ever INSERT; what a host's rows mean for its state (the chain head, the
current baseline copy, flags) is decided by the trigger functions of
sql/f0001_functions.sql. The SQL of this revision lives in sql/f0001_*.sql, read as
they are (a later revision adds files of its own, never edits these).
"""
from __future__ import annotations

from importlib import resources

from alembic import op

revision = "f0001"
down_revision = None
branch_labels = None
depends_on = None

#: Tables a host writes, and the columns it may give (the rest are set centrally).
HOST_INSERTS = {
    "ledger": "host_id, seq, time, kind, ref, content, prev, digest",
    "baseline": "host_id, push, kind, baseline_id, generation, activated, root, signature, "
                "signer, seal_version, policy_digest, entries, changes, ledger_seq, "
                "host_time",
    "entry": "host_id, push, key, removed, type, content, size, mode, uid, gid, inode, "
             "nlink, mtime, ctime, link, xattrs, dev, package, kept",
    "heartbeat": "host_id, time, interval_s, grp, version, watcher, head_seq, head_digest, "
                 "unpushed",
    "request_result": "host_id, request_id, time, outcome, approval_id, root, detail",
}
ALL_TABLES = ("host", "host_state", "ledger", "ledger_rejected", "event", "approval",
              "baseline", "entry", "heartbeat", "flag", "request", "request_result",
              "monitor_alert")
FUNCTIONS = ("current_host()", "raise_flag(int, text, text)", "fork(int, text)",
             "ledger_in()", "ledger_chain()", "heartbeat_in()", "baseline_in()",
             "entries_in()", "result_in()")


def _sql(name: str) -> str:
    return (resources.files("integrity.store.central.migrations") / "sql" / name
            ).read_text(encoding="utf-8")


def security() -> str:
    """Row-level security everywhere (no policy: no rows), then exactly what a host may
    do: insert its own rows into its tables, read its own open requests."""
    own = "host_id = (SELECT integrity.current_host())"
    sql = ["REVOKE ALL ON ALL TABLES IN SCHEMA integrity FROM PUBLIC;",
           "REVOKE ALL ON ALL SEQUENCES IN SCHEMA integrity FROM PUBLIC;",
           "REVOKE ALL ON ALL FUNCTIONS IN SCHEMA integrity FROM PUBLIC;",
           "GRANT USAGE ON SCHEMA integrity TO integrity_host;",
           "GRANT EXECUTE ON FUNCTION integrity.current_host() TO integrity_host;"]
    for table in ALL_TABLES:
        sql.append(f"ALTER TABLE integrity.{table} ENABLE ROW LEVEL SECURITY;")
    for table, columns in HOST_INSERTS.items():
        sql.append(f"GRANT INSERT ({columns}) ON integrity.{table} TO integrity_host;")
        sql.append(f"CREATE POLICY host_inserts_own ON integrity.{table} FOR INSERT "
                   f"TO integrity_host WITH CHECK ({own});")
    sql.append("GRANT SELECT ON integrity.request TO integrity_host;")
    sql.append("CREATE POLICY host_reads_own_open ON integrity.request FOR SELECT "
               f"TO integrity_host USING ({own} AND answered IS NULL AND expires > now());")
    return "\n".join(sql)


def upgrade() -> None:
    op.execute(_sql("f0001_tables.sql"))
    op.execute(_sql("f0001_functions.sql"))
    op.execute(security())


def downgrade() -> None:
    for table in reversed(ALL_TABLES):
        op.execute(f"DROP TABLE IF EXISTS integrity.{table} CASCADE")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS integrity.{function}")
