"""The daemon's periodic jobs run at start, however late the scheduler is started."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from triage.config import load_config
from triage.scheduler import Scheduler
from triage.store.db import make_engine, upgrade_schema
from triage.store.repository import Store


def test_every_job_runs_at_start_even_when_the_scheduler_starts_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon makes its scheduler, then starts the listener processes (seconds on a busy
    # host), then the scheduler: APScheduler's default grace of 1 s skipped the purge at
    # start, and it came an hour later.
    purged = threading.Event()
    monkeypatch.setattr(Scheduler, "purge_expired", lambda self: purged.set() or 0)
    config = load_config(None, env={}, base_dir=tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path / 'triage.db'}")
    upgrade_schema(engine)
    scheduler = Scheduler(config, Store(engine))
    time.sleep(1.5)
    scheduler.start()
    try:
        assert purged.wait(10), "the purge did not run at start"
    finally:
        scheduler.stop()
        engine.dispose()


def test_the_hourly_purge_removes_temp_files_no_one_writes_any_more(tmp_path: Path) -> None:
    # A C-STORE that pynetdicom served as another service leaves its received file behind;
    # a peer retrying it would otherwise fill the disk before the next start.
    import os

    from triage.store.spool import Spool

    config = load_config(None, env={}, base_dir=tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path / 'triage.db'}")
    upgrade_schema(engine)
    spool = Spool(config.spool_path)
    spool.prepare()
    stale, current = spool.temp_dir / "stale.part", spool.temp_dir / "being-received.part"
    stale.write_bytes(b"left behind")
    current.write_bytes(b"arriving")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    try:
        Scheduler(config, Store(engine)).purge_expired()
    finally:
        engine.dispose()
    assert not stale.exists() and current.exists()


def test_the_hourly_purge_makes_the_temp_folder_again_if_a_cleaner_removed_it(
    tmp_path: Path,
) -> None:
    # The listener receives into it: without it every C-STORE is refused until a restart,
    # and the purge (which refuses a spool without it) would fail every hour.
    import shutil

    from triage.store.spool import Spool

    config = load_config(None, env={}, base_dir=tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path / 'triage.db'}")
    upgrade_schema(engine)
    spool = Spool(config.spool_path)
    spool.prepare()
    shutil.rmtree(spool.temp_dir)
    try:
        assert Scheduler(config, Store(engine)).purge_expired() == 0
    finally:
        engine.dispose()
    assert spool.temp_dir.is_dir()


def test_a_purge_in_progress_ends_when_the_scheduler_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first purge after retention is switched on can take minutes on network storage:
    # the stop waited for all of it, past systemd's TimeoutStopSec.
    from datetime import timedelta

    import triage.store.operations as operations
    from tests.test_work_queue import queued_study
    from triage.store.models import StudyState, utcnow
    from triage.store.operations import cancel
    from triage.store.spool import Spool

    config = load_config(None, env={}, base_dir=tmp_path)
    engine = make_engine(f"sqlite:///{tmp_path / 'triage.db'}")
    upgrade_schema(engine)
    store = Store(engine)
    spool = Spool(config.spool_path)
    spool.prepare()
    for n in range(30):
        study = queued_study(store, n, views=1)
        spool.write(f"{study}/{study}.0.dcm", [b"an instance"])
        cancel(store, study, "finished")
    removing = threading.Event()
    remove_file = operations._remove_file

    def slowly(path, dry_run):  # type: ignore[no-untyped-def]
        removing.set()
        time.sleep(0.2)
        return remove_file(path, dry_run)

    monkeypatch.setattr(operations, "_remove_file", slowly)
    monkeypatch.setattr(operations, "utcnow", lambda: utcnow() + timedelta(days=60))
    scheduler = Scheduler(config, Store(engine))
    purging = threading.Thread(target=scheduler.purge_expired)
    scheduler.start()
    purging.start()
    assert removing.wait(10)
    started = time.monotonic()
    scheduler.stop()
    purging.join(5)
    assert not purging.is_alive() and time.monotonic() - started < 5
    # The batch's rows stayed (its files part gone): the next purge finishes it.
    assert store.counts_by_state() == {StudyState.CANCELLED: 30}
    monkeypatch.setattr(operations, "_remove_file", remove_file)
    Scheduler(config, Store(engine)).purge_expired()
    assert store.counts_by_state() == {}
    assert not list(spool.root.glob("1.2.826.*"))
    engine.dispose()
