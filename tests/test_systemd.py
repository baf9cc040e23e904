"""systemd integration: the unit file, and the sd_notify protocol seen on a socket the test owns.

The daemon runs as a real process with ``$NOTIFY_SOCKET`` pointing at a Unix datagram socket
bound here, and ``$WATCHDOG_USEC`` set, exactly as systemd would start it.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.peers import Daemon, echoscu, wait_until
from tests.test_http import http_port, log_events
from triage.notify import Notifier

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "triage.service"
WORKER_UNIT = ROOT / "deploy" / "triage-worker@.service"


# --- the unit file -------------------------------------------------------------------------


def _unit(path: Path = UNIT) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _runnable_copy(tmp_path: Path, unit: Path = UNIT, name: str = "msk-triage.service") -> Path:
    """The unit with ExecStart pointing at this checkout's `triage` (verify checks that the
    binary exists; the shipped path is the production install under /opt)."""
    text = unit.read_text()
    installed = Path(sys.prefix) / "bin" / "triage"
    assert "ExecStart=/opt/msk-triage/bin/triage " in text
    copy = tmp_path / name
    copy.write_text(text.replace("/opt/msk-triage/bin/triage", str(installed)))
    return copy


def test_unit_declares_notify_watchdog_restart_policy_user_and_sandbox() -> None:
    service = dict(_unit()["Service"])
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert service["User"] == "msk-triage" and service["Group"] == "msk-triage"
    assert service["WorkingDirectory"] == "/var/lib/msk-triage"
    assert service["ReadWritePaths"] == "/var/lib/msk-triage"
    assert service["ExecStart"].endswith(" --config /etc/msk-triage/triage.toml serve")
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "KillMode": "mixed",
    }.items():
        assert service[key] == value, key
    # The command line is one the `triage` parser accepts.
    from triage.cli.main import build_parser

    args = build_parser().parse_args(service["ExecStart"].split()[1:])
    assert args.command == "serve" and args.config == "/etc/msk-triage/triage.toml"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [tool, "verify", str(_runnable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "msk-triage.service" not in result.stdout + result.stderr  # no warning about it


@pytest.mark.parametrize("unit", ["triage.service", "triage-worker@.service"])
def test_systemd_analyze_security_rates_the_sandbox_ok(tmp_path: Path, unit: str) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    copy = _runnable_copy(tmp_path, ROOT / "deploy" / unit, "msk-" + unit)
    if unit.endswith("@.service"):
        instance = tmp_path / ("msk-" + unit.replace("@.", "@1."))
        instance.symlink_to(copy.name)
        copy = instance
    result = subprocess.run(
        [tool, "security", "--offline=yes", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline not supported: {result.stderr[:200]}")
    assert float(match.group(1)) <= 3.0, result.stdout
    assert match.group(2) in {"OK", "SAFE"}


@pytest.mark.parametrize("unit", [UNIT, WORKER_UNIT], ids=lambda unit: unit.name)
def test_compiled_models_are_cached_where_a_restart_finds_them(unit: Path) -> None:
    # PrivateTmp=yes empties /tmp, torch.compile's default cache, at every stop.
    service = dict(_unit(unit)["Service"])
    assert service["PrivateTmp"] == "yes" and service["CacheDirectory"] == "msk-triage"
    environment = [
        line.removeprefix("Environment=")
        for line in unit.read_text().splitlines()
        if line.startswith("Environment=")
    ]
    assert "TORCHINDUCTOR_CACHE_DIR=/var/cache/msk-triage/torch" in environment


def test_worker_template_runs_triage_worker_with_its_share_of_the_cores() -> None:
    from triage.cli.main import build_parser
    from triage.config import load_config

    service = dict(_unit(WORKER_UNIT)["Service"])
    assert (service["Type"], service["NotifyAccess"], service["Restart"]) == (
        "notify",
        "main",
        "on-failure",
    )
    assert int(service["WatchdogSec"]) > 0 and service["RestartPreventExitStatus"] == "2"
    assert (service["User"], service["ReadWritePaths"]) == ("msk-triage", "/var/lib/msk-triage")
    assert service["CapabilityBoundingSet"] == ""  # its HTTP port needs no capability
    args = build_parser().parse_args(service["ExecStart"].split()[1:])
    assert args.command == "worker" and args.config == "/etc/msk-triage/triage.toml"
    # Its Environment= lines are overrides the configuration accepts.
    env = dict(
        line.split("=", 1)
        for line in WORKER_UNIT.read_text().splitlines()
        if line.startswith("Environment=") and "TRIAGE_" in line
        for line in [line.removeprefix("Environment=")]
    )
    assert env == {"TRIAGE_WORKER_DECODE_PROCESSES": "4", "TRIAGE_HTTP_PORT": "809%i"}
    # systemd puts the instance name in for %i: instance 2 serves HTTP on its own port.
    config = load_config(None, env={k: v.replace("%i", "2") for k, v in env.items()})
    assert config.worker.decode_processes == 4 and config.http.port == 8092


def test_systemd_analyze_verifies_an_instance_of_the_worker_template(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    template = _runnable_copy(tmp_path, WORKER_UNIT, "msk-triage-worker@.service")
    instance = tmp_path / "msk-triage-worker@2.service"
    instance.symlink_to(template.name)
    result = subprocess.run(
        [tool, "verify", str(instance)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "msk-triage-worker" not in result.stdout + result.stderr


# --- sd_notify -----------------------------------------------------------------------------


class NotifySocket:
    """A datagram socket in the role of systemd's notification socket; records messages."""

    def __init__(self, path: str) -> None:
        self.address = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def since(self, moment: float, line: str) -> int:
        """How many messages after *moment* contain the line *line*."""
        return sum(
            1 for at, text in list(self.messages) if at > moment and line in text.split("\n")
        )

    def first(self, line: str) -> float | None:
        for at, text in list(self.messages):
            if line in text.split("\n"):
                return at
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _notified_daemon(daemon_factory, notify: NotifySocket, watchdog_s: float = 1.0) -> Daemon:
    return daemon_factory(
        {"log": {"level": "info"}},
        env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": str(int(watchdog_s * 1e6))},
    )


