"""The daemon's HTTP endpoints, scraped over real HTTP from a running daemon.

The end-to-end test runs a scoring daemon (demo model on the CPU, DCMTK storescu in, storescp
as the PACS) and checks that /metrics shows exactly what happened: associations and their
outcomes, instances stored/duplicate/failed, studies per state, scoring histograms, end-to-end
latency, deliveries and the model.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.peers import (
    Daemon,
    Storescp,
    echoscu,
    free_port,
    skip_without_ipv6,
    storescu,
    wait_until,
)
from tests.test_end_to_end import scoring_config, send_study, wait_state
from triage.health import BoundedCall, StoreNotAnswering
from triage.store.models import StudyState

pytestmark = pytest.mark.timeout(420)


def log_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines with this ``event``."""
    found = []
    for line in daemon.log_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


def http_port(daemon: Daemon) -> int:
    """The HTTP port the daemon bound (the harness asks for port 0)."""
    return int(log_events(daemon, "http_ready")[-1]["port"])


def get(daemon: Daemon, path: str) -> tuple[int, str, str]:
    """GET *path*: (status, content type, body)."""
    url = f"http://127.0.0.1:{http_port(daemon)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    status, content_type, body = get(daemon, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, metric: str, **labels: str) -> float:
    return samples[(metric, tuple(sorted(labels.items())))]


