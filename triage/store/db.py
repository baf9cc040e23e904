"""Engines and schema: SQLite (WAL, embedded default) or PostgreSQL, upgraded by Alembic."""

from __future__ import annotations

import contextlib
import functools
import heapq
import os
import socket
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.pool import ConnectionPoolEntry

from alembic import command
from triage.logs import get_logger

#: Execution option marking a read-only connection (SQLite then skips BEGIN IMMEDIATE).
READ_ONLY = "triage_read_only"
#: Execution option: how long (ms) a transaction on SQLite waits for another process's write
#: lock before "database is locked" (default: the engine's 30 s).
LOCK_WAIT_MS = "triage_lock_wait_ms"
_DEFAULT_LOCK_WAIT_MS = 30000

log = get_logger("triage.store")

# What bounds a PostgreSQL store that stops answering (a frozen server, a partition), by where
# the wait is. psycopg 3 has no read timeout: a query whose answer never comes waits forever
# unless something below ends it.
#
# - Opening a connection: libpq's connect_timeout covers the TCP connect and the whole start-up
#   (a server that accepts and never answers included).
# - A pooled connection before each use: a ping (SQLAlchemy's pre-ping, done here) whose
#   connection is cut after PING_TIMEOUT_S; the pool then opens a new one (connect_timeout).
#   A store that froze between two transactions (the usual case) costs at most both.
# - Inside a transaction, a dead peer host or network (no ACK, no keepalive reply): TCP
#   keepalives and tcp_user_timeout make the kernel drop the connection within ~25 s.
# - Inside a transaction, a server that is alive but slow (a lock held by a purge batch):
#   statement_timeout, on the listener's connections only (see below).
# - Inside a transaction, a server process or middlebox that is frozen (the kernel still ACKs
#   and answers keepalives, so TCP sees nothing wrong and the server never sees the query, so
#   statement_timeout never fires): only a clock on this side. The listener's connections are
#   cut when held past LISTENER_HOLD_S, so a C-STORE answers 0xA701 while the peer still
#   waits. The daemon's other work (scheduler, worker, sender, migrations) is not cut while it
#   runs, as a purge batch or a migration under the advisory lock may rightly take long: such
#   a loop stalls until the store answers, and nothing else waits for it. /readyz and
#   /metrics bound their own waits (triage.health.BoundedCall), and once stopping the daemon
#   calls bound_store_waits, so the stop ends within systemd's TimeoutStopSec.
#: libpq connect_timeout (s): TCP connect plus start-up and authentication.
CONNECT_TIMEOUT_S = 5
#: A pooled connection's ping before use is cut after this long.
PING_TIMEOUT_S = 3.0
#: The listener's connections (one C-STORE's record, an audit row) are cut when held longer.
LISTENER_HOLD_S = 15.0
#: Server-side bound on one listener statement, lock waits included (no shorter lock_timeout:
#: a late instance for a study in a purge batch is meant to wait for the batch); below
#: LISTENER_HOLD_S so a live server answers with its own error first.
LISTENER_STATEMENT_TIMEOUT_MS = 10000
#: TCP keepalives: first probe after 10 s of silence, then every 5 s, 3 unanswered probes end
#: the connection; tcp_user_timeout ends one whose sent data go unacknowledged as long.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25000,
}
_FRESH = "triage_fresh"
#: The watch thread looks at most this often: a cut may come this much late, and a busy
#: listener's every checkout does not wake it.
_WATCH_TICK_S = 0.5


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or its schema cannot be brought up to date."""


class SchemaTooNew(StoreUnavailable):
    """The store's schema is at a migration this code does not know: a newer msk-triage
    upgraded it. Waiting does not help (exit status 2: systemd does not restart)."""

    exit_code = 2


class DowngradeRefused(ValueError):
    """A schema downgrade that cannot be done as asked (unknown or newer revision)."""


def normalise_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (psycopg2 is not a dependency)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def is_sqlite(engine: Engine) -> bool:
    """True for the embedded SQLite engine."""
    return engine.dialect.name == "sqlite"


def make_engine(url: str, *, spool_backed: bool = False, role: str = "process") -> Engine:
    """An engine for *url*.

    On PostgreSQL its connections are named ``msk-triage <role> <host>:<pid>``
    (``application_name``, unless the URL sets one): pg_stat_activity shows a DBA who is
    connected, and ``triage-admin db downgrade`` which daemons still run, on any host.

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
            _turn_to_wal(cursor)
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
    query = make_url(url).query
    # Settings given in the URL win over these defaults.
    name = f"msk-triage {role} {socket.gethostname()}:{os.getpid()}"[:63]  # NAMEDATALEN - 1
    connect_args: dict[str, Any] = {
        key: value
        for key, value in {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "application_name": name,
            **_KEEPALIVES,
        }.items()
        if key not in query
    }
    hold_s = None
    if spool_backed:
        # The listener runs only short statements; the main engine runs none: a purge batch
        # and a migration (waiting for another daemon's under the advisory lock) must finish.
        hold_s = LISTENER_HOLD_S
        given = query.get("options")
        options = f"-c statement_timeout={LISTENER_STATEMENT_TIMEOUT_MS}"
        connect_args["options"] = f"{given} {options}" if isinstance(given, str) else options
    # No pool_pre_ping: SQLAlchemy's runs before any checkout event and has no time bound;
    # _watch_connections pings under its own clock.
    engine = create_engine(url, pool_size=10, max_overflow=20, connect_args=connect_args)
    _watch_connections(engine, hold_s)
    return engine


