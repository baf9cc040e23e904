"""The spool's clean-up of temp files at start."""

from __future__ import annotations

import os
import time
from pathlib import Path

from triage.store.spool import Spool


def test_prepare_can_spare_the_temp_files_of_a_running_daemon(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    old = spool.temp_dir / "left-by-a-crash.part"
    old.write_bytes(b"partial")
    an_hour_ago = time.time() - 3601
    os.utime(old, (an_hour_ago, an_hour_ago))
    in_flight = spool.temp_dir / "being-written.part"
    in_flight.write_bytes(b"partial")

    assert spool.prepare(older_than_s=3600) == 1
    assert not old.exists() and in_flight.exists()
    assert spool.prepare() == 1
    assert not in_flight.exists()
