"""The distribution ships every package and the migrations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.venvs import venv_seeing_this_one

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_under_triage_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "triage").rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert {"triage._migrations", "triage._migrations.versions"} <= listed
    assert (ROOT / "alembic" / "env.py").is_file()


# --- the wheel, installed as README's systemd section does (not editable) ---------------------

#: What the wheel is built from (a copy: building in the checkout would leave build/ there).
_SOURCES = ("pyproject.toml", "README.md", "triage", "alembic", "models")


def _build_wheel(work: Path) -> Path:
    """The msk-triage wheel, built by setuptools from a copy of the sources."""
    import shutil

    source = work / "source"
    source.mkdir()
    for name in _SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = work / "dist"
    # The backend directly: pip would add seconds and need no more than this.
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools.build_meta import build_wheel; build_wheel({str(dist)!r})",
        ],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = dist.glob("msk_triage-*.whl")
    return wheel


def _venv_with_dependencies(root: Path) -> Path:
    """A fresh venv that sees this .venv's packages, but not its editable msk-triage."""
    return venv_seeing_this_one(root, lambda name: name.startswith(("msk_triage", "__editable__")))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_installed_wheel_migrates_a_store_and_finds_the_demo_card(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "triage/_migrations/env.py" in names
    assert "triage/_models/demo/card.toml" in names
    python = _venv_with_dependencies(tmp_path / "venv")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"),
            *("--no-index", "--quiet", "--disable-pip-version-check", str(wheel)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    bin_dir = python.parent
    workdir = tmp_path / "empty"  # like /var/lib/msk-triage: no checkout next to it
    workdir.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV") and not key.startswith("TRIAGE_")
    }
    config = tmp_path / "store.toml"
    config.write_text('[store]\nurl = "sqlite:///var/triage.db"\nspool_dir = "var/spool"\n')

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=workdir, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    where = run(str(python), "-c", "import triage; print(triage.__file__)")
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    upgrade = run(str(bin_dir / "triage-admin"), "--config", str(config), "db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert (workdir / "var" / "triage.db").is_file()
    for name in ("quickstart.toml", "triage.toml"):
        shown = run(str(bin_dir / "triage"), "--config", str(ROOT / "deploy" / name), "config")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        card = Path(json.loads(shown.stdout)["model"]["card"])
        assert card.is_file() and card.is_relative_to(tmp_path / "venv"), card


@pytest.mark.parametrize("uid", ["0", "1000"])
def test_quickstart_updates_the_package_lists_before_installing_venv(
    tmp_path: Path, uid: str
) -> None:
    """On a fresh Debian machine (empty package lists, no python3-venv) quickstart.sh must
    run `apt-get update` before `apt-get install`, as root and through sudo alike (through
    sudo it did not: "Unable to locate package python3-venv")."""
    import shutil

    (tmp_path / "deploy").mkdir()
    shutil.copy2(ROOT / "deploy" / "quickstart.sh", tmp_path / "deploy" / "quickstart.sh")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    log = tmp_path / "calls.log"
    scripts = {
        # A Python without venv/ensurepip, that cannot make the venv either: the script stops.
        "python3.11": "exit 1",
        "id": f"echo {uid}",
        "sudo": f'echo "sudo $*" >> {log}; "$@"',
        "apt-get": f'echo "apt-get $*" >> {log}',
    }
    for name, body in scripts.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(tmp_path / "deploy" / "quickstart.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0  # the stub Python cannot make .venv
    calls = [line for line in log.read_text().splitlines() if line.startswith("apt-get")]
    assert [call.split()[1] for call in calls] == ["update", "install"], calls
    assert ("sudo apt-get update -qq" in log.read_text()) == (uid != "0")
