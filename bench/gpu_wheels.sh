#!/usr/bin/env bash
# Wheels of what msk-triage needs beyond the GPU machine's own Python, for bench/gpu_run.sh.
#
# The lent GPU machine (an H200 host) reaches nothing outside itself. Its Python (3.12) holds
# torch, torchvision, numpy, pillow, pytest, rich, prometheus-client, typing-extensions and
# packaging, but none of the DICOM, store or logging packages. This downloads those, at the
# versions installed in this checkout's .venv (what CI tests), as wheels for that Python into
# .whl/ (git-ignored; ~20 MB), which a device call carries:
#
#   bash bench/gpu_wheels.sh               # here, once: fills .whl/
#   device run, carry [".whl"]:  bash bench/gpu_run.sh
#
# GPU_PYTHON_VERSION (default 3.12) names the target Python; 3.11 gives wheels for this VM's,
# which tests/test_gpu_run.py uses to check that the set is complete.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${1:-.whl}
python_version=${GPU_PYTHON_VERSION:-3.12}
py=${PYTHON:-.venv/bin/python}
# Imported by triage and the benchmarks (pyproject.toml), minus what the machine has. Not
# psycopg: the machine has no PostgreSQL to reach.
packages=(
  pydicom pynetdicom highdicom pyjpegls
  pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle
  SQLAlchemy alembic Mako APScheduler tzlocal structlog
)
platforms=()
for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done

mkdir -p "$dest"
rm -f "$dest"/*.whl
for name in "${packages[@]}"; do
  version=$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platforms[@]}" -d "$dest" "$name==$version"
done
ls "$dest"
du -sh "$dest"
