"""Process settings of the scoring path: malloc keeps freed memory for the next batch."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from triage.procutil import retain_freed_memory

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Rounds of large buffers alive together, as a forward pass's activations are, then freed.
# Prints the page faults of the rounds after the first.
_ROUNDS = """
import resource, sys
import numpy as np
from triage.procutil import retain_freed_memory
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
