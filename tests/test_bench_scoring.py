"""bench.scoring's compiled reference, on the CPU with a small network.

Its figures are read on a lent GPU machine, in a device call that has to work the first
time; DenseNet-169 takes minutes to compile on a CPU, but the code around the compiler does
not depend on the network, so a small one checks it here.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from torch._dynamo.utils import counters

from bench import scoring

DEMO_CARD = str(scoring.ROOT / "models" / "demo" / "card.toml")


def _small_net(_card: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, kernel_size=32, stride=32),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 1),
    )


def _cache_lookups() -> int:
    """Hits plus misses, as bench.scoring reports them."""
    found = re.fullmatch(
        r"inductor cache (\d+) hit\(s\), (\d+) miss\(es\)", scoring.inductor_cache_use()
    )
    assert found, scoring.inductor_cache_use()
    return int(found[1]) + int(found[2])


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {"device": "cpu", "precision": "fp32", "batch": 2, "compile": True}
    return argparse.Namespace(**(values | overrides))


@pytest.mark.slow
def test_the_compiled_reference_builds_one_static_graph_and_times_it(monkeypatch):
    monkeypatch.setattr(scoring, "_load_weights", _small_net)
    torch._dynamo.reset()
    try:
        before = counters["stats"]["unique_graphs"]
        cache_before = _cache_lookups()
        views_per_s = scoring.compiled_reference(_args(), DEMO_CARD, images=4)
        assert views_per_s is not None and views_per_s > 0
        assert counters["stats"]["unique_graphs"] - before == 1
        # Compiled, or loaded from an earlier run's cache: one lookup either way.
        assert _cache_lookups() == cache_before + 1
    finally:
        torch._dynamo.reset()


def test_a_compiled_reference_that_fails_says_why_and_gives_no_figure(monkeypatch, capsys):
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(scoring, "_load_weights", _small_net)
    monkeypatch.setattr(torch, "compile", refuse)
    assert scoring.compiled_reference(_args(), DEMO_CARD, images=4) is None
    assert "the bare compiled reference failed: RuntimeError: no C++ compiler" in (
        capsys.readouterr().out
    )
