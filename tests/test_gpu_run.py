"""The prepared GPU run (bench/gpu_run.sh), checked on the CPU before a GPU is lent.

The lent GPU machine reaches nothing outside itself, and its Python holds torch and the
common scientific packages but not the DICOM, store and logging ones: bench/gpu_wheels.sh
downloads those as wheels, which the device call carries. A missing one would cost a whole
device session. So this test builds a Python like the machine's — this checkout's .venv
without the packages the machine lacks (RECORD files say which top-level entries are theirs)
— installs the wheels the script downloads (for this Python's version), and runs the steps
with the CPU as the device and small sizes.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.venvs import venv_seeing_this_one

REPO = Path(__file__).resolve().parents[1]
#: What the GPU machine's image lacks of what this project installs (the wheels' list plus
#: what the run does not need there: PostgreSQL's driver, the linter, the project itself).
NOT_ON_THE_MACHINE = [
    *("pydicom", "pynetdicom", "highdicom", "pyjpegls", "pylibjpeg", "pylibjpeg-libjpeg"),
    *("pylibjpeg-openjpeg", "pylibjpeg-rle", "SQLAlchemy", "alembic", "Mako", "APScheduler"),
    *("tzlocal", "structlog", "psycopg", "psycopg-binary", "ruff", "msk-triage"),
]


def _top_level_entries(distribution: str) -> set[str]:
    """The names directly in site-packages that *distribution* installed."""
    files = importlib.metadata.distribution(distribution).files or []
    return {file.parts[0] for file in files if not file.parts[0].startswith("..")}


def _machine_like_python(root: Path) -> Path:
    """A venv that sees this .venv's packages except NOT_ON_THE_MACHINE."""
    hidden: set[str] = set()
    for name in NOT_ON_THE_MACHINE:
        try:
            hidden |= _top_level_entries(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return venv_seeing_this_one(root, hidden.__contains__)


@pytest.mark.slow
def test_the_gpu_run_works_on_a_python_like_the_machines(tmp_path: Path):
    python = _machine_like_python(tmp_path / "python")
    absent = subprocess.run(
        [str(python), "-c", "import pydicom"], cwd=tmp_path, capture_output=True, text=True
    )
    assert absent.returncode != 0, "the machine-like Python should not have pydicom"

    wheels = tmp_path / "wheels"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_wheels.sh"), str(wheels)],
        env={**os.environ, "GPU_PYTHON_VERSION": version, "PYTHON": sys.executable},
        check=True,
        capture_output=True,
        timeout=300,
    )
    out = tmp_path / "out"
    env = {
        key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env |= {
        "PYTHON": str(python),
        "OUT": str(out),
        "GPU_RUN_DEVICE": "cpu",
        "GPU_RUN_WHEELS": str(wheels),
        "GPU_RUN_SITE": str(tmp_path / "site"),
        "SCORING_ARGS": (
            "--studies 2 --size-mb 0.5 --batch 2 --reps 1 --decode-processes 2 --worker-processes 2"
        ),
        "TRAIN_ARGS": "--device cpu --steps 1 --warmup 1 --size 64",
    }
    run = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_run.sh"), "env", "tests", "eager", "train"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "every module imports" in (out / "env.txt").read_text()
    tests = (out / "tests.txt").read_text()
    assert "passed" in tests or "skipped" in tests  # the CUDA tests skip on a CPU
    eager = (out / "eager.txt").read_text()
    assert "scoring path: results + SR + CAM overlays" in eager
    assert "decode/rest" in eager
    assert "2 `triage worker` × 1 decode procs" in eager
    assert "decode processes busy: results + SR" in eager and "2 worker processes" in eager
    assert (out / "train.json").exists()
    for name in ("env", "tests", "eager", "train"):
        assert f"=== {name}: exit status 0" in (out / f"{name}.txt").read_text()