def test_metrics_during_an_end_to_end_run_show_what_happened(daemon_factory, tmp_path) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    daemon = daemon_factory(scoring_config(pacs.destination())).start()
    try:
        before = scrape(daemon)
        assert value(before, "triage_store_up") == 1
        assert value(before, "triage_studies", state="DONE") == 0
        assert value(before, "triage_instances_received_total", outcome="stored") == 0
        assert (
            value(
                before,
                "triage_model_info",
                name="mura-densenet169-demo",
                version="0.0.0-demo",
                validated="false",
                device="cpu",
            )
            == 1
        )
        # Counters with known labels start at 0 (increase() sees their first event).
        for outcome in ("delivered", "retry", "failed"):
            assert (
                value(before, "triage_delivery_attempts_total", destination="pacs", outcome=outcome)
                == 0
            )
        for where in ("decode_process", "worker"):
            assert value(before, "triage_worker_outputs_built_total", where=where) == 0
        # 1 association: two views stored.
        study_uid, files = send_study(daemon, tmp_path / "in", body_part="WRIST", views=2, seed=21)
        # 2: the same two again (duplicates). 3: one without a series UID (failed). 4: an echo.
        assert storescu(daemon.port, files).acknowledged == 2
        broken = pydicom.dcmread(files[0])
        del broken.SeriesInstanceUID
        broken.save_as(tmp_path / "broken.dcm")
        assert storescu(daemon.port, [tmp_path / "broken.dcm"]).failure_statuses == ["0xc001"]
        assert echoscu(daemon.port).returncode == 0
        wait_state(daemon, study_uid, StudyState.DONE)
        # Scraped while the daemon runs, after the study went through.
        samples = scrape_idle_worker(
            daemon,
            lambda s: value(s, "triage_associations_total", outcome="released") == 4,
            "four released associations",
        )
        assert value(samples, "triage_associations_total", outcome="rejected") == 0
        assert value(samples, "triage_associations_total", outcome="aborted") == 0
        assert value(samples, "triage_associations_active") == 0
        assert value(samples, "triage_instances_received_total", outcome="stored") == 2
        assert value(samples, "triage_instances_received_total", outcome="duplicate") == 2
        assert value(samples, "triage_instances_received_total", outcome="failed") == 1
        assert value(samples, "triage_echoes_total") == 1
        assert value(samples, "triage_received_bytes_total") > 0
        assert value(samples, "triage_studies", state="DONE") == 1
        for state in ("RECEIVING", "QUEUED", "SCORING", "DELIVERING", "FAILED", "SKIPPED"):
            assert value(samples, "triage_studies", state=state) == 0
        assert value(samples, "triage_oldest_queued_age_seconds") == 0
        assert value(samples, "triage_deliveries", state="DONE") == 3  # SR + 2 overlays
        assert value(samples, "triage_deliveries", state="PENDING") == 0
        assert (
            value(
                samples, "triage_delivery_attempts_total", destination="pacs", outcome="delivered"
            )
            == 3
        )
        assert value(samples, "triage_view_scoring_seconds_count") == 2
        assert value(samples, "triage_view_scoring_seconds_sum") > 0
        assert value(samples, "triage_study_scoring_seconds_count") == 1
        assert value(samples, "triage_study_latency_seconds_count") == 1
        # First instance to DONE includes the quiet period (0.5 s) and the scoring.
        latency = value(samples, "triage_study_latency_seconds_sum")
        assert latency > 0.5 and latency > value(samples, "triage_study_scoring_seconds_sum")
        assert_worker_idle(samples, decode_processes=1, studies=1)
        assert value(samples, "triage_spool_free_bytes") > 0
        assert value(samples, "process_resident_memory_bytes") > 0
        # Liveness and readiness with every loop running.
        status, content_type, body = get(daemon, "/healthz")
        assert status == 200 and content_type == "application/json"
        assert json.loads(body) == {
            "status": "ok",
            "loops": {"listener": True, "scheduler": True, "worker": True, "sender": True},
        }
        status, _, body = get(daemon, "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["status"] == "ready" and ready["failed"] == []
        assert set(ready["checks"]) == {"store", "listener", "worker", "spool"}
        assert ready["checks"]["listener"]["port"] == daemon.port
        status, _, body = get(daemon, "/nope")
        assert status == 404 and "/metrics" in body
    finally:
        assert daemon.stop() == 0
        pacs.stop()


def scrape_idle_worker(
    daemon: Daemon, also: Callable[[dict], bool] = lambda _: True, what: str = ""
) -> dict:
    """/metrics once the daemon's worker holds no study (it lets a study go just after
    recording it DONE) and *also* holds."""
    return wait_until(
        lambda: (
            ((s := scrape(daemon)) and value(s, "triage_worker_studies_in_flight") == 0 and also(s))
            and s
        ),
        30,
        0.2,
        "no study in the worker" + (f" and {what}" if what else ""),
    )


def assert_worker_idle(samples: dict, *, decode_processes: int, studies: int) -> None:
    """The worker's gauges of an idle worker that built the outputs of *studies* studies."""
    assert value(samples, "triage_worker_studies_in_flight") == 0
    # Every view handed to decoding went through the model (the worker builds outputs in
    # its own process only while this is 0).
    assert value(samples, "triage_worker_views_waiting") == 0
    assert value(samples, "triage_worker_jobs_waiting", job="decode") == 0
    assert value(samples, "triage_worker_jobs_waiting", job="outputs") == 0
    assert value(samples, "triage_worker_decode_processes") == decode_processes
    built = [
        samples.get(("triage_worker_outputs_built_total", (("where", where),)), 0.0)
        for where in ("decode_process", "worker")
    ]
    assert sum(built) == studies


def test_readyz_says_which_check_failed(daemon_factory, tmp_path) -> None:
    """A spool under its free-space floor: not ready (503, "spool"), yet alive (200)."""
    daemon = daemon_factory({"store": {"min_free_mb": 10**12}}).start()
    status, content_type, body = get(daemon, "/readyz")
    ready = json.loads(body)
    assert status == 503 and content_type == "application/json"
    assert ready["status"] == "not ready" and ready["failed"] == ["spool"]
    assert ready["checks"]["spool"]["min_free_bytes"] == 10**12 * 1024 * 1024
    assert ready["checks"]["store"] == {"ok": True}
    assert "worker" not in ready["checks"]  # not enabled on this daemon
    status, _, body = get(daemon, "/healthz")
    assert status == 200 and json.loads(body)["loops"] == {"listener": True, "scheduler": True}
    # HEAD (load balancers, uptime checks): GET's status and headers, no body.
    for path, expected in (("/readyz", 503), ("/healthz", 200), ("/metrics", 200)):
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port(daemon)}{path}", method="HEAD"
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, headers, body = response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            status, headers, body = exc.code, exc.headers, exc.read()
        assert (status, body) == (expected, b""), path
        assert int(headers["Content-Length"]) > 0
    post = urllib.request.Request(f"http://127.0.0.1:{http_port(daemon)}/healthz", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=10)
    assert refused.value.code == 405 and refused.value.headers["Allow"] == "GET, HEAD"
    for method, expected in (("TRACE", 405), ("BREW", 501)):  # BREW: no method of HTTP's
        odd = urllib.request.Request(f"http://127.0.0.1:{http_port(daemon)}/healthz", method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(odd, timeout=10)
        assert refused.value.code == expected, method
    samples = scrape(daemon)
    assert value(samples, "triage_spool_min_free_bytes") == 10**12 * 1024 * 1024
    # Without a worker the model is read from the card, on no device.
    assert any(
        name == "triage_model_info" and ("device", "none") in labels for name, labels in samples
    )
    assert daemon.stop() == 0


@pytest.mark.postgres
def test_readyz_reports_a_store_that_went_away(daemon_factory, pg_url) -> None:
    """The PostgreSQL database is dropped under the daemon: /readyz says "store", /metrics
    says triage_store_up 0 and still answers."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    daemon = daemon_factory({"store": {"url": pg_url}}).start()
    assert get(daemon, "/readyz")[0] == 200
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    status, _, body = get(daemon, "/readyz")
    ready = json.loads(body)
    assert status == 503 and "store" in ready["failed"]
    assert ready["checks"]["store"]["ok"] is False and ready["checks"]["store"]["error"]
    samples = scrape(daemon)
    assert value(samples, "triage_store_up") == 0
    assert ("triage_studies", (("state", "DONE"),)) not in samples
    daemon.kill()


@pytest.mark.postgres
@pytest.mark.slow
def test_a_separate_worker_serves_its_own_health_and_metrics(
    daemon_factory, pg_url, tmp_path
) -> None:
    """`triage worker` beside a daemon that does not score: its /healthz and /readyz are its
    worker's, the store's and the spool's; its /metrics shows its model, its scoring and its
    load, and not the site's totals (the daemon's)."""
    pacs = Storescp(tmp_path / "pacs").start()
    config = scoring_config(
        pacs.destination(), store={"url": pg_url, "spool_dir": str(tmp_path / "spool")}
    )
    daemon = daemon_factory({**config, "worker": {"enabled": False}}, name="daemon").start()
    worker = daemon_factory(
        {**config, "dicom": {**config.get("dicom", {}), "port": daemon.port}},
        name="worker",
        command="worker",
    ).start()
    try:
        status, _, body = get(worker, "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok", "loops": {"worker": True}}
        status, _, body = get(worker, "/readyz")
        ready = json.loads(body)
        assert status == 200 and set(ready["checks"]) == {"store", "worker", "spool"}
        study_uid, _ = send_study(daemon, tmp_path / "in", body_part="HAND", views=2, seed=22)
        wait_state(daemon, study_uid, StudyState.DONE)
        samples = scrape_idle_worker(worker)
        assert value(samples, "triage_view_scoring_seconds_count") == 2
        assert value(samples, "triage_study_scoring_seconds_count") == 1
        assert_worker_idle(samples, decode_processes=1, studies=1)
        assert any(
            name == "triage_model_info" and ("device", "cpu") in labels for name, labels in samples
        )
        assert not any(name.startswith("triage_studies") for name, _ in samples)
        # The daemon scores nothing itself: no worker gauges there.
        assert not any(name.startswith("triage_worker_") for name, _ in scrape(daemon))
        # A second worker on this host with the same HTTP port stops before loading its model.
        taken = http_port(worker)
        second = daemon_factory(
            {**worker.sections, "http": {"port": taken}}, name="second", command="worker"
        )
        second.start(wait=False)
        assert second.process.wait(120) == 1
        assert f"cannot serve HTTP on 127.0.0.1:{taken}" in second.log_text()
        assert "needs its own [http] port" in second.log_text()
    finally:
        assert worker.stop() == 0
        assert daemon.stop() == 0
        pacs.stop()


def test_delivery_attempts_of_each_destination_are_served_from_zero(daemon_factory) -> None:
    """Before any attempt, every destination's delivered, retry and failed series is there
    at 0: a series that first appears at 1 hides that attempt from increase() and rate(),
    and an alert on failed deliveries missed the first failure after every start."""
    pacs = {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    daemon = daemon_factory(
        {"destinations": [{"name": "pacs", **pacs}, {"name": "archive", **pacs}]}
    ).start()
    samples = scrape(daemon)
    for destination in ("pacs", "archive"):
        for outcome in ("delivered", "retry", "failed"):
            assert (
                value(
                    samples,
                    "triage_delivery_attempts_total",
                    destination=destination,
                    outcome=outcome,
                )
                == 0
            ), (destination, outcome)
    assert daemon.stop() == 0


def test_http_can_be_disabled_and_a_taken_port_stops_start_up(daemon_factory) -> None:
    off = daemon_factory({"http": {"enabled": False}}, name="off").start()
    assert log_events(off, "http_ready") == []
    assert log_events(off, "ready")[-1]["http_port"] is None
    taken = http_port(daemon_factory(name="first").start())
    second = daemon_factory({"http": {"port": taken}}, name="second")
    second.start(wait=False)
    assert second.process.wait(120) == 1
    assert f"cannot serve HTTP on 127.0.0.1:{taken}" in second.log_text()
    assert off.stop() == 0


def test_association_totals_are_read_incrementally(store_url: str) -> None:
    """The scrape-time collector keeps the totals of ended associations and reads only newer
    rows: deleting already-counted rows changes nothing, an ACTIVE row is counted once it ends."""
    from datetime import timedelta

    from sqlalchemy import delete, update

    from triage.store.db import make_engine, upgrade_schema
    from triage.store.models import AssociationOutcome, AssociationRecord, utcnow
    from triage.store.queries import AssociationCounter
    from triage.store.repository import Store

    engine = make_engine(store_url)
    upgrade_schema(engine)
    store = Store(engine)
    ids = [
        store.open_association("PACS", "TRIAGE", "127.0.0.1", 1000 + n, False, 1) for n in range(4)
    ]
    with store.session() as session, session.begin():
        # Settled rows (older than a minute) may move the watermark; the last one is recent.
        session.execute(
            update(AssociationRecord)
            .where(AssociationRecord.id.in_(ids[:3]))
            .values(started_at=utcnow() - timedelta(minutes=5))
        )
    store.close_association(ids[0], AssociationOutcome.RELEASED, stored=3, bytes_stored=300)
    store.close_association(ids[2], AssociationOutcome.REJECTED, reason="not allowed")
    store.close_association(ids[3], AssociationOutcome.RELEASED, echoes=1)
    counter = AssociationCounter()

    def totals():  # type: ignore[no-untyped-def]
        with store.read_session() as session:
            return counter.totals(session)

    first = totals()
    assert first.by_outcome == {"ACTIVE": 1, "RELEASED": 2, "ABORTED": 0, "REJECTED": 1}
    assert (first.stored, first.bytes_stored, first.echoes) == (3, 300, 1)
    store.close_association(ids[1], AssociationOutcome.ABORTED, stored=1, duplicate=2, failed=1)
    second = totals()
    assert second.by_outcome == {"ACTIVE": 0, "RELEASED": 2, "ABORTED": 1, "REJECTED": 1}
    assert (second.stored, second.duplicate, second.failed) == (4, 2, 1)
    # Rows 1-3 are settled and counted: gone from the table, still in the totals. Row 4 is
    # recent and re-read each time.
    with store.session() as session, session.begin():
        session.execute(delete(AssociationRecord).where(AssociationRecord.id.in_(ids[:3])))
    assert totals() == second
    engine.dispose()


@pytest.fixture
def read_only_outbox(tmp_path):  # type: ignore[no-untyped-def]
    """A daemon's outbox folder made read-only: a read-only bind mount as root (permission
    bits do not stop root), else the folder's mode."""
    import contextlib
    import os
    import subprocess

    spool = tmp_path / "daemon" / "spool"
    outbox = spool / "outbox"
    outbox.mkdir(parents=True)
    (spool / "tmp").mkdir()
    if os.geteuid() != 0:
        outbox.chmod(0o555)
        yield
        outbox.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(outbox), str(outbox)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        remount = ["mount", "-o", "remount,bind,ro", str(outbox)]
        if subprocess.run(remount, check=False).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", str(outbox)], check=False)


