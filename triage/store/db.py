"""Engines and schema: SQLite (WAL, embedded default) or PostgreSQL, upgraded by Alembic."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from alembic import command

#: Execution option marking a read-only connection (SQLite then skips BEGIN IMMEDIATE).
READ_ONLY = "triage_read_only"
#: Execution option: how long (ms) a transaction on SQLite waits for another process's write
#: lock before "database is locked" (default: the engine's 30 s).
LOCK_WAIT_MS = "triage_lock_wait_ms"
_DEFAULT_LOCK_WAIT_MS = 30000


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or its schema cannot be brought up to date."""


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (psycopg2 is not a dependency)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def is_sqlite(engine: Engine) -> bool:
    """True for the embedded SQLite engine."""
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, spool_backed: bool = False) -> Engine:
    """An engine for *url*.

    SQLite runs in WAL mode with ``synchronous=FULL`` (a committed row survives power loss)
    and every transaction starts with ``BEGIN IMMEDIATE``, so concurrent writers (listener
    processes, the scheduler) queue on the lock instead of failing with "database is locked"
    when a read transaction upgrades to a write.

    *spool_backed* (the listener's engine) commits with ``synchronous=NORMAL``: still atomic
    and safe from process crashes, but after a power loss the last commits may be gone. The
    listener only records instances whose spool file is already durable, and the daemon
    records such files again at start (:func:`triage.dicom.spool_recovery.record_orphans`), so
    nothing acknowledged is lost, and each C-STORE saves the WAL's fsync. Every other
    writer's commit fsyncs the WAL, and with it every commit before it.
    """
    synchronous = "NORMAL" if spool_backed else "FULL"
    url = normalise_url(url)
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # Autocommit at the driver level; SQLAlchemy's "begin" event issues BEGIN itself.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={_DEFAULT_LOCK_WAIT_MS}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
            # Reads (see Store.read_session) need no write lock: deferred BEGIN.
            options = connection.get_execution_options()
            read_only = options.get(READ_ONLY, False)
            wait = options.get(LOCK_WAIT_MS)
            # Set for this transaction, and back to the default on the connection's next
            # one: only then, so the C-STORE path pays nothing for it.
            if wait is not None or connection.info.get(LOCK_WAIT_MS) is not None:
                milliseconds = int(wait if wait is not None else _DEFAULT_LOCK_WAIT_MS)
                connection.exec_driver_sql(f"PRAGMA busy_timeout={milliseconds}")
                connection.info[LOCK_WAIT_MS] = wait
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrations_dir() -> Path:
    """Where the Alembic environment is: ./alembic in a checkout, ``triage/_migrations`` in a
    wheel (pyproject maps the folder into the package).

    The folder has no ``__init__.py``: one in ./alembic would make it a regular package named
    ``alembic`` that shadows the Alembic library for anything run from the checkout. So
    ``triage._migrations`` is a namespace package, for which ``importlib.resources`` returns a
    MultiplexedPath rather than a folder: look for the folder itself.
    """
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "alembic", package / "_migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreUnavailable(
        f"the store migrations are missing ({package / '_migrations' / 'env.py'}):"
        " reinstall msk-triage"
    )


def _alembic_config(engine: Engine) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    """The newest migration this code knows."""
    script = ScriptDirectory.from_config(_alembic_config(create_engine("sqlite://")))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (``None`` for an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(engine: Engine) -> str:
    """Bring the schema to the newest migration; returns that revision.

    On PostgreSQL an advisory lock serialises daemons that start at the same time.
    """
    try:
        if engine.dialect.name == "postgresql":
            with engine.connect() as lock_connection:
                lock_connection.exec_driver_sql("SELECT pg_advisory_lock(727140001)")
                try:
                    command.upgrade(_alembic_config(engine), "head")
                finally:
                    lock_connection.exec_driver_sql("SELECT pg_advisory_unlock(727140001)")
                    lock_connection.commit()
        else:
            command.upgrade(_alembic_config(engine), "head")
    except Exception as exc:  # any driver error: one clear message for the operator
        raise StoreUnavailable(f"cannot upgrade the store schema: {_short(exc)}") from exc
    revision = current_revision(engine)
    assert revision is not None
    return revision


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
