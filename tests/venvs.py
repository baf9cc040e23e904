"""Fresh Pythons that see this .venv's packages, minus some: for tests of what another
Python (an installed wheel, the GPU machine's image) finds."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path


def venv_seeing_this_one(root: Path, hidden: Callable[[str], bool]) -> Path:
    """A venv at *root* (no pip) whose site-packages sees this one's entries except those
    *hidden* says (by name) and the .pth files; returns its python.

    The entries are linked into a folder named by a .pth line rather than the site-packages
    itself: its .pth files would not run from there, and its dist-infos of what is hidden
    would still make them installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    own_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    visible = root / "visible-packages"
    visible.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not hidden(entry.name) and not entry.name.endswith(".pth"):
            (visible / entry.name).symlink_to(entry)
    Path(own_site, "visible.pth").write_text(f"{visible}\n")
    return python