def test_readyz_reports_an_outbox_it_cannot_write(daemon_factory, read_only_outbox) -> None:
    """A read-only remount of the outbox failed every study's outputs while /readyz said
    "ready" (it checked free space only)."""
    daemon = daemon_factory().start()
    status, _, body = get(daemon, "/readyz")
    ready = json.loads(body)
    assert status == 503 and ready["failed"] == ["spool"]
    assert ready["checks"]["spool"]["unwritable"] == ["outbox"]
    assert daemon.stop() == 0


def test_association_counter_survives_audit_purge_behind_an_active_row(store, tmp_path) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from triage.store.models import AssociationOutcome, AssociationRecord, utcnow
    from triage.store.operations import purge
    from triage.store.queries import AssociationCounter
    from triage.store.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    # An association still ACTIVE for days (a dead listener's row not closed yet): every row
    # after it stays above the watermark.
    store.open_association("PACS", "TRIAGE", "10.0.0.1", 1, False, 999)
    ids = [store.open_association("PACS", "TRIAGE", "10.0.0.2", 2, False, 1) for _ in range(5)]
    for association in ids:
        store.close_association(association, AssociationOutcome.RELEASED, stored=2)
    with store.session() as session, session.begin():
        session.execute(update(AssociationRecord).values(started_at=utcnow() - timedelta(days=10)))
    counter = AssociationCounter()

    def totals():  # type: ignore[no-untyped-def]
        with store.read_session() as session:
            return counter.totals(session)

    before = totals()
    assert (before.by_outcome["RELEASED"], before.stored) == (5, 10)
    assert purge(store, spool, 30.0, audit_older_than_days=7).associations == 5
    after = totals()
    assert (after.by_outcome["RELEASED"], after.stored) == (5, 10)
    assert after.by_outcome["ACTIVE"] == 1


