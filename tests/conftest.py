"""Shared fixtures: daemons in child processes, SQLite and PostgreSQL stores."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Daemon, Storescp

#: The PostgreSQL server tests use (CI starts it). Each test session makes its own databases.
PG_ADMIN_URL = os.environ.get("MSK_TRIAGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make daemons (not started); every one is killed at teardown if still running."""
    made: list[Daemon] = []

    def make(sections: dict[str, Any] | None = None, name: str = "daemon", **kwargs: Any) -> Daemon:
        daemon = Daemon(tmp_path / name, sections or {}, **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()


def _pg_admin():  # type: ignore[no-untyped-def]
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("MSK_TRIAGE_SKIP_PG") == "1":
            pytest.skip(f"PostgreSQL not reachable ({exc}) and MSK_TRIAGE_SKIP_PG=1")
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}. Start it (see README) "
            "or set MSK_TRIAGE_SKIP_PG=1 to skip the PostgreSQL tests."
        )


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    name = f"triage_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin = _pg_admin()
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store URL for each engine the product supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")


def _migrated_store(url: str):  # type: ignore[no-untyped-def]
    from triage.store.db import make_engine, upgrade_schema
    from triage.store.repository import Store

    engine = make_engine(url)
    upgrade_schema(engine)
    yield Store(engine)
    engine.dispose()


@pytest.fixture
def store(store_url: str):  # type: ignore[no-untyped-def]
    """A Store on a freshly migrated database of each engine."""
    yield from _migrated_store(store_url)


@pytest.fixture
def pg_store(pg_url: str):  # type: ignore[no-untyped-def]
    """A Store on a freshly migrated PostgreSQL database (for what only PostgreSQL does)."""
    yield from _migrated_store(pg_url)


@pytest.fixture(autouse=True)
def _no_peer_left_behind() -> Iterator[None]:
    """Stop every storescp a test started, whatever happened in the test."""
    yield
    for peer in list(Storescp.running):
        peer.stop()
