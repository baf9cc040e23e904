"""Real peers for tests: the daemon as a process, DCMTK clients, free ports on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

#: ``storescu -v`` prints this per acknowledged instance; ``-d`` prints the status code instead.
ACKNOWLEDGED = "Received Store Response (Success)"
_DEBUG_STATUS = re.compile(r"DIMSE Status\s*: (0x[0-9a-fA-F]{4})")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's DCMTK leaves Nagle on (FACTS.md)


def dcmtk(tool: str) -> str:
    """The DCMTK binary *tool*. pynetdicom installs look-alike ``storescu``/``echoscu``
    scripts into the virtual environment, which come first on PATH: skip those."""
    venv_bin = Path(sys.prefix).resolve() / "bin"
    for folder in os.get_exec_path():
        candidate = Path(folder) / tool
        if candidate.resolve().parent == venv_bin or Path(folder).resolve() == venv_bin:
            continue
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(f"DCMTK's {tool} is not installed (apt install dcmtk)")


_issued_ports: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_range() -> tuple[int, int]:
    """Below the kernel's ephemeral range; under pytest-xdist, this worker's own slice of it
    (each worker remembers only its own ports, and a port handed out stays unbound for a
    while: a daemon starting, a PACS stopped on purpose)."""
    low, _high = _ephemeral_range()
    first, last = (20000, low - 1) if low > 21000 else (low // 2, low - 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and workers > 1:
        size = (last - first + 1) // workers
        first += int(worker[2:]) % workers * size
        last = first + size - 1
    return first, last


def skip_without_ipv6() -> None:
    """Skip the calling test on a host that cannot bind an IPv6 socket (IPv6 disabled)."""
    import pytest

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 on this host")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody uses now and no earlier call handed out.

    Ports come from below the kernel's ephemeral range: a port from ``bind(0)`` can be taken
    by any outgoing connection (PostgreSQL clients, associations) before the server that
    was meant to get it binds, and a restart on the same port would race the same way.
    """
    first, last = _port_range()
    while True:
        port = random.randint(first, last)
        if port in _issued_ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _issued_ports.add(port)
        return port


def toml_value(value: Any) -> str:
    """Render a Python value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML config; list values of table arrays (``destinations``) become [[…]]."""
    lines: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for entry in body:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
            continue
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # fail here, not in the daemon, on a harness mistake
    return path