def _overlapping(call: BoundedCall, work: Callable[[], object], n: int = 3) -> list[object]:
    results: list[object] = []

    def one() -> None:
        try:
            results.append(call(work))
        except StoreNotAnswering as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    return results


def test_overlapping_calls_on_a_store_that_answers_all_succeed() -> None:
    call = BoundedCall("t", 3.0, busy="busy")
    try:
        assert _overlapping(call, lambda: time.sleep(0.3) or "ok") == ["ok", "ok", "ok"]
    finally:
        call.close()


def test_a_store_that_hangs_still_bounds_every_call() -> None:
    release = threading.Event()
    call = BoundedCall("t", 0.5, busy="busy")
    try:
        started = time.monotonic()
        results = _overlapping(call, lambda: release.wait(30))
        assert all(isinstance(r, StoreNotAnswering) for r in results)
        assert time.monotonic() - started < 2.0
        # Past its bound, the hung call makes the next one fail at once.
        started = time.monotonic()
        with pytest.raises(StoreNotAnswering):
            call(lambda: "ok")
        assert time.monotonic() - started < 0.2
        release.set()
        time.sleep(0.1)
        assert call(lambda: "ok") == "ok"  # answering again: ready again
    finally:
        release.set()
        call.close()


def test_an_idle_http_client_is_dropped(tmp_path) -> None:
    from triage.config import HttpConfig
    from triage.health import Health
    from triage.httpd import HttpServer
    from triage.store.db import make_engine, upgrade_schema
    from triage.store.repository import Store
    from triage.store.spool import Spool

    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade_schema(engine)
    health = Health(Store(engine), Spool(tmp_path / "spool"), listener=False)
    http = HttpServer(HttpConfig(bind="127.0.0.1", port=0), health)
    http.start()
    try:
        with socket.create_connection(("127.0.0.1", http.port)) as client:
            client.sendall(b"GET /heal")  # and nothing more
            client.settimeout(20)
            started = time.monotonic()
            try:
                data = client.recv(1024)
            except TimeoutError:
                data = None
            assert data is not None, "the server still holds the idle connection after 20 s"
            assert time.monotonic() - started < 20
    finally:
        http.stop()
        health.close()
        engine.dispose()


