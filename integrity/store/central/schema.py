"""The central schema as SQLAlchemy Core tables, for the statements of this package.

The DDL itself (with row-level security and the trigger functions that judge what
hosts send) lives in the migrations under central/migrations/, applied by `fleet init`.
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, DateTime, Integer, LargeBinary,
                        MetaData, Table, Text)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

SCHEMA = "integrity"
#: Central revisions this code knows, oldest first; the last is the one it needs.
REVISIONS = ("f0001", "f0002")
HEAD = REVISIONS[-1]
ADMIN_ROLE = "integrity_admin"
HOST_ROLE = "integrity_host"

metadata = MetaData(schema=SCHEMA)
TZ = DateTime(timezone=True)

host = Table(
    "host", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("grp", Text),
    Column("enrolled", TZ, nullable=False),
    Column("enrolled_by", Text, nullable=False),
)

host_state = Table(
    "host_state", metadata,
    Column("host_id", Integer, primary_key=True),
    Column("epoch", Integer, nullable=False),
    Column("forked", TZ),
    Column("last_seen", TZ),
    Column("host_time", DateTime),
    Column("interval_s", Integer),
    Column("reported_group", Text),
    Column("version", Text),
    Column("watcher", JSONB),
    Column("unpushed", BigInteger),
    Column("reported_seq", BigInteger),
    Column("reported_head", Text),
    Column("head_seq", BigInteger),
    Column("head_digest", Text),
    Column("base_digest", Text),
    Column("chain_rows", BigInteger, nullable=False),
    Column("push", BigInteger),
    Column("baseline_id", BigInteger),
    Column("generation", BigInteger),
    Column("root", Text),
    Column("signed", Boolean),
    Column("signer", LargeBinary),
    Column("entries", BigInteger),
    Column("central_entries", BigInteger),
    Column("ledger_seq", BigInteger),
    Column("baseline_received", TZ),
)

#: Every baseline push a host made (its xid column, set centrally, is left out).
baseline = Table(
    "baseline", metadata,
    Column("host_id", Integer, primary_key=True),
    Column("epoch", Integer, primary_key=True),
    Column("push", BigInteger, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("baseline_id", BigInteger, nullable=False),
    Column("generation", BigInteger, nullable=False),
    Column("activated", DateTime),
    Column("root", Text),
    Column("signature", LargeBinary),
    Column("signer", LargeBinary),
    Column("seal_version", Integer),
    Column("policy_digest", Text),
    Column("entries", BigInteger, nullable=False),
    Column("changes", BigInteger, nullable=False),
    Column("ledger_seq", BigInteger, nullable=False),
    Column("host_time", DateTime),
    Column("received", TZ, nullable=False),
)

event = Table(
    "event", metadata,
    Column("uid", BigInteger, primary_key=True),
    Column("host_id", Integer, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("id", BigInteger, nullable=False),
    Column("first_seen", DateTime, nullable=False),
    Column("key", LargeBinary, nullable=False),
    Column("kind", Text, nullable=False),
    Column("changed", Text),
    Column("source", Text),
    Column("rule", Text),
    Column("severity", Text, nullable=False),
    Column("classification", Text),
    Column("status", Text, nullable=False),
    Column("count", Integer),
    Column("last_seen", DateTime, nullable=False),
    Column("old", Text),
    Column("new", Text),
    Column("actor", Text),
    Column("approval_id", BigInteger),
    Column("evidence", Text),
    Column("diff", Text),
    Column("seq", BigInteger, nullable=False),
    Column("chain", Text, nullable=False),
    Column("received", TZ, nullable=False),
)

flag = Table(
    "flag", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("host_id", Integer, nullable=False),
    Column("kind", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("raised", TZ, nullable=False),
    Column("resolved", TZ),
    Column("resolved_by", Text),
    Column("resolution", Text),
)

request = Table(
    "request", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("host_id", Integer, nullable=False),
    Column("kind", Text, nullable=False),
    Column("paths", ARRAY(Text), nullable=False),
    Column("all", Boolean, nullable=False),
    Column("reason", Text),
    Column("requested_by", Text, nullable=False),
    Column("requested", TZ, nullable=False),
    Column("expires", TZ, nullable=False),
    Column("answered", TZ),
)

request_result = Table(
    "request_result", metadata,
    Column("host_id", Integer, primary_key=True),
    Column("request_id", BigInteger, primary_key=True),
    Column("time", DateTime),
    Column("outcome", Text, nullable=False),
    Column("approval_id", BigInteger),
    Column("root", Text),
    Column("detail", Text),
    Column("received", TZ, nullable=False),
)

monitor_alert = Table(
    "monitor_alert", metadata,
    Column("id", BigInteger, primary_key=True),
    Column("host_id", Integer),
    Column("kind", Text, nullable=False),
    Column("key", Text, nullable=False, unique=True),
    Column("created", TZ, nullable=False),
    Column("event", JSONB, nullable=False),
    Column("pending", ARRAY(Text), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
)
