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


def _sqlite_foreign_keys(connection, on: bool) -> None:  # type: ignore[no-untyped-def]
    """Switch SQLite's foreign-key enforcement; only outside a transaction does it apply."""
    if connection.in_transaction():
        connection.commit()
    connection.connection.dbapi_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def run_migrations_online() -> None:
    """Run the migrations in one connection, each in its own transaction.

    On SQLite, foreign keys are not enforced while they run: a batch migration rebuilds a
    table (create the new one, copy, DROP the old one, rename), and with enforcement on, that
    DROP deletes every row that references the table through ON DELETE CASCADE (rebuilding
    ``studies`` emptied ``instances`` and ``study_events``). The references are checked once
    the migrations are done.
    """
    engine = _engine()
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            _sqlite_foreign_keys(connection, on=False)
        try:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=sqlite,
                transaction_per_migration=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise RuntimeError(f"the migrations left {len(broken)} dangling references")
        finally:
            if sqlite:
                _sqlite_foreign_keys(connection, on=True)


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `triage-admin db upgrade`")
run_migrations_online()
