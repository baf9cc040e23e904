"""The daemon refuses a model it must not run, with one clear line."""

from __future__ import annotations

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
