"""Alembic's entry: run the migrations on the connection :func:`migrations.upgrade` passes (inside its lock)."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
