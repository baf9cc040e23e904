#!/usr/bin/env bash
# Install msk-triage into ./.venv and start the daemon on its embedded defaults:
# SQLite and spool under ./var, AE title TRIAGE, DICOM port 11112.
# Usage: ./deploy/quickstart.sh [extra `triage` options]
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! "$python" -c "import venv, ensurepip" 2>/dev/null; then
  # A fresh machine's package lists may be empty: update first, with or without sudo.
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/triage --config deploy/quickstart.toml "$@" serve
