"""`triage demo` against a running daemon: studies in, worklist out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import run_triage
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
    assert "is the daemon running?" in result.stderr and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1


def _demo(config: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_triage(config, "demo", *args, cwd=cwd)


def test_demo_run_elsewhere_than_the_daemon_finds_no_store_and_makes_none(
    daemon_factory, tmp_path
) -> None:
    daemon = daemon_factory(
        {"store": {"url": "sqlite:///var/triage.db", "spool_dir": "var/spool"}}
    ).start()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _demo(daemon.config_path, elsewhere, "--studies", "1")
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr == (
        f"triage demo: no store at {elsewhere}/var/triage.db (relative paths in the config"
        " resolve against the working directory: run from the daemon's, or pass --workdir)\n"
    )
    assert not (elsewhere / "var").exists()
    # --workdir names the daemon's folder: the studies go, and the demo reads its store.
    result = _demo(
        daemon.config_path,
        elsewhere,
        "--workdir",
        str(daemon.workdir),
        "--studies",
        "1",
        "--timeout",
        "1",
    )
    assert "sent 1 synthetic studies" in result.stdout, result.stderr
    assert result.returncode == 1
    assert result.stderr.startswith("triage demo: 1 studies not finished after 1 s;")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (elsewhere / "var").exists()
    assert daemon.stop() == 0


def test_demo_to_a_host_that_does_not_resolve_says_so_in_one_line(daemon_factory) -> None:
    daemon = daemon_factory()  # its config only; nothing needs to run
    result = _demo(daemon.config_path, daemon.workdir, "--host", "nonsense.invalid")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"triage demo: cannot reach nonsense.invalid:{daemon.port}: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_demo_against_a_tls_port_says_so_in_one_line(daemon_factory, tmp_path) -> None:
    from tests.test_listener import _make_pki, _mutual_tls

    daemon = daemon_factory(_mutual_tls(_make_pki(tmp_path / "pki")))  # never started
    result = _demo(daemon.config_path, daemon.workdir)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("triage demo: the daemon's DICOM port ")
    assert "speaks TLS" in result.stderr and len(result.stderr.strip().splitlines()) == 1
