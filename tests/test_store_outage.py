"""A PostgreSQL store that stops answering under a running daemon (a frozen server, a network
partition): the daemon must keep answering, in bounded time, what does not need the store's
answer — /metrics says ``triage_store_up 0``, a C-STORE gets 0xA701 (store unavailable, retry)
before the peer's DIMSE timeout, and SIGTERM ends the daemon well inside systemd's
TimeoutStopSec (120 s) — instead of waiting for the store to come back.

The store is reached through :class:`~tests.tcp_proxy.TcpProxy`, which freezes: connections
stay open, bytes are taken and never answered, so TCP sees nothing wrong.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Connection, text
from sqlalchemy.exc import OperationalError

from tests.peers import storescu, wait_until
from tests.tcp_proxy import TcpProxy
from tests.test_end_to_end import scoring_config, send_study
from tests.test_http import http_port
from triage.store.models import StudyState
from triage.testing.synth import make_study, write_study

pytestmark = pytest.mark.timeout(300)

#: The peer's DIMSE timeout: its C-STORE must be answered before this.
PEER_DIMSE_TIMEOUT_S = 20


def _get(port: int, path: str, timeout: float) -> tuple[int | None, str, float]:
    """GET *path*: (status or None when no answer came, body, seconds taken)."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            status, body = reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode()
    except OSError as exc:  # the timeout: no answer at all
        status, body = None, f"{type(exc).__name__}: {exc}"
    return status, body, time.monotonic() - started


def _store_up(body: str) -> float | None:
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "triage_store_up":
                return sample.value
    return None


def _study(folder: Path, seed: int) -> list[Path]:
    return write_study(make_study(views=1, rows=128, cols=128, seed=seed), folder)