def _turn_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, waiting (up to the usual lock wait) for another
    connection's write lock: on a database not yet in WAL mode (a new store that another
    process is setting up at the same moment) SQLite answers "database is locked" at once,
    without calling the busy handler. Once in WAL mode the pragma takes no lock."""
    deadline = time.monotonic() + _DEFAULT_LOCK_WAIT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def bound_store_waits(engine: Engine, seconds: float) -> None:
    """From now on, cut the connection under any use of *engine*'s pool that lasts longer
    than *seconds* (counted from now for those in use): its statement fails as on a dropped
    connection. For a stop that must end although the store stopped answering; no-op on
    SQLite (a local file does not freeze that way, and its lock waits are bounded)."""
    waits = _WATCHES.get(engine)
    if waits is not None:
        waits.bound(seconds)


@dataclass
class _Use:
    """One checked-out connection: a duplicate of its socket (so a cut can never hit another
    file that reuses the number once the driver closed it), and when it must be cut."""

    sock: socket.socket
    since: float
    deadline: float | None
    what: str = "use"
    generation: int = 0


class _ConnectionWatch:
    """Cuts (shutdown(2) on the socket) the connections of one engine held past their
    deadline, from one background thread."""

    def __init__(self, hold_s: float | None) -> None:
        self.hold_s = hold_s
        self._uses: dict[int, _Use] = {}
        self._deadlines: list[tuple[float, int, int]] = []
        self._generation = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, record: ConnectionPoolEntry, dbapi_connection: Any, seconds: float) -> None:
        """Watch *record*'s connection for at most *seconds* (the ping)."""
        try:
            sock = socket.socket(fileno=os.dup(dbapi_connection.fileno()))
        except (OSError, AttributeError, ValueError):
            return  # not a socket we can watch: unbounded, as before
        now = time.monotonic()
        with self._wake:
            old = self._uses.pop(id(record), None)
            self._generation += 1
            use = _Use(sock, now, now + seconds, "ping", self._generation)
            self._uses[id(record)] = use
            self._schedule(use, id(record))
        if old is not None:
            old.sock.close()

    def hold(self, record: ConnectionPoolEntry) -> None:
        """The ping passed: from now, *record*'s use is bounded by the hold bound, if any."""
        with self._wake:
            use = self._uses.get(id(record))
            if use is None:
                return
            use.what = "use"
            use.deadline = None if self.hold_s is None else use.since + self.hold_s
            if use.deadline is not None:
                self._schedule(use, id(record))

    def disarm(self, record: ConnectionPoolEntry) -> None:
        """*record* went back to the pool (or was invalidated): stop watching it."""
        with self._wake:
            use = self._uses.pop(id(record), None)
        if use is not None:
            use.sock.close()

    def bound(self, seconds: float) -> None:
        """Every use, now and later, lasts at most *seconds* (those in use: from now)."""
        limit = time.monotonic() + seconds
        with self._wake:
            self.hold_s = seconds if self.hold_s is None else min(self.hold_s, seconds)
            for key, use in self._uses.items():
                if use.deadline is None or limit < use.deadline:
                    use.deadline = limit
                    self._schedule(use, key)

    def _schedule(self, use: _Use, key: int) -> None:
        # Called with the condition held; the heap may hold stale entries (checked on expiry).
        assert use.deadline is not None
        entry = (use.deadline, use.generation, key)
        heapq.heappush(self._deadlines, entry)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)
            self._thread.start()
        elif self._deadlines[0] is entry:
            self._wake.notify()  # due before the thread means to wake (else: let it sleep)

    def _run(self) -> None:
        while True:
            with self._wake:
                now = time.monotonic()
                due: list[_Use] = []
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, generation, key = heapq.heappop(self._deadlines)
                    use = self._uses.get(key)
                    if (
                        use is not None
                        and use.generation == generation
                        and use.deadline is not None
                        and use.deadline <= now
                    ):
                        use.deadline = None  # cut once
                        due.append(use)
                for use in due:
                    # Under the lock: disarm() cannot close the duplicate meanwhile.
                    with contextlib.suppress(OSError):
                        use.sock.shutdown(socket.SHUT_RDWR)
                    log.warning(
                        "store_connection_cut",
                        during=use.what,
                        held_s=round(now - use.since, 1),
                    )
                if self._deadlines:
                    self._wake.wait(max(self._deadlines[0][0] - now, _WATCH_TICK_S))
                else:
                    # Nothing to watch: end (a thread per engine would outlive every disposed
                    # engine); _schedule starts another when a deadline comes.
                    self._thread = None
                    return


