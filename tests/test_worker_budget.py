"""How the worker splits the host's cores between the model's threads and decode processes."""

from __future__ import annotations

import dataclasses

import pytest

from triage.config import Config, load_config
from triage.scoring import worker
from triage.scoring.worker import decode_process_count, torch_threads


def _config(*, device: str = "cpu", threads: int = 0, decode_processes: int = 0) -> Config:
    base = load_config(None, env={})
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, device=device, threads=threads),
        worker=dataclasses.replace(base.worker, decode_processes=decode_processes),
    )


@pytest.mark.parametrize(
    ("cores", "model_threads", "processes"),
    [(1, 1, 1), (2, 1, 1), (4, 2, 2), (16, 8, 8)],
)
def test_cpu_host_default_split_gives_decoding_the_cores_the_model_leaves(
    monkeypatch: pytest.MonkeyPatch, cores: int, model_threads: int, processes: int
) -> None:
    monkeypatch.setattr(worker.multiprocessing, "cpu_count", lambda: cores)
    assert torch_threads(_config()) == model_threads
    assert decode_process_count(0, on_gpu=False) == processes


def test_gpu_host_decodes_on_every_core_but_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker.multiprocessing, "cpu_count", lambda: 16)
    monkeypatch.setattr(worker, "runs_on_gpu", lambda config: True)
    assert torch_threads(_config(device="cuda")) == 1
    assert decode_process_count(0, on_gpu=True) == 15


def test_configured_values_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker.multiprocessing, "cpu_count", lambda: 8)
    assert torch_threads(_config(threads=3)) == 3
    assert torch_threads(_config(decode_processes=6)) == 2
    assert torch_threads(_config(decode_processes=12)) == 1
    assert decode_process_count(5, on_gpu=False) == decode_process_count(5, on_gpu=True) == 5


def test_cuda_asked_for_without_a_gpu_counts_as_a_cpu_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker.multiprocessing, "cpu_count", lambda: 2)
    monkeypatch.setattr(worker.torch.cuda, "is_available", lambda: False)
    assert torch_threads(_config(device="cuda")) == 1