def test_notifier_speaks_to_path_and_abstract_sockets(tmp_path: Path) -> None:
    for address in (str(tmp_path / "notify"), f"@triage-test-{uuid.uuid4().hex}"):
        listener = NotifySocket(address)
        try:
            notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"})
            assert notifier.enabled and notifier.watchdog_s == 4.0
            assert notifier.ready("up") and notifier.watchdog() and notifier.stopping()
            wait_until(lambda: len(listener.messages) == 3, 5)  # noqa: B023
            assert [m for _, m in listener.messages] == [
                "READY=1\nSTATUS=up",
                "WATCHDOG=1",
                "STOPPING=1",
            ]
        finally:
            listener.close()
    # Outside systemd: nothing to do, nothing fails. A watchdog meant for another process
    # (WATCHDOG_PID) is not ours; a socket that went away is reported, not raised.
    assert Notifier({}).ready() is False and Notifier({}).watchdog_s is None
    assert Notifier({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready() is False
    # Supervising loops check (and ping) four times per watchdog period, between 50 ms and 1 s.
    assert [
        Notifier({"WATCHDOG_USEC": usec} if usec else {}).check_interval_s
        for usec in ("", "1000000", "30000000", "100000")
    ] == [1.0, 0.25, 1.0, 0.05]


def test_ready_after_the_port_accepts_watchdog_while_alive_stopping_on_sigterm(
    daemon_factory, tmp_path: Path
) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = _notified_daemon(daemon_factory, notify).start(wait=False)
        ready = wait_until(lambda: notify.first("READY=1"), 120, 0.01, daemon.log_text())
        # READY=1 means the listener is bound: an association succeeds right now. (A bare TCP
        # connection would do too, but would hold an association thread for the ACSE timeout.)
        assert echoscu(daemon.port).returncode == 0
        assert '"event": "ready"' in daemon.log_text()
        pings = [at for at, m in list(notify.messages) if "WATCHDOG=1" in m.split("\n")]
        assert all(at >= ready for at in pings), "a watchdog ping before READY=1"
        [status] = [m for _, m in notify.messages if "READY=1" in m]
        assert f"STATUS=ready: TRIAGE on port {daemon.port}" in status
        _pings_then_stops_on_sigterm(daemon, notify, ready)
    finally:
        notify.close()


def _pings_then_stops_on_sigterm(daemon: Daemon, notify: NotifySocket, ready: float) -> None:
    """Pinged repeatedly after READY=1 (WATCHDOG_USEC=1 s: every quarter second); SIGTERM
    gives STOPPING=1, no ping after it, and exit status 0."""
    wait_until(lambda: notify.since(ready, "WATCHDOG=1") >= 5, 10, 0.05)
    before_stop = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.process.wait(60) == 0
    stopping = notify.first("STOPPING=1")
    assert stopping is not None and stopping > before_stop
    assert notify.since(stopping + 0.01, "WATCHDOG=1") == 0


def _listener_child(daemon: Daemon) -> int:
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(daemon.process.pid)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = [int(line.split()[0]) for line in out.splitlines() if "multiprocessing.spawn" in line]
    assert len(pids) == 1, out
    return pids[0]


def _grab_port(port: int, timeout: float = 10.0) -> socket.socket:
    """Listen on *port* as soon as the dead listener released it (before its replacement)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def test_watchdog_pings_stop_while_a_loop_is_dead_and_resume_when_it_is_back(
    daemon_factory, tmp_path: Path
) -> None:
    """Kill the listener process and hold its port, so the daemon cannot restart it: the
    listener loop stays dead, /healthz and /readyz say so, and no WATCHDOG=1 is sent (systemd
    would kill and restart the daemon). Release the port: the listener comes back, pings too."""
    import json
    import urllib.error
    import urllib.request

    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = _notified_daemon(daemon_factory, notify).start()
        port = http_port(daemon)

        def get(path: str) -> tuple[int, dict]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        start = time.monotonic()
        wait_until(lambda: notify.since(start, "WATCHDOG=1") >= 2, 10, 0.05)
        assert get("/healthz")[0] == 200 and get("/readyz")[0] == 200
        child = _listener_child(daemon)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        holder = _grab_port(daemon.port)
        try:
            daemon.wait_for_log('"event": "listener_restart_failed"', 60)
            daemon.wait_for_log('"event": "loop_dead"', 10)
            assert log_events(daemon, "loop_dead")[-1]["loops"] == ["listener"]
            dead_since = time.monotonic()
            time.sleep(3.0)  # three watchdog periods
            assert notify.since(dead_since, "WATCHDOG=1") == 0
            status, body = get("/healthz")
            assert status == 503 and body["status"] == "failing"
            assert body["loops"]["listener"] is False and body["loops"]["scheduler"] is True
            status, body = get("/readyz")
            assert status == 503 and body["failed"] == ["listener"]
            assert body["checks"]["store"]["ok"] is True
        finally:
            holder.close()
        back = time.monotonic()
        daemon.wait_for_log('"event": "loops_alive_again"', 60)
        wait_until(lambda: notify.since(back, "WATCHDOG=1") >= 2, 30, 0.05)
        assert get("/healthz")[0] == 200
        assert echoscu(daemon.port).returncode == 0
        assert daemon.stop() == 0
    finally:
        notify.close()


def test_triage_worker_is_ready_when_warm_pings_while_alive_and_stops_on_sigterm(
    daemon_factory, tmp_path: Path
) -> None:
    """`triage worker` as deploy/triage-worker@.service starts it: READY=1 after the model
    and its decode processes (the unit's environment override applied), watchdog pings,
    STOPPING=1 and exit status 0 on SIGTERM."""
    from tests.test_end_to_end import scoring_config

    notify = NotifySocket(str(tmp_path / "worker-notify.sock"))
    try:
        worker = daemon_factory(
            scoring_config(worker={"decode_processes": 2}),
            name="worker",
            command="worker",
            env={
                "NOTIFY_SOCKET": notify.address,
                "WATCHDOG_USEC": "1000000",
                "TRIAGE_WORKER_DECODE_PROCESSES": "1",
            },
        ).start(wait=False)
        ready = wait_until(lambda: notify.first("READY=1"), 180, 0.02, worker.log_text())
        [status] = [m for _, m in notify.messages if "READY=1" in m]
        assert status.endswith(": 1 decode processes"), status
        assert [e["decode_processes"] for e in log_events(worker, "ready")] == [1]
        assert '"event": "worker_warm"' in worker.log_text()  # warm before READY=1
        _pings_then_stops_on_sigterm(worker, notify, ready)
    finally:
        notify.close()