_WATCHES: weakref.WeakKeyDictionary[Engine, _ConnectionWatch] = weakref.WeakKeyDictionary()


def _watch_connections(engine: Engine, hold_s: float | None) -> None:
    """Ping each pooled connection before use under PING_TIMEOUT_S, and cut a use held past
    *hold_s* (or past :func:`bound_store_waits`)."""
    watch = _ConnectionWatch(hold_s)
    _WATCHES[engine] = watch
    dialect = engine.dialect

    @event.listens_for(engine, "connect")
    def _on_connect(_dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        record.info[_FRESH] = True  # just opened: no ping needed

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, record, _proxy) -> None:  # type: ignore[no-untyped-def]
        watch.arm(record, dbapi_connection, PING_TIMEOUT_S)
        if not record.info.pop(_FRESH, False):
            try:
                dialect.do_ping(dbapi_connection)
            except dialect.loaded_dbapi.Error as exc:
                watch.disarm(record)
                # The pool opens a new connection and tries once more. Those beside it that
                # idled through the same outage are likely dead too: renew them all.
                failed = f"store connection failed its ping: {_short(exc)}"
                raise InvalidatePoolError(failed) from exc
        watch.hold(record)

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        watch.disarm(record)

    @event.listens_for(engine, "invalidate")
    def _on_invalidate(_dbapi_connection, record, _exc) -> None:  # type: ignore[no-untyped-def]
        watch.disarm(record)  # before the driver closes it


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
    return known_revisions()[-1]


@functools.cache
def known_revisions() -> tuple[str, ...]:
    """Every migration this code knows, oldest first (read from the migrations folder once:
    it does not change while the process runs)."""
    script = ScriptDirectory.from_config(_alembic_config(create_engine("sqlite://")))
    return tuple(revision.revision for revision in reversed(list(script.walk_revisions())))


