"""Orthanc as the PACS in tests and benchmarks: a real ``Orthanc`` process on free ports.

The configuration is generated from the shipped template ``deploy/orthanc/orthanc.json``, so the
tests exercise what an administrator deploys: only ports, folders, the triage node's address and
``StableAge`` are replaced. REST helpers use urllib (no new dependency); Orthanc listens on
127.0.0.1 for HTTP with remote access off and no authentication.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.peers import free_port

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "orthanc" / "orthanc.json"
ROUTING_SCRIPT = ROOT / "deploy" / "orthanc" / "route-to-triage.lua"
#: Orthanc is built on DCMTK, which leaves Nagle's algorithm on without this (FACTS.md).
ORTHANC_ENV = {**os.environ, "TCP_NODELAY": "1"}


def orthanc_binary() -> str:
    """The Orthanc server executable (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise FileNotFoundError("Orthanc is not installed (apt install orthanc)")
    return found


class OrthancError(RuntimeError):
    """A REST call answered with an HTTP error; carries the status and Orthanc's message."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class Orthanc:
    """One Orthanc server with its own configuration, storage and log under *workdir*.

    *triage* is ``(ae_title, port)`` of the msk-triage node, declared as modality ``triage``
    (the name the routing script sends to). With *routing* the shipped Lua auto-routing script
    is loaded; without it, studies go to triage only when a test asks
    (:meth:`store_to_modality`). Stopping and starting again keeps the storage, like a PACS
    restart.
    """

    workdir: Path
    triage: tuple[str, int]
    routing: bool = False
    stable_age_s: int = 1
    ae_title: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    #: Extra configuration keys, applied last.
    overrides: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(self.configuration(), indent=2) + "\n")

    # --- configuration and process ----------------------------------------------------------

    def configuration(self) -> dict[str, Any]:
        """The template with this instance's ports, folders, triage address and options."""
        config: dict[str, Any] = json.loads(TEMPLATE.read_text())
        storage = str(self.workdir / "storage")
        config.update(
            StorageDirectory=storage,
            IndexDirectory=storage,
            HttpPort=self.http_port,
            DicomPort=self.dicom_port,
            DicomAet=self.ae_title,
            StableAge=self.stable_age_s,
            LuaScripts=[str(ROUTING_SCRIPT)] if self.routing else [],
        )
        ae_title, port = self.triage
        modality = config["DicomModalities"]["triage"]
        modality.update(AET=ae_title, Host="127.0.0.1", Port=port, Timeout=30)
        config.update(self.overrides)
        return config

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60.0) -> Orthanc:
        """Start the server and wait until its REST API and DICOM port answer."""
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        log.write(f"--- start {self.starts} ---\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            [orthanc_binary(), "--verbose", str(self.config_path)],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ORTHANC_ENV,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"Orthanc exited with {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            with contextlib.suppress(OSError, OrthancError):
                if self.get("/system") and _port_open(self.dicom_port):
                    return self
            time.sleep(0.1)
        raise AssertionError(f"Orthanc did not start:\n{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (Orthanc closes its database cleanly) and wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(30)

    def destination(self, name: str = "orthanc") -> dict[str, Any]:
        """The ``[[destinations]]`` entry of the triage config that points at this server."""
        return {
            "name": name,
            "ae_title": self.ae_title,
            "host": "127.0.0.1",
            "port": self.dicom_port,
        }

    # --- REST -------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 120.0,
    ) -> Any:
        """One REST call; the decoded JSON answer (or text when it is not JSON)."""
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            raise OrthancError(method, path, exc.code, body) from None
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload.decode(errors="replace")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, payload: Any, timeout: float = 120.0) -> Any:
        """POST *payload* as JSON."""
        return self.request("POST", path, json.dumps(payload).encode(), timeout=timeout)

    def upload(self, files: Iterable[Path]) -> list[dict[str, Any]]:
        """``POST /instances`` each Part 10 file; Orthanc's answers (ID, ParentStudy, Status)."""
        answers = []
        for path in files:
            answer = self.request("POST", "/instances", path.read_bytes(), "application/dicom")
            assert answer["Status"] in {"Success", "AlreadyStored"}, answer
            answers.append(answer)
        return answers

    def store_to_modality(
        self, resources: list[str], modality: str = "triage", timeout: float = 120.0
    ) -> dict[str, Any]:
        """Send Orthanc resources (IDs) to *modality* over C-STORE; returns when it is done."""
        return self.post(
            f"/modalities/{modality}/store",
            {"Resources": resources, "Synchronous": True},
            timeout=timeout,
        )

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's ID of the study with this StudyInstanceUID, or None if it is not there."""
        # The body is the bare UID, not a JSON string.
        for hit in self.request("POST", "/tools/lookup", study_uid.encode(), "text/plain") or []:
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def series(self, study_id: str) -> list[dict[str, Any]]:
        """The study's series with their main tags and instance IDs."""
        return list(self.get(f"/studies/{study_id}/series"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Every tag of an instance, by keyword, sequences as lists of dicts (``?simplify``)."""
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))

    def instance_metadata(self, instance_id: str) -> dict[str, str]:
        """The instance's metadata (Orthanc's and the user metadata), name → value."""
        names = self.get(f"/instances/{instance_id}/metadata")
        return {name: self.get(f"/instances/{instance_id}/metadata/{name}") for name in names}

    def changes(self, since: int = 0, limit: int = 1000) -> dict[str, Any]:
        """One page of ``/changes`` (``Changes``, ``Last``, ``Done``)."""
        return dict(self.get(f"/changes?since={since}&limit={limit}"))

    def lua_log(self) -> list[str]:
        """The routing script's log lines (Orthanc prints Lua ``print`` as "Lua says: …")."""
        return [
            line.split("msk-triage routing: ", 1)[1]
            for line in self.log_text().splitlines()
            if "msk-triage routing: " in line
        ]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
