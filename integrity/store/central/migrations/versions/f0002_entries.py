"""central: entries pushed under the seal already held are compared with the copy held

Revision ID: f0002
Revises: f0001
Create Date: 2026-12-03

f0001's entries_in took a host's word (`changes` = 0) that a push under an unchanged
root changed no entry: a host's role could rewrite the central copy that `fleet
drift` reads without a flag. sql/f0002_functions.sql replaces entries_in with one
that compares the rows with the copy it holds; downgrade puts f0001's back.
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
    found = re.search(r"^CREATE FUNCTION integrity\.entries_in\(\).*?^END \$\$;",
                      _sql("f0001_functions.sql"), re.S | re.M)
    assert found is not None
    op.execute("CREATE OR REPLACE" + found.group(0)[len("CREATE"):])