@contextlib.contextmanager
def _serving(tmp_path, bind: str = "127.0.0.1") -> Iterator[Any]:
    """An HttpServer (over an empty SQLite store, no listener) serving on *bind*, port 0."""
    from triage.config import HttpConfig
    from triage.health import Health
    from triage.httpd import HttpServer
    from triage.store.db import make_engine, upgrade_schema
    from triage.store.repository import Store
    from triage.store.spool import Spool

    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade_schema(engine)
    health = Health(Store(engine), Spool(tmp_path / "spool"), listener=False)
    http = HttpServer(HttpConfig(bind=bind, port=0), health)
    http.start()
    try:
        yield http
    finally:
        http.stop()
        health.close()
        engine.dispose()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_http_binds_to_an_ipv6_address_and_to_both_stacks_on_double_colon(tmp_path) -> None:
    """``[http] bind = "::1"`` or ``"::"`` passes the config check: it must serve too (the
    stdlib server is IPv4 only, and start-up failed with "Address family for hostname not
    supported"). ``::`` answers IPv4 clients as well, as the DICOM listener's does."""

    def status(host: str, port: int) -> int:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=10) as response:
            return response.status

    def answered(host: str, port: int) -> int:
        try:
            return status(host, port)
        except urllib.error.HTTPError as exc:  # 503: no loop registered; but it answered
            return exc.code

    skip_without_ipv6()
    with _serving(tmp_path / "one", "::1") as http:
        assert answered("[::1]", http.port) == 503
    with _serving(tmp_path / "any", "::") as http:
        assert answered("[::1]", http.port) == 503
        assert answered("127.0.0.1", http.port) == 503


