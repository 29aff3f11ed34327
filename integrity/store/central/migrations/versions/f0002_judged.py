"""central: a host's baseline is judged by what the central copy holds

Revision ID: f0002
Revises: f0001
Create Date: 2026-12-03

f0001's entries_in took a host's word (`changes` = 0) that a push under an unchanged
root changed no entry: a host's role could rewrite the central copy that `fleet
drift` reads without a flag. And a baseline re-sealed behind the spool was never
pushed: central kept the old root. sql/f0002_functions.sql replaces entries_in with
one that compares the rows with the copy it holds, and heartbeat_in with one that
compares the seal a heartbeat names (new columns) with the one held; downgrade puts
f0001's functions back.
"""
from __future__ import annotations

import re
from importlib import resources

from alembic import op

revision = "f0002"
down_revision = "f0001"
branch_labels = None
depends_on = None


def _sql(name: str) -> str:
    return (resources.files("integrity.store.central.migrations") / "sql" / name
            ).read_text(encoding="utf-8")


def upgrade() -> None:
    op.execute(_sql("f0002_functions.sql"))


def downgrade() -> None:
    for function in ("heartbeat_in", "entries_in"):
        found = re.search(rf"^CREATE FUNCTION integrity\.{function}\(\).*?^END \$\$;",
                          _sql("f0001_functions.sql"), re.S | re.M)
        assert found is not None
        op.execute("CREATE OR REPLACE" + found.group(0)[len("CREATE"):])
    op.execute("ALTER TABLE integrity.heartbeat DROP COLUMN root, DROP COLUMN generation")