@dataclass
class Daemon:
    """`triage serve` in a child process with its own config, folder and log file."""

    workdir: Path
    sections: dict[str, dict[str, Any]]
    command: str = "serve"
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    children: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        dicom = self.sections.setdefault("dicom", {})
        dicom.setdefault("bind", "127.0.0.1")
        dicom.setdefault("port", free_port())
        store = self.sections.setdefault("store", {})
        store.setdefault("url", f"sqlite:///{self.workdir / 'triage.db'}")
        store.setdefault("spool_dir", str(self.workdir / "spool"))
        store.setdefault("min_free_mb", 1)
        self.sections.setdefault("log", {}).setdefault("level", "debug")
        # Port 0: several daemons (and several test runs) never fight over the HTTP port.
        self.sections.setdefault("http", {}).setdefault("port", 0)
        # Ingest tests need no model; scoring tests turn the worker on.
        self.sections.setdefault("worker", {}).setdefault("enabled", False)
        self.config_path = write_config(self.workdir / "triage.toml", self.sections)

    @property
    def port(self) -> int:
        return int(self.sections["dicom"]["port"])

    @property
    def ae_title(self) -> str:
        return str(self.sections["dicom"].get("ae_title", "TRIAGE"))

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, wait: bool = True, timeout: float = 180.0) -> Daemon:
        """Start the process; with *wait*, return once it logged ``ready``.

        A restart first kills what the previous run left behind (its listener and decode
        processes), as systemd empties the unit's control group before a restart:
        a daemon killed with SIGKILL cannot stop its children itself.
        """
        if self.process is not None and self.process.poll() is not None:
            _kill_leftovers(self.children)
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update(self.env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"--- start {self.starts} ---\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "triage", "--config", str(self.config_path), self.command],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        if wait:
            self.wait_for_log('"event": "ready"', timeout, occurrence=self.starts)
            self.children = _children_of(self.process.pid)
        return self

    def wait_for_log(self, needle: str, timeout: float = 30.0, occurrence: int = 1) -> None:
        """Wait until the log holds *needle* at least *occurrence* times."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count(needle) >= occurrence:
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {needle!r}:\n{self.log_text()[-4000:]}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the daemon and every process in its session (listener children)."""
        if self.process is None:
            return
        children = _children_of(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(30)

    def store(self):  # type: ignore[no-untyped-def]
        """A Store on the daemon's database, for assertions."""
        from triage.store.db import make_engine
        from triage.store.repository import Store

        return Store(make_engine(self.sections["store"]["url"]))


def _kill_leftovers(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL those of *pids* that are still our multiprocessing children; wait until gone."""
    alive = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            alive.append(pid)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()]
        time.sleep(0.05)


def _children_of(pid: int) -> list[int]:
    result = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in result.stdout.split()]


@dataclass
class StoreRun:
    """What DCMTK storescu did."""

    returncode: int
    output: str

    @property
    def acknowledged(self) -> int:
        """Instances the peer acknowledged with success."""
        codes = _DEBUG_STATUS.findall(self.output)
        return self.output.count(ACKNOWLEDGED) + codes.count("0x0000")

    @property
    def acknowledged_files(self) -> list[str]:
        """Paths of the files the peer acknowledged with success, in sending order."""
        return acknowledged_files(self.output)

    @property
    def failure_statuses(self) -> list[str]:
        """The status codes of failed store responses (e.g. ``0xa700``)."""
        return [code.lower() for code in _DEBUG_STATUS.findall(self.output) if code != "0x0000"]


def _is_debug_success(line: str) -> bool:
    match = _DEBUG_STATUS.search(line)
    return bool(match) and match.group(1) == "0x0000"


def acknowledged_files(output: str) -> list[str]:
    """From ``storescu -v`` output: the files answered with success (storescu sorts its input,
    so the order is not the command line's)."""
    acknowledged, current = [], None
    for line in output.splitlines():
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: ") :].strip()
        elif current and (line.startswith("I: " + ACKNOWLEDGED) or _is_debug_success(line)):
            acknowledged.append(current)
            current = None
    return acknowledged


def storescu(
    port: int,
    files: list[Path],
    *,
    calling: str = "STORESCU",
    called: str = "TRIAGE",
    extra: list[str] | None = None,
    timeout: float = 120.0,
) -> StoreRun:
    """Send *files* with DCMTK storescu over one association (debug output: status codes)."""
    args = [dcmtk("storescu"), "-d", "-aet", calling, "-aec", called, *(extra or [])]
    args += ["127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(
        args, capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout, check=False
    )
    return StoreRun(result.returncode, result.stdout + result.stderr)


def storescu_background(
    port: int, files: list[Path], log: Path, *, calling: str = "STORESCU", called: str = "TRIAGE"
) -> subprocess.Popen[bytes]:
    """Start storescu without waiting; its verbose output goes to *log*."""
    handle = open(log, "wb")  # noqa: SIM115 - handed to the child
    args = [dcmtk("storescu"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    process = subprocess.Popen(
        [*args, *map(str, files)], stdout=handle, stderr=subprocess.STDOUT, env=DCMTK_ENV
    )
    handle.close()
    return process


def echoscu(
    port: int, *, calling: str = "ECHOSCU", called: str = "TRIAGE", extra: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """One C-ECHO with DCMTK echoscu."""
    return subprocess.run(
        [
            dcmtk("echoscu"),
            "-v",
            "-aet",
            calling,
            "-aec",
            called,
            *(extra or []),
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=60,
        check=False,
    )


def wait_until(  # type: ignore[no-untyped-def]
    predicate, timeout: float = 30.0, interval: float = 0.1, message: str = ""
) -> Any:
    """Poll *predicate* until it returns something truthy; fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(interval)


@dataclass
class Storescp:
    """DCMTK storescp as a PACS that receives our results, on a free port."""

    folder: Path
    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    #: Every storescp started and not yet stopped (conftest stops them after each test).
    running: ClassVar[list[Storescp]] = []

    def start(self) -> Storescp:
        self.folder.mkdir(parents=True, exist_ok=True)
        Storescp.running.append(self)
        log = open(self.folder.parent / f"storescp-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                dcmtk("storescp"),
                "-v",
                "-od",
                str(self.folder),
                "-aet",
                self.ae_title,
                *self.extra,
                str(self.port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise AssertionError("storescp did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        if self in Storescp.running:
            Storescp.running.remove(self)

    def log_text(self) -> str:
        path = self.folder.parent / f"storescp-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def received(self) -> list[Any]:
        """The data sets received so far (storescp names files by modality and SOP UID)."""
        import pydicom

        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def destination(self, name: str = "pacs") -> dict[str, Any]:
        """The ``[[destinations]]`` entry pointing at this peer."""
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}


def run_triage(
    config: Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`triage --config CONFIG ARGS…` to its end, with no TRIAGE_ overrides from this
    environment (they would win over the config under test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    return subprocess.run(
        [sys.executable, "-m", "triage", "--config", str(config), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