def test_clients_that_reset_their_connection_leave_the_log_json_and_quiet(tmp_path) -> None:
    """A TCP probe or port scan that resets the connection, before its request or before
    the answer: socketserver printed a bare traceback to stderr for each (lines that are not
    JSON, in the journal), and a reset during the answer was an error with its traceback.
    Now nothing is logged at info level, and every line stays JSON."""
    import subprocess
    import sys

    script = """
import socket, struct, sys, time, urllib.request
from pathlib import Path
from triage.logs import configure_logging
configure_logging("info", "json")
from tests.test_http import _serving

def reset(port, payload):
    client = socket.create_connection(("127.0.0.1", port))
    if payload:
        client.sendall(payload)
    time.sleep(0.2)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()

with _serving(Path(sys.argv[1])) as http:
    reset(http.port, b"")
    reset(http.port, b"GET /hea")
    client = socket.create_connection(("127.0.0.1", http.port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sendall(b"GET /readyz HTTP/1.0\\r\\n\\r\\n")
    client.close()
    time.sleep(0.5)
    with urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=10) as answer:
        assert answer.status == 200, answer.status  # and it still serves
"""
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "Exception occurred" not in run.stderr, run.stderr
    for line in run.stderr.splitlines():
        assert json.loads(line)["level"] in ("debug", "info"), line


