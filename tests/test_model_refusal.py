"""The daemon refuses a model it must not run, with one clear line."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)


def _start_fails(daemon) -> str:  # type: ignore[no-untyped-def]
    daemon.start(wait=False)
    assert daemon.process.wait(180) == 2  # a configuration problem: systemd does not restart
    return daemon.log_text()


def test_unvalidated_model_is_refused_unless_allowed(daemon_factory) -> None:
    daemon = daemon_factory({"worker": {"enabled": True}})
    log = _start_fails(daemon)
    assert (
        "triage: model mura-densenet169-demo 0.0.0-demo is not validated; set [model] "
        "allow_unvalidated = true to run it anyway (not for clinical use)"
    ) in log


def test_card_whose_weights_are_missing_or_altered_stops_the_daemon(daemon_factory, tmp_path):
    import torch

    from triage.scoring.card import load_card, write_card
    from triage.scoring.model import build_densenet169

    weights = tmp_path / "model" / "weights.pt"
    weights.parent.mkdir()
    torch.save(build_densenet169().state_dict(), weights)
    card_path = tmp_path / "model" / "card.toml"
    write_card(
        card_path,
        name="site-model",
        version="1.0",
        weights_file=weights,
        training_data="synthetic",
        validated=True,
    )
    assert load_card(card_path).validated
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # altered after the card
    daemon = daemon_factory({"worker": {"enabled": True}, "model": {"card": str(card_path)}})
    log = _start_fails(daemon)
    assert "cannot load the model: model card" in log and "sha256" in log
    weights.unlink()
    daemon2 = daemon_factory(
        {"worker": {"enabled": True}, "model": {"card": str(card_path)}}, name="d2"
    )
    log = _start_fails(daemon2)
    assert "cannot load the model: model card" in log and "weights.pt" in log


def test_weights_that_are_not_finite_stop_the_daemon_before_it_listens(daemon_factory, tmp_path):
    import torch

    from triage.scoring.card import write_card
    from triage.scoring.model import build_densenet169

    state = build_densenet169().state_dict()
    state["classifier.weight"][0, 0] = float("nan")  # a training run that diverged
    weights = tmp_path / "model" / "weights.pt"
    weights.parent.mkdir()
    torch.save(state, weights)
    card_path = write_card(
        tmp_path / "model",
        name="site-model",
        version="1.0",
        weights_file=weights,
        training_data="synthetic",
        validated=True,
    ).path
    daemon = daemon_factory({"worker": {"enabled": True}, "model": {"card": str(card_path)}})
    log = _start_fails(daemon)
    assert "holds values that are not finite numbers" in log
    assert "listener_started" not in log


def test_a_worker_that_cannot_start_stops_the_listener_and_the_daemon(daemon_factory) -> None:
    # Whatever breaks the warm-up (here a fault put in its place): the daemon must not stay
    # up accepting studies that nothing will score.
    daemon = daemon_factory(
        {"worker": {"enabled": True, "decode_processes": 1}, "model": {"allow_unvalidated": True}}
    )
    script = (
        "import sys\n"
        "from triage.scoring.worker import Worker\n"
        "def warm_up(self):\n"
        "    raise RuntimeError('no decode process would start')\n"
        "Worker.warm_up = warm_up\n"
        "from triage.cli.main import main\n"
        f"sys.exit(main(['--config', {str(daemon.config_path)!r}, 'serve']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=daemon.workdir,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert (
        "triage: cannot start the worker: RuntimeError: no decode process would start"
        in result.stderr
    )
    with socket.socket() as probe:  # the listener is gone with it
        probe.bind(("127.0.0.1", daemon.port))