def schema_too_new(revision: str) -> str:
    """What to tell an operator whose store is at *revision*, newer than this code knows."""
    from triage import __version__

    head = head_revision()
    return (
        f"the store's schema is at {revision}, newer than this msk-triage {__version__} knows"
        f" (its newest is {head}): a newer msk-triage upgraded it. Run that version, or go"
        f" back with it first (`triage-admin db downgrade {head}`, every daemon and worker"
        " stopped)"
    )


def _refuse_unknown_schema(engine: Engine) -> None:
    revision = current_revision(engine)
    if revision is not None and revision not in known_revisions():
        raise SchemaTooNew(schema_too_new(revision))


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Any:
    """On PostgreSQL an advisory lock serialises migrations (daemons that start at the same
    time, an operator's downgrade); SQLite's own locking is enough there."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as lock_connection:
        lock_connection.exec_driver_sql("SELECT pg_advisory_lock(727140001)")
        try:
            yield
        finally:
            lock_connection.exec_driver_sql("SELECT pg_advisory_unlock(727140001)")
            lock_connection.commit()


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (``None`` for an empty database)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(engine: Engine) -> str:
    """Bring the schema to the newest migration; returns that revision.

    On PostgreSQL an advisory lock serialises daemons that start at the same time.
    """
    try:
        with _migration_lock(engine):
            _refuse_unknown_schema(engine)
            command.upgrade(_alembic_config(engine), "head")
    except StoreUnavailable:
        raise
    except Exception as exc:  # any driver error: one clear message for the operator
        raise StoreUnavailable(f"cannot upgrade the store schema: {_short(exc)}") from exc
    revision = current_revision(engine)
    assert revision is not None
    return revision


def check_downgrade(engine: Engine, revision: str) -> str:
    """The store's schema revision, once sure it can go down to *revision* (or is at it);
    raises :class:`SchemaTooNew` or :class:`DowngradeRefused`."""
    known = known_revisions()
    if revision not in known:
        raise DowngradeRefused(f"unknown schema revision {revision!r} (known: {', '.join(known)})")
    _refuse_unknown_schema(engine)
    current = current_revision(engine)
    if current is None:
        raise DowngradeRefused("the store has no schema")
    if known.index(revision) > known.index(current):
        raise DowngradeRefused(
            f"{revision} is newer than the store's schema {current}: use `db upgrade`"
        )
    return current


def other_processes(engine: Engine) -> list[str]:
    """On PostgreSQL, the other msk-triage processes connected to this database now (their
    ``application_name``: role, host and pid), triage-admin excepted; on SQLite, none (a
    daemon there holds a lock file beside the database instead)."""
    if engine.dialect.name != "postgresql":
        return []
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT DISTINCT application_name FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name LIKE :ours AND application_name NOT LIKE :admin"
                " ORDER BY application_name"
            ),
            {"ours": "msk-triage %", "admin": "msk-triage admin %"},
        )
        return [str(name).removeprefix("msk-triage ") for (name,) in rows]


def downgrade_schema(engine: Engine, revision: str) -> str:
    """Take the schema back to *revision*, a migration this code knows, older than the
    store's (what a rollback to an older msk-triage needs first); returns it.

    Raises :class:`SchemaTooNew` for a store this code cannot read,
    :class:`DowngradeRefused` for a *revision* that is unknown or not older,
    StoreUnavailable when the migration fails.
    """
    try:
        with _migration_lock(engine):
            check_downgrade(engine, revision)
            command.downgrade(_alembic_config(engine), revision)
    except (StoreUnavailable, DowngradeRefused):
        raise
    except Exception as exc:  # any driver error: one clear message for the operator
        raise StoreUnavailable(f"cannot downgrade the store schema: {_short(exc)}") from exc
    return revision


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
