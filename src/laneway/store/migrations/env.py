"""Alembic environment: the caller hands over an open connection in
`config.attributes["connection"]` (see `laneway.store.migrate`), so migrations run inside the
app's own engine, async drivers included."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
