"""`triage demo` against a running daemon: studies in, worklist out."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_end_to_end import scoring_config

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


def test_demo_sends_studies_and_prints_the_worklist(daemon_factory) -> None:
    daemon = daemon_factory(scoring_config()).start()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "triage",
            "--config",
            str(daemon.config_path),
            "demo",
            "--studies",
            "8",
            "--timeout",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "sent 8 synthetic studies (17 images)" in out
    worklist = out.split("Worklist (most likely abnormal first)")[1].split("Where the results")[0]
    rows = [line for line in worklist.splitlines()[2:] if line.strip()]
    assert len(rows) == 8
    probabilities = [float(line.split()[2]) for line in rows if line.split()[1].startswith("XR_")]
    assert len(probabilities) == 7 and probabilities == sorted(probabilities, reverse=True)
    # The skipped study says why, whole: BodyPartExamined 'CHEST' names chest.
    assert "SKIPPED" in rows[-1] and "CHEST" in rows[-1].split("(", 1)[1]
    assert out.count("kept in") == 7
    assert daemon.stop() == 0


def test_demo_says_what_to_do_when_the_daemon_is_not_running(daemon_factory) -> None:
    daemon = daemon_factory()  # configured, never started
    result = subprocess.run(
        [sys.executable, "-m", "triage", "--config", str(daemon.config_path), "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "is the daemon running?" in result.stdout