@pytest.fixture
def frozen_proxy(pg_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """A proxy in front of the test database, and the database's URL through it."""
    where = urllib.parse.urlsplit(pg_url)
    proxy = TcpProxy((where.hostname or "127.0.0.1", where.port or 5432))
    try:
        yield proxy, proxy.url(pg_url)
    finally:
        proxy.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_frozen_store_leaves_metrics_cstore_and_stop_bounded(
    daemon_factory, frozen_proxy, tmp_path
) -> None:
    """Freeze the store under a daemon that used it: /metrics answers within seconds with
    ``triage_store_up 0``, a C-STORE gets 0xA701 within the peer's DIMSE timeout, and SIGTERM
    ends the daemon (exit 0) in well under TimeoutStopSec."""
    proxy, url = frozen_proxy
    daemon = daemon_factory(
        {
            "store": {"url": url},
            "study": {"quiet_period_s": 600},
            "dicom": {"shutdown_grace_s": 5},
            "log": {"level": "info"},
        }
    ).start()
    port = http_port(daemon)
    # The pools now hold connections that the freeze leaves open and silent.
    before = _study(tmp_path / "before", seed=1)
    assert storescu(daemon.port, before).acknowledged == len(before)
    status, body, _ = _get(port, "/metrics", timeout=20)
    assert status == 200 and _store_up(body) == 1

    proxy.freeze()

    status, body, took = _get(port, "/metrics", timeout=20)
    assert status == 200, f"/metrics did not answer while the store is frozen: {body}"
    assert took < 10, f"/metrics took {took:.1f} s"
    assert _store_up(body) == 0

    frozen = _study(tmp_path / "frozen", seed=2)
    started = time.monotonic()
    run = storescu(
        daemon.port,
        frozen,
        extra=["-ta", "30", "-td", str(PEER_DIMSE_TIMEOUT_S)],
        timeout=120,
    )
    took = time.monotonic() - started
    assert run.acknowledged == 0
    assert run.failure_statuses == ["0xa701"], (
        f"no 0xA701 for a C-STORE on a frozen store ({took:.1f} s):\n{run.output[-3000:]}"
    )
    # Refused, so not kept: no row named the file, and on PostgreSQL nothing removed it.
    spool = Path(daemon.sections["store"]["spool_dir"])
    refused = pydicom.dcmread(frozen[0], stop_before_pixels=True)
    assert not (spool / str(refused.StudyInstanceUID) / f"{refused.SOPInstanceUID}.dcm").exists()

    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        code: int | None = daemon.process.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - started
    assert code == 0, f"SIGTERM on a frozen store: exit {code} after {took:.0f} s"
    assert took < 60
    # Each loop logs the outage once (then once a minute), not every round.
    failures = Counter(
        (entry["event"], entry.get("job"))
        for entry in (
            json.loads(line) for line in daemon.log_text().splitlines() if line[:1] == "{"
        )
        if entry.get("event") in ("claim_loop_error", "job_failed")
    )
    assert failures and max(failures.values()) == 1, failures


def _fails_within(connection: Connection, seconds: float) -> float:
    """Run a statement that the frozen store never answers; it must fail within *seconds*."""
    started = time.monotonic()
    with pytest.raises(OperationalError):
        connection.execute(text("SELECT 1"))
    took = time.monotonic() - started
    assert took < seconds, f"the statement failed only after {took:.1f} s"
    return took


@pytest.mark.postgres
def test_a_listener_transaction_on_a_frozen_store_is_cut(frozen_proxy, monkeypatch) -> None:
    """Mid-transaction, a frozen server gives TCP no sign and never sees the statement (so no
    statement_timeout): the listener's connection is cut after its hold bound, so the C-STORE
    can still be answered (0xA701); a fresh connection works once the store is back."""
    from triage.store import db

    proxy, url = frozen_proxy
    monkeypatch.setattr(db, "LISTENER_HOLD_S", 2.0)
    engine = db.make_engine(url, spool_backed=True)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "10s"
            proxy.freeze()
            assert _fails_within(connection, 6) >= 1
        proxy.forward()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_bound_store_waits_ends_a_wait_on_a_frozen_store(frozen_proxy) -> None:
    """The daemon's engine does not cut long uses (a purge batch, a migration) while it runs;
    at shutdown bound_store_waits cuts whatever still waits on a frozen store, and an idle
    pooled connection's ping is cut too (the next use fails in bounded time)."""
    from triage.store import db

    proxy, url = frozen_proxy
    engine = db.make_engine(url)
    try:
        with engine.connect() as idle:  # back to the pool: pinged before its next use
            idle.execute(text("SELECT 1"))
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            proxy.freeze()
            threading.Timer(1.0, db.bound_store_waits, (engine, 1.0)).start()
            _fails_within(connection, 6)
        proxy.forward()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
        proxy.freeze()
        started = time.monotonic()
        with pytest.raises(OperationalError), engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        # Ping cut after PING_TIMEOUT_S, then a new connection's connect_timeout.
        assert time.monotonic() - started < db.PING_TIMEOUT_S + db.CONNECT_TIMEOUT_S + 3
    finally:
        proxy.forward()
        engine.dispose()


def test_the_scheduler_stop_does_not_wait_for_ever_on_a_stuck_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job stuck on the store is left behind after the stop's wait, not waited for."""
    from triage.config import load_config
    from triage.scheduler import Scheduler
    from triage.store.db import make_engine, upgrade_schema
    from triage.store.repository import Store

    running, release = threading.Event(), threading.Event()

    def stuck(_self: Scheduler) -> int:
        running.set()
        release.wait(30)
        return 0

    monkeypatch.setattr(Scheduler, "purge_expired", stuck)
    engine = make_engine(f"sqlite:///{tmp_path / 'triage.db'}")
    upgrade_schema(engine)
    scheduler = Scheduler(load_config(None, env={}, base_dir=tmp_path), Store(engine))
    scheduler.start()
    try:
        assert running.wait(10)
        started = time.monotonic()
        scheduler.stop(wait_s=0.5)
        assert time.monotonic() - started < 3
    finally:
        release.set()
        engine.dispose()


@pytest.mark.postgres
def test_a_connection_watch_thread_ends_when_it_has_nothing_to_watch(pg_url: str) -> None:
    # One per engine, waiting for ever: the thread (and its engine's watch) outlived every
    # disposed engine.
    import threading
    import time

    from sqlalchemy import text

    from triage.store.db import make_engine

    def watching() -> int:
        return sum(thread.name == "store-watch" for thread in threading.enumerate())

    before = watching()
    for _ in range(5):
        engine = make_engine(pg_url)
        for _ in range(2):
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        engine.dispose()
    deadline = time.monotonic() + 10
    while watching() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert watching() <= before


@pytest.mark.postgres
@pytest.mark.slow
def test_a_worker_stopped_while_the_store_is_down_exits_cleanly_and_loses_nothing(
    daemon_factory, frozen_proxy, pg_url, tmp_path
) -> None:
    """SIGTERM to a `triage worker` whose store refuses connections while it holds a study:
    the study cannot be given back (its lease expires instead) and the stop cannot be
    recorded, yet the worker exits 0 with its last lines logged (it exited 1 with a bare
    traceback, which systemd counts as a failure), and the study is scored later."""
    proxy, proxied_url = frozen_proxy
    spool = str(tmp_path / "spool")
    receiver = daemon_factory(
        scoring_config(store={"url": pg_url, "spool_dir": spool}, worker={"enabled": False}),
        name="receiver",
    ).start()
    worker = daemon_factory(
        scoring_config(
            store={"url": proxied_url, "spool_dir": spool},
            worker={"lease_s": 5.0},
            dicom={"shutdown_grace_s": 0.5},
        ),
        name="worker",
        command="worker",
        env={"MSK_TRIAGE_FAILPOINTS": "before_complete:4"},
    ).start()
    study_uid, _ = send_study(receiver, tmp_path / "in", body_part="WRIST", views=1, seed=23)
    worker.wait_for_log('"event": "failpoint_paused"', 180)
    proxy.refuse()
    assert worker.stop() == 0, worker.log_text()[-3000:]
    log = worker.log_text()
    assert '"event": "give_back_failed"' in log
    assert '"event": "worker_stop_not_recorded"' in log
    assert '"event": "stopped"' in log and "Traceback" not in log

    proxy.forward()
    again = daemon_factory(
        scoring_config(store={"url": pg_url, "spool_dir": spool}), name="again", command="worker"
    ).start()
    store = receiver.store()
    wait_until(
        lambda: store.get_study(study_uid).state is StudyState.DONE,
        120,
        0.2,
        "the study scored once its lease expired",
    )
    assert again.stop() == 0 and receiver.stop() == 0
