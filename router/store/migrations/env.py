"""Alembic environment: runs migrations on the connection Headwater hands it (see router.store.db)."""

from alembic import context

from router.store.models import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Headwater applies its migrations itself at start-up (headwater serve / headwater db-upgrade)")
context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
