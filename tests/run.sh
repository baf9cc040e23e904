#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it all.
#   apt: DCMTK (peers), dicom3tools (dciodvfy), Orthanc (the PACS), PostgreSQL, openssl
#   pip: the package with its test extras, into ./.venv
# Usage: ./tests/run.sh [pytest args]    (TEST_WORKERS=N: N pytest-xdist workers, default 2)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_packages=(dcmtk dicom3tools orthanc postgresql openssl python3-venv)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  # Orthanc's package starts a service; tests run their own instances on free ports.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The store suite runs on PostgreSQL too: make sure the local server is up.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  for version in $(ls /etc/postgresql 2>/dev/null); do
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  done
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

# A fresh Debian cluster takes TCP logins by password only (scram-sha-256), and the tests log
# in over TCP as postgres (tests/conftest.py): where that fails, give the role a password over
# the local socket and hand the tests a URL with it.
if [ -z "${MSK_TRIAGE_TEST_PG:-}" ] && [ "${MSK_TRIAGE_SKIP_PG:-}" != 1 ] &&
  ! PGCONNECT_TIMEOUT=5 psql -qtAXw "postgresql://postgres@127.0.0.1:5432/postgres" \
    -c 'select 1' >/dev/null 2>&1; then
  pg_password=msk-triage-test
  if as_root runuser -u postgres -- psql -qX -c "ALTER ROLE postgres PASSWORD '$pg_password'"; then
    export MSK_TRIAGE_TEST_PG="postgresql://postgres:$pg_password@127.0.0.1:5432/postgres"
  fi
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/ruff check triage tests bench alembic
# Two workers by default (TEST_WORKERS=0 runs the tests in this one process); a -n in the
# arguments wins. --pdb and --trace need the tests in this process (xdist refuses them).
workers=${TEST_WORKERS:-2}
for arg in "$@"; do
  case $arg in --pdb | --trace) workers=0 ;; esac
done
set +e
.venv/bin/python -m pytest -n "$workers" --dist worksteal "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"
