"""Alembic environment: the daemon passes its engine; the alembic CLI reads the triage config."""

from __future__ import annotations

from alembic import context
from triage.store.models import Base


def _engine():
    engine = context.config.attributes.get("engine")
    if engine is None:  # plain `alembic` command line, from the repository root
        from triage.config import load_config
        from triage.store.db import make_engine

        engine = make_engine(
            load_config(context.config.get_main_option("triage_config") or None).store.url
        )
    return engine


def run_migrations_online() -> None:
    """Run the migrations in one connection, each in its own transaction."""
    engine = _engine()
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `triage-admin db upgrade`")
run_migrations_online()