def test_readyz_is_not_ready_once_the_daemon_is_stopping(daemon_factory) -> None:
    """After SIGTERM the listener closes its socket at once, but its process lives on while
    an association finishes (the grace): /readyz said ready all that time, so a probe kept
    sending peers to a daemon that refused them. Now "stopping" fails it from the start."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    daemon = daemon_factory({"dicom": {"shutdown_grace_s": 20}}).start()
    assert get(daemon, "/readyz")[0] == 200
    requestor = AE(ae_title="HOLDER")
    requestor.add_requested_context(Verification)
    assoc = requestor.associate("127.0.0.1", daemon.port, ae_title=daemon.ae_title)
    assert assoc.is_established
    try:
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log('"event": "stopping"', 30)
        status, _, body = get(daemon, "/readyz")
        ready = json.loads(body)
        assert status == 503 and "stopping" in ready["failed"], body
    finally:
        assoc.release()
    assert daemon.process.wait(60) == 0


def test_the_oldest_queued_age_is_never_negative(tmp_path) -> None:
    """On a shared store another host (its clock a little ahead) may have queued the study:
    its age was scraped as negative."""
    from datetime import timedelta

    from prometheus_client import CollectorRegistry, generate_latest
    from sqlalchemy import update

    from tests.test_work_queue import queued_study
    from triage.metrics import StoreCollector
    from triage.store.db import make_engine, upgrade_schema
    from triage.store.models import Study, utcnow
    from triage.store.repository import Store
    from triage.store.spool import Spool

    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade_schema(engine)
    store = Store(engine)
    queued_study(store, 1)
    with engine.begin() as connection:
        ahead = utcnow() + timedelta(seconds=5)
        connection.execute(update(Study).values(state_changed_at=ahead))
    registry = CollectorRegistry()
    collector = StoreCollector(store, Spool(tmp_path / "spool"))
    registry.register(collector)
    try:
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples
        }
        assert value(samples, "triage_studies", state="QUEUED") == 1
        assert value(samples, "triage_oldest_queued_age_seconds") == 0
    finally:
        collector.close()
        engine.dispose()


def test_a_spool_that_does_not_answer_bounds_readyz_and_metrics(tmp_path, monkeypatch) -> None:
    """statvfs on a hung network filesystem (the shared spool of a scale-out) never returns:
    /readyz and /metrics answer within their bound, the spool check failed, and the next
    probe fails at once instead of leaving one more thread hung."""
    from triage import health as health_module
    from triage.health import Health
    from triage.metrics import StoreCollector
    from triage.store.db import make_engine, upgrade_schema
    from triage.store.repository import Store
    from triage.store.spool import Spool

    hung = threading.Event()

    def never_answers(spool: Spool) -> int:
        hung.wait(60)
        return 0

    monkeypatch.setattr(health_module, "SPOOL_CHECK_TIMEOUT_S", 0.5)
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    upgrade_schema(engine)
    store, spool = Store(engine), Spool(tmp_path / "spool")
    spool.prepare()
    health = Health(store, spool, listener=False)
    collector = StoreCollector(store, spool)
    monkeypatch.setattr(Spool, "free_bytes", never_answers)
    try:
        for _ in range(2):
            started = time.monotonic()
            ready, checks = health.ready()
            assert time.monotonic() - started < 2.0
            assert not ready and checks["spool"]["ok"] is False and checks["store"]["ok"]
        started = time.monotonic()
        names = {family.name for family in collector.collect()}
        assert time.monotonic() - started < 15.0  # SCRAPE_STORE_TIMEOUT_S at most
        assert "triage_store_up" in names and "triage_spool_free_bytes" not in names
    finally:
        hung.set()
        health.close()
        collector.close()
        engine.dispose()
