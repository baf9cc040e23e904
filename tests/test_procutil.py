"""Process settings of the scoring path: malloc keeps freed memory for the next batch, oneDNN
keeps the primitives of every batch size; processes exit without collecting their heap."""

from __future__ import annotations

import multiprocessing
import os
import platform
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from triage import procutil
from triage.procutil import ONEDNN_CACHE_VARIABLE, retain_freed_memory, size_primitive_cache
from triage.scoring import worker as worker_module

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Rounds of large buffers alive together, as a forward pass's activations are, then freed.
# Prints the page faults of the rounds after the first.
_ROUNDS = """
import resource, sys
import numpy as np
from triage.procutil import ONEDNN_CACHE_VARIABLE, retain_freed_memory, size_primitive_cache
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def one_round():
    live = [np.ones(size << 20, np.uint8) for size in (24, 4, 20, 1, 16)]
    del live
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode], check=True, capture_output=True, text=True
    )
    return int(done.stdout)


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt settings are glibc's")
def test_retain_freed_memory_applies_on_glibc() -> None:
    assert retain_freed_memory() is True
    assert retain_freed_memory(64 << 20) is True  # idempotent; any trim threshold


@pytest.mark.skipif(not ON_GLIBC, reason="mallopt settings are glibc's")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    # By default glibc gives the top of its heap back once more than twice the largest
    # recent block is free: every round faults its 65 MiB in again (~16,000 pages). Retained,
    # the rounds after the first reuse the same memory.
    assert _faults("default") > 5_000
    assert _faults("retain") < 500


def _without_cache_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # setenv first, so that monkeypatch restores the variables as they were (absent or not)
    # after size_primitive_cache has written one itself.
    for variable in (ONEDNN_CACHE_VARIABLE, "DNNL_PRIMITIVE_CACHE_CAPACITY"):
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)


def test_primitive_cache_has_room_for_every_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_cache_settings(monkeypatch)
    assert size_primitive_cache(16) == 4096
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "4096"
    monkeypatch.delenv(ONEDNN_CACHE_VARIABLE)
    assert size_primitive_cache(1) == 1024  # never below oneDNN's own default
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "1024"


@pytest.mark.parametrize("variable", [ONEDNN_CACHE_VARIABLE, "DNNL_PRIMITIVE_CACHE_CAPACITY"])
def test_an_operators_primitive_cache_setting_wins(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    _without_cache_settings(monkeypatch)
    monkeypatch.setenv(variable, "300")
    assert size_primitive_cache(64) == 300
    assert os.environ.get(ONEDNN_CACHE_VARIABLE, "300") == "300"


# Convolutions at three batch sizes, one or two rounds; the capacity is set the way
# size_primitive_cache sets it: in os.environ, after torch is imported, before the first pass.
_ROUNDS_OF_CONVOLUTIONS = """
import os, sys
import torch
os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = sys.argv[1]
torch.set_num_threads(1)
conv = torch.nn.Conv2d(8, 8, 3).eval()
with torch.inference_mode():
    for _ in range(int(sys.argv[2])):
        for n in (1, 2, 3):
            conv(torch.randn(n, 8, 16, 16))
"""


def _primitives_created(capacity: int, rounds: int) -> int | None:
    env = {k: v for k, v in os.environ.items() if "PRIMITIVE_CACHE" not in k}
    env["ONEDNN_VERBOSE"] = "profile_create"
    done = subprocess.run(
        [sys.executable, "-c", _ROUNDS_OF_CONVOLUTIONS, str(capacity), str(rounds)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    log = done.stdout + done.stderr
    if "create:cache_" not in log:
        return None  # a torch without oneDNN's verbose mode
    return log.count("create:cache_miss")


def test_onednn_takes_the_capacity_set_after_torch_is_imported() -> None:
    first = _primitives_created(1024, rounds=1)
    if first is None:
        pytest.skip("this torch build prints no oneDNN primitive creation")
    assert first > 0
    # With room, the second round finds every primitive of the first; a cache of one
    # primitive evicts them, so the setting made after the import is the one in force.
    assert _primitives_created(1024, rounds=2) == first
    assert _primitives_created(1, rounds=2) > first


# atexit runs its handlers last registered first: the report sees what the exit's
# collections would see once skip_collection_at_exit's handler has run.
_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print(gc.get_freeze_count(), len(gc.get_objects())))
if sys.argv[1] == "skip":
    from triage.procutil import skip_collection_at_exit
    skip_collection_at_exit()
    skip_collection_at_exit()  # once is enough; a second call adds nothing
cycles = []
for _ in range(100_000):
    node = {}
    node["self"] = node
    cycles.append(node)
"""


def _at_exit(mode: str) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", _EXIT, mode], check=True, capture_output=True, text=True
    )
    frozen, tracked = done.stdout.split()
    return int(frozen), int(tracked)


def test_a_process_exits_with_its_heap_left_out_of_the_last_collections() -> None:
    frozen, tracked = _at_exit("skip")
    assert frozen > 100_000 and tracked == 0  # nothing left for the exit's collections to walk
    frozen, tracked = _at_exit("plain")
    assert frozen == 0 and tracked > 100_000


def _skips_collection_at_exit() -> bool:
    return procutil._collection_skipped


def test_decode_processes_exit_without_collecting_their_heap() -> None:
    pool = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=worker_module._init_decode_process,
    )
    with pool:
        assert pool.submit(_skips_collection_at_exit).result(timeout=120)
