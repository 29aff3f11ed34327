"""Alembic environment of the central (PostgreSQL) schema: `fleet init` hands in its
open connection, already switched to the integrity_admin role."""

from __future__ import annotations

from alembic import context

from integrity.store.central.schema import SCHEMA, metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata,
                      version_table_schema=SCHEMA, include_schemas=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("the central schema is created by `integrity fleet init`")
run_migrations_online()
