"""Configuration: one TOML file, overridable key by key from the environment.

Every key lives in a section (``[dicom]``, ``[store]`` …) and can be overridden by an
environment variable ``TRIAGE_<SECTION>_<KEY>`` (``TRIAGE_DICOM_PORT=104``). The result is one
frozen, typed :class:`Config`; anything unknown or invalid raises :class:`ConfigError` whose
message is a single line naming the key, so the daemon can stop with it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import ssl
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "TRIAGE_"
#: Environment variables with the prefix that are not key overrides.
RESERVED_ENV = frozenset({"TRIAGE_CONFIG"})


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


def _fail(section: str, key: str, problem: str) -> typing.NoReturn:
    raise ConfigError(f"config error: [{section}] {key}: {problem}")


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def is_valid_ae_title(value: str) -> bool:
    """1-16 printable ASCII characters, no backslash, not only spaces (DICOM PS3.5 AE VR)."""
    return bool(_AE_TITLE.match(value)) and bool(value.strip())


def _check_ae_title(section: str, key: str, value: str) -> None:
    if not is_valid_ae_title(value):
        _fail(section, key, f"not a valid AE title (1-16 printable characters, no '\\'): {value!r}")


def _check_bind(section: str, value: str, *, empty_is_any: bool = False) -> None:
    """A listening address: an IP address, or a host name this host resolves (looked up only
    when not an address, so a host without DNS never waits here). Empty is every interface
    where *empty_is_any* (the DICOM listener always took it so)."""
    if not value:
        if empty_is_any:
            return
        _fail(section, "bind", "must not be empty")
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    try:
        socket.getaddrinfo(value, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        _fail(section, "bind", f"not an IP address or a host name that resolves: {value!r}")


_HOST_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")


def _is_host(value: str) -> bool:
    """An IP address, or something shaped like a host name (not looked up: DNS may be down
    at start, and the listener then matches the name as written)."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(value)) and len(value) <= 253


def _check_port(section: str, key: str, value: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        _fail(section, key, f"must be a TCP port {low}..65535 (got {value})")


#: The longest duration a key in seconds may have: past it a value is a typo, and waits on
#: huge timeouts overflow (threading's wait() refuses them).
MAX_DURATION_S = 86400.0
#: The longest retention: a cutoff 100 years back is still a valid date.
MAX_RETENTION_DAYS = 36500


def _check_duration(
    section: str, key: str, value: float, *, low: float = 0.0, allow_low: bool = False
) -> None:
    """*value* in seconds must be above *low* (or equal to it with *allow_low*) and at most
    :data:`MAX_DURATION_S`."""
    too_low = value < low if allow_low else value <= low
    if too_low or value > MAX_DURATION_S:
        lower = f">= {low:g}" if allow_low else f"> {low:g}"
        _fail(section, key, f"must be {lower} and <= {MAX_DURATION_S:g} s (one day) (got {value})")


class _EncryptedKey(Exception):
    """Raised by the passphrase callback: the daemon cannot type a passphrase."""


def _no_passphrase() -> str:
    raise _EncryptedKey


def _tls_reason(exc: BaseException) -> str:
    """An ssl/OS error in a few words, without OpenSSL's source location."""
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc)) or type(exc).__name__


def _check_tls_meant(section: str, tls: bool, cert: str, key: str, ca: str) -> None:
    """TLS files named while ``tls = false``: the section's DICOM would go in plain text with
    the patient's data, which whoever named the files did not mean."""
    named = [name for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)) if path]
    if named and not tls:
        _fail(
            section,
            "tls",
            f"{', '.join(named)} set but tls = false (DICOM would go unencrypted): set"
            " tls = true, or leave the TLS files out",
        )


def _check_tls_files(section: str, *, server: bool, ca: str, cert: str, key: str) -> None:
    """Build the TLS context the daemon will build from these files, so a file that exists
    but does not load (not PEM, a key that does not match, an encrypted key) stops here with
    the key named, instead of failing every association once running."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ValueError) as exc:
            _fail(section, "tls_ca", f"cannot load CA certificates from {ca}: {_tls_reason(exc)}")
    if not cert:
        return
    try:
        pem = Path(cert).read_bytes()
    except OSError as exc:
        _fail(section, "tls_cert", f"cannot read {cert}: {_tls_reason(exc)}")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        _fail(section, "tls_cert", f"no PEM certificate in {cert}")
    try:
        context.load_cert_chain(cert, key or None, password=_no_passphrase)
    except _EncryptedKey:
        _fail(section, "tls_key", f"{key} is encrypted: the daemon needs an unencrypted key")
    except (OSError, ValueError) as exc:
        _fail(section, "tls_key", f"cannot load {key} with tls_cert {cert}: {_tls_reason(exc)}")


@dataclass(frozen=True)
class DicomConfig:
    """The DICOM listener (``[dicom]``)."""

    ae_title: str = "TRIAGE"
    bind: str = "0.0.0.0"
    port: int = 11112
    #: Calling AE titles allowed to associate, each optionally ``AE@host``; empty allows any.
    allowed_peers: tuple[str, ...] = ()
    require_called_ae: bool = True
    max_associations: int = 10
    #: Largest PDU we accept. Senders use it as their PDU size: 128 KiB nearly doubled receive
    #: speed over pynetdicom's 16 KiB, and 1 MiB gained DCMTK's storescu another ~16% on 10 MB
    #: images (fewer PDUs for pynetdicom to handle; 4 MiB gained nothing more).
    max_pdu_size: int = 1048576
    #: Listener processes sharing the port (SO_REUSEPORT); more than one lifts the GIL cap.
    listener_processes: int = 1
    #: Storage SOP classes accepted beyond CR, DX and Secondary Capture.
    extra_sop_classes: tuple[str, ...] = ()
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    #: How long a shutdown waits for associations in flight before aborting them.
    shutdown_grace_s: float = 30.0
    tls: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    #: CA bundle used to verify client certificates (with ``tls_verify_client``).
    tls_ca: str = ""
    tls_verify_client: bool = False

    def validate(self, load_tls: bool = True) -> None:
        """Raise :class:`ConfigError` for a wrong value (*load_tls*: see :func:`load_config`)."""
        _check_ae_title("dicom", "ae_title", self.ae_title)
        _check_bind("dicom", self.bind, empty_is_any=True)
        _check_port("dicom", "port", self.port, allow_zero=True)
        for peer in self.allowed_peers:
            ae, _, host = peer.partition("@")
            _check_ae_title("dicom", "allowed_peers", ae)
            if "@" in peer and not host:
                _fail("dicom", "allowed_peers", f"empty host in {peer!r}")
            if host and not _is_host(host):
                # Matched as written against the peer's address, "10.0.0.5:104" or " 10.0.0.5"
                # never matched: that peer was rejected with no word about the entry.
                _fail(
                    "dicom",
                    "allowed_peers",
                    f"not an IP address or host name (no port, no spaces) after '@' in {peer!r}",
                )
        if not 1 <= self.max_associations <= 1000:
            _fail("dicom", "max_associations", f"must be 1..1000 (got {self.max_associations})")
        if not 4096 <= self.max_pdu_size <= 4_194_304:
            _fail("dicom", "max_pdu_size", f"must be 4096..4194304 (got {self.max_pdu_size})")
        if not 1 <= self.listener_processes <= 64:
            _fail("dicom", "listener_processes", f"must be 1..64 (got {self.listener_processes})")
        if self.listener_processes > 1 and self.port == 0:
            _fail("dicom", "listener_processes", "several processes need a fixed port, not 0")
        from triage.uids import is_valid_uid

        for uid in self.extra_sop_classes:
            if not is_valid_uid(uid):
                _fail("dicom", "extra_sop_classes", f"not a UID: {uid!r}")
        for key in ("network_timeout_s", "acse_timeout_s", "dimse_timeout_s"):
            _check_duration("dicom", key, getattr(self, key))
        _check_duration("dicom", "shutdown_grace_s", self.shutdown_grace_s, allow_low=True)
        if self.tls_verify_client and not self.tls:
            # Asked to check who connects, but nothing is encrypted or checked.
            _fail("dicom", "tls_verify_client", "needs tls = true")
        _check_tls_meant("dicom", self.tls, self.tls_cert, self.tls_key, self.tls_ca)
        if self.tls:
            for key in ("tls_cert", "tls_key"):
                path = getattr(self, key)
                if not path:
                    _fail("dicom", key, "required when tls = true")
                if not Path(path).is_file():
                    _fail("dicom", key, f"no such file: {path}")
            if self.tls_verify_client and not self.tls_ca:
                _fail("dicom", "tls_ca", "required when tls_verify_client = true")
            if self.tls_ca and not Path(self.tls_ca).is_file():
                _fail("dicom", "tls_ca", f"no such file: {self.tls_ca}")
            if load_tls:
                _check_tls_files(
                    "dicom", server=True, ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key
                )


@dataclass(frozen=True)
class StoreConfig:
    """The database and the spool of received files (``[store]``)."""

    #: SQLAlchemy URL; ``postgresql://`` uses psycopg 3. Relative SQLite paths are made absolute.
    url: str = "sqlite:///var/triage.db"
    spool_dir: str = "var/spool"
    #: C-STORE answers 0xA700 (out of resources) while the spool has less free space than this.
    min_free_mb: int = 1024
    retention_days: int = 30
    #: Association audit rows older than this are purged; 0 keeps them for ever.
    audit_retention_days: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.url):
            _fail("store", "url", "must be a sqlite:/// or postgresql:// URL")
        sqlite = re.match(r"^sqlite(?:\+\w+)?://(?:/([^?]*))?(?:\?(.*))?$", self.url)
        if sqlite and (
            not sqlite.group(1)
            or sqlite.group(1) == ":memory:"
            or "memory" in (sqlite.group(2) or "")
        ):
            # Each process (listeners, scheduler, worker, triage-admin) would get its own empty
            # database: the listener could record nothing and answered every C-STORE 0xA701.
            _fail("store", "url", "an in-memory SQLite database cannot be shared: name a file")
        if not self.spool_dir:
            _fail("store", "spool_dir", "must not be empty")
        if self.min_free_mb < 0:
            _fail("store", "min_free_mb", "must be >= 0")
        if not 1 <= self.retention_days <= MAX_RETENTION_DAYS:
            _fail(
                "store",
                "retention_days",
                f"must be 1..{MAX_RETENTION_DAYS} (100 years) (got {self.retention_days})",
            )
        if not 0 <= self.audit_retention_days <= MAX_RETENTION_DAYS:
            _fail(
                "store",
                "audit_retention_days",
                f"must be 0 (keep for ever) or 1..{MAX_RETENTION_DAYS} (100 years)"
                f" (got {self.audit_retention_days})",
            )


@dataclass(frozen=True)
class StudyConfig:
    """When a study counts as complete (``[study]``)."""

    #: A study with no new instance for this long moves RECEIVING → QUEUED (counted from when
    #: the association that sent its last instance stops sending: see the listener).
    quiet_period_s: float = 10.0
    #: How often the scheduler looks for quiet studies.
    check_interval_s: float = 0.25

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        _check_duration("study", "quiet_period_s", self.quiet_period_s, allow_low=True)
        _check_duration("study", "check_interval_s", self.check_interval_s)


@dataclass(frozen=True)
class LogConfig:
    """Logging (``[log]``)."""

    level: str = "info"
    #: ``auto`` (JSON lines unless stderr is a terminal), ``json`` or ``console``.
    format: str = "auto"

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        if self.level.lower() not in {"debug", "info", "warning", "error"}:
            _fail("log", "level", f"must be debug, info, warning or error (got {self.level!r})")
        if self.format not in {"auto", "json", "console"}:
            _fail("log", "format", f"must be auto, json or console (got {self.format!r})")


@dataclass(frozen=True)
class ModelConfig:
    """The scoring model (``[model]``)."""

    #: The model card (TOML). The default is the demo card shipped with msk-triage.
    card: str = "models/demo/card.toml"
    #: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``.
    device: str = "auto"
    #: ``auto`` (bf16 on CUDA and on CPUs with bf16 support, else fp32), ``fp32`` or ``bf16``.
    precision: str = "auto"
    #: Views per forward pass; views of several studies share a batch.
    batch_size: int = 16
    #: How long a partial batch waits for more views before it runs.
    batch_wait_ms: float = 20.0
    #: Run a model whose card says ``validated = false`` (the demo model). Not for clinical use.
    allow_unvalidated: bool = False
    #: torch.compile the model at start (pays off on a GPU; compiling takes a minute or more).
    compile: bool = False
    #: On a CPU, run the model as a traced graph: the same results, and its operators do not
    #: wait for Python's GIL, which the worker's other threads hold now and then.
    cpu_graph: bool = True
    #: CPU threads for torch (0: one with a GPU; on a CPU the cores the decode processes leave,
    #: or half the cores; see triage.scoring.worker.torch_threads).
    threads: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        if not self.card:
            _fail("model", "card", "must name a model card file")
        if not Path(self.card).is_file():
            _fail("model", "card", f"no such file: {self.card}")
        if self.device not in {"auto", "cpu", "cuda"}:
            _fail("model", "device", f"must be auto, cpu or cuda (got {self.device!r})")
        if self.precision not in {"auto", "fp32", "bf16"}:
            _fail("model", "precision", f"must be auto, fp32 or bf16 (got {self.precision!r})")
        if not 1 <= self.batch_size <= 1024:
            _fail("model", "batch_size", f"must be 1..1024 (got {self.batch_size})")
        if not 0 <= self.batch_wait_ms <= 60000:
            _fail("model", "batch_wait_ms", f"must be 0..60000 (got {self.batch_wait_ms})")
        if not 0 <= self.threads <= 1024:
            _fail("model", "threads", f"must be 0..1024 (got {self.threads})")


@dataclass(frozen=True)
class WorkerConfig:
    """The scoring worker (``[worker]``)."""

    #: Run the worker inside `triage serve` (off on ingest-only hosts).
    enabled: bool = True
    #: Processes decoding pixel data (0: one per core but one with a GPU; on a CPU the cores
    #: the model's threads leave; see triage.scoring.worker.decode_process_count).
    decode_processes: int = 0
    #: Scoring attempts per study revision before it is FAILED.
    max_attempts: int = 3
    #: A claimed study returns to the queue when its worker stops renewing for this long.
    lease_s: float = 120.0
    #: How often an idle worker looks for queued studies.
    poll_interval_s: float = 0.5
    #: Studies claimed at a time.
    claim_batch: int = 8

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        if not 0 <= self.decode_processes <= 256:
            _fail("worker", "decode_processes", "must be 0..256")
        if self.max_attempts < 1:
            _fail("worker", "max_attempts", "must be >= 1")
        _check_duration("worker", "lease_s", self.lease_s, low=5, allow_low=True)
        _check_duration("worker", "poll_interval_s", self.poll_interval_s)
        if not 1 <= self.claim_batch <= 256:
            _fail("worker", "claim_batch", "must be 1..256")


@dataclass(frozen=True)
class OutputsConfig:
    """What is sent back for a scored study (``[outputs]``); the SR is always made."""

    #: A secondary-capture image of each view with the CAM overlaid.
    overlays: bool = True
    #: A parametric map (float CAM) per view, for viewers that display them.
    parametric_maps: bool = False
    #: Heat-map opacity over the image, 0..1.
    opacity: float = 0.4
    #: Longest side of an overlay image, in pixels, label band included (the radiograph in it
    #: is never larger than the decoded frame halved while at least twice 1024 px).
    max_side: int = 1024

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        if not 0.0 <= self.opacity <= 1.0:
            _fail("outputs", "opacity", f"must be 0..1 (got {self.opacity})")
        if not 128 <= self.max_side <= 8192:
            _fail("outputs", "max_side", f"must be 128..8192 (got {self.max_side})")


@dataclass(frozen=True)
class DeliveryConfig:
    """Retries of result delivery (``[delivery]``)."""

    backoff_start_s: float = 5.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 300.0
    #: Attempts before a delivery is FAILED (`triage-admin retry` starts it again).
    max_attempts: int = 10
    #: Network timeout towards a destination.
    timeout_s: float = 30.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        _check_duration("delivery", "backoff_start_s", self.backoff_start_s)
        # start·factor^(attempts-1) must stay a float: 10^99 does, 2^1100 overflows.
        if self.backoff_factor < 1:
            _fail("delivery", "backoff_factor", "must be >= 1")
        if self.backoff_factor > 10:
            _fail("delivery", "backoff_factor", f"must be <= 10 (got {self.backoff_factor})")
        if self.backoff_max_s < self.backoff_start_s:
            _fail("delivery", "backoff_max_s", "must be >= backoff_start_s")
        _check_duration("delivery", "backoff_max_s", self.backoff_max_s)
        if not 1 <= self.max_attempts <= 100:
            _fail("delivery", "max_attempts", f"must be 1..100 (got {self.max_attempts})")
        _check_duration("delivery", "timeout_s", self.timeout_s)


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP endpoints ``/healthz``, ``/readyz`` and ``/metrics`` (``[http]``)."""

    enabled: bool = True
    #: Loopback by default: the endpoints have no authentication.
    bind: str = "127.0.0.1"
    #: 0 picks a free port (tests); the bound port is logged (``http_ready``).
    port: int = 8080

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        _check_port("http", "port", self.port, allow_zero=True)
        _check_bind("http", self.bind)


@dataclass(frozen=True)
class DestinationConfig:
    """A DICOM node the results are sent to (``[[destinations]]``)."""

    name: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = 104
    #: Our AE title towards this node (default: ``[dicom] ae_title``).
    calling_ae: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def validate(self, load_tls: bool = True) -> None:
        """Raise :class:`ConfigError` for a wrong value (*load_tls*: see :func:`load_config`)."""
        section = f"destinations.{self.name or '?'}"
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.name):
            _fail(section, "name", "must be 1-64 letters, digits, '_', '.' or '-'")
        _check_ae_title(section, "ae_title", self.ae_title)
        if self.calling_ae:
            _check_ae_title(section, "calling_ae", self.calling_ae)
        if not self.host:
            _fail(section, "host", "required")
        _check_port(section, "port", self.port)
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                _fail(section, key, f"no such file: {path}")
        if bool(self.tls_cert) != bool(self.tls_key):
            _fail(section, "tls_key", "tls_cert and tls_key go together")
        _check_tls_meant(section, self.tls, self.tls_cert, self.tls_key, self.tls_ca)
        if self.tls and load_tls:
            _check_tls_files(
                section, server=False, ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key
            )


@dataclass(frozen=True)
class Config:
    """The whole daemon configuration."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    destinations: tuple[DestinationConfig, ...] = ()
    #: The file it was read from, if any (for messages).
    source: str = ""

    @property
    def spool_path(self) -> Path:
        """The spool folder as an absolute path."""
        return Path(self.store.spool_dir)


SECTIONS: dict[str, type] = {
    "dicom": DicomConfig,
    "store": StoreConfig,
    "study": StudyConfig,
    "log": LogConfig,
    "model": ModelConfig,
    "worker": WorkerConfig,
    "outputs": OutputsConfig,
    "delivery": DeliveryConfig,
    "http": HttpConfig,
}
#: Arrays of tables (``[[destinations]]``); the environment overrides the whole array with a
#: TOML inline array, e.g. ``TRIAGE_DESTINATIONS='[{name="pacs", ae_title="PACS", …}]'``.
TABLE_ARRAYS: dict[str, type] = {"destinations": DestinationConfig}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(section: str, key: str, kind: Any, value: Any, from_env: bool) -> Any:
    """Turn a TOML value (or an environment string) into the field's type."""
    origin = typing.get_origin(kind)
    if kind is bool:
        if from_env:
            lowered = value.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off"}:
                return False
            _fail(section, key, f"expected true or false (got {value!r})")
        if not isinstance(value, bool):
            _fail(section, key, f"expected true or false (got {value!r})")
        return value
    if kind is int:
        if from_env:
            try:
                return int(value.strip())
            except ValueError:
                _fail(section, key, f"expected an integer (got {value!r})")
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(section, key, f"expected an integer (got {value!r})")
        return value
    if kind is float:
        if from_env:
            try:
                number = float(value.strip())
            except ValueError:
                _fail(section, key, f"expected a number (got {value!r})")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            _fail(section, key, f"expected a number (got {value!r})")
        else:
            number = float(value)
        # nan passes every "< low" check, inf every "> 0" one (TOML and float() read both).
        if not math.isfinite(number):
            _fail(section, key, f"expected a finite number (got {value!r})")
        return number
    if kind is str:
        if not isinstance(value, str):
            _fail(section, key, f"expected a string (got {value!r})")
        return value
    if origin is tuple:
        if from_env:
            text = value.strip()
            if text.startswith("["):
                try:
                    value = tomllib.loads(f"v = {text}")["v"]
                except tomllib.TOMLDecodeError as exc:
                    _fail(section, key, f"not a TOML array: {exc}")
            else:
                value = [item.strip() for item in text.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _fail(section, key, f"expected a list of strings (got {value!r})")
        return tuple(value)
    raise TypeError(f"unsupported config type {kind!r}")  # a programming error, not a user one


def _build_section(section: str, cls: type, values: Mapping[str, Any], env: Mapping[str, str]):
    types_ = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types_:
            _fail(section, key, "unknown key")
        kwargs[key] = _coerce(section, key, types_[key], value, from_env=False)
    for key, kind in types_.items():
        env_name = f"{ENV_PREFIX}{section.upper()}_{key.upper()}"
        if env_name in env:
            kwargs[key] = _coerce(section, key, kind, env[env_name], from_env=True)
    return cls(**kwargs)


def _check_env_names(env: Mapping[str, str]) -> None:
    known = {
        f"{ENV_PREFIX}{section.upper()}_{key.upper()}"
        for section, cls in SECTIONS.items()
        for key in _field_types(cls)
    }
    known |= {f"{ENV_PREFIX}{name.upper()}" for name in TABLE_ARRAYS}
    for name in env:
        if name.startswith(ENV_PREFIX) and name not in known and name not in RESERVED_ENV:
            raise ConfigError(f"config error: unknown environment override {name}")


def _absolute_paths(config: Config, base: Path) -> Config:
    """Resolve relative paths against *base* so child processes and workers agree."""
    store = config.store
    url = store.url
    match = re.match(r"^(sqlite(?:\+\w+)?:///)(.+)$", url)
    if match and match.group(2) != ":memory:" and not match.group(2).startswith("/"):
        url = match.group(1) + str((base / match.group(2)).resolve())
    # An empty spool_dir stays empty for StoreConfig.validate to refuse: resolved, it would be
    # *base* itself, and the spool, its outbox and the purge would work in that folder.
    spool = str((base / store.spool_dir).resolve()) if store.spool_dir else ""
    dicom = config.dicom
    tls_paths = {
        key: str((base / getattr(dicom, key)).resolve())
        for key in ("tls_cert", "tls_key", "tls_ca")
        if getattr(dicom, key)
    }
    destinations = tuple(
        dataclasses.replace(
            d,
            **{
                key: str((base / getattr(d, key)).resolve())
                for key in ("tls_ca", "tls_cert", "tls_key")
                if getattr(d, key)
            },
        )
        for d in config.destinations
    )
    return dataclasses.replace(
        config,
        store=dataclasses.replace(store, url=url, spool_dir=spool),
        dicom=dataclasses.replace(dicom, **tls_paths),
        model=dataclasses.replace(config.model, card=_find_card(config.model.card, base)),
        destinations=destinations,
    )


def _find_card(card: str, base: Path) -> str:
    """A relative card path is looked up in *base*, then in the msk-triage checkout, then in
    the installed package (a wheel ships ``models/…`` as ``triage/_models/…``)."""
    if not card or Path(card).is_absolute():
        return card
    candidate = (base / card).resolve()
    if candidate.is_file():
        return str(candidate)
    package = Path(__file__).resolve().parent
    shipped = [package.parent / card]
    parts = Path(card).parts
    if len(parts) > 1 and parts[0] == "models":  # "." or "./" has no parts at all
        shipped.append(package / "_models" / Path(*parts[1:]))
    for path in shipped:
        if path.is_file():
            return str(path)
    return str(candidate)


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    *,
    load_tls: bool = True,
) -> Config:
    """Read *path* (or only defaults when ``None``), apply environment overrides, validate.

    Relative paths in the result are resolved against *base_dir* (default: the current
    directory), so the defaults put everything under ``./var``. With *load_tls* the TLS
    files are loaded as the daemon will load them; without (`triage-admin`, whose operators
    may not read the daemon's private key), they need only exist.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None and not str(path):
        # `--config "$UNSET"`: running on the defaults instead would put a spool and a store
        # in whatever directory this is, and listen as the demo.
        raise ConfigError("config error: the config file path is empty")
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config error: no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config error: {path}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:  # no permission, a directory …
            raise ConfigError(
                f"config error: cannot read {path}: {exc.strerror or type(exc).__name__}"
            ) from None
    _check_env_names(env)
    sections: dict[str, Any] = {}
    for name, values in raw.items():
        if name in TABLE_ARRAYS:
            if not isinstance(values, list):
                raise ConfigError(f"config error: [[{name}]]: must be an array of tables")
            continue
        if name not in SECTIONS:
            raise ConfigError(f"config error: [{name}]: unknown section")
        if not isinstance(values, dict):
            raise ConfigError(f"config error: [{name}]: must be a table")
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(name, cls, raw.get(name, {}), env)
    for name, cls in TABLE_ARRAYS.items():
        sections[name] = _build_table_array(name, cls, raw.get(name, []), env)
    config = _absolute_paths(
        Config(**sections, source=str(path or "")), Path(base_dir or os.getcwd())
    )
    for name in SECTIONS:
        if name == "dicom":
            config.dicom.validate(load_tls)
        else:
            getattr(config, name).validate()
    names = [d.name for d in config.destinations]
    for destination in config.destinations:
        destination.validate(load_tls)
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ConfigError(f"config error: [[destinations]] name: duplicated {sorted(duplicated)}")
    return config


def _build_table_array(
    name: str, cls: type, entries: list[Any], env: Mapping[str, str]
) -> tuple[Any, ...]:
    env_name = f"{ENV_PREFIX}{name.upper()}"
    if env_name in env and not env[env_name].strip():
        entries = []  # set empty, as an EnvironmentFile clears a list: no such tables
    elif env_name in env:
        try:
            entries = tomllib.loads(f"v = {env[env_name]}")["v"]
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {env_name}: not a TOML array: {exc}") from None
        if not isinstance(entries, list):
            raise ConfigError(f"config error: {env_name}: must be a TOML array of tables")
    built = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"config error: [[{name}]] #{index + 1}: must be a table")
        label = f"{name}.{entry.get('name') or index + 1}"
        built.append(_build_section(label, cls, entry, {}))
    return tuple(built)


def describe(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data (for ``triage config`` and start-up logs)."""

    def plain(section: Any) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(section).items()
        }

    out: dict[str, Any] = {name: plain(getattr(config, name)) for name in SECTIONS}
    for name in TABLE_ARRAYS:
        out[name] = [plain(entry) for entry in getattr(config, name)]
    # Printed on a terminal and pasted into tickets: the database password stays in the file.
    out["store"]["url"] = display_url(config.store.url)
    return out


def display_url(url: str) -> str:
    """*url* with its password shown as ``***``: in the user info (any characters, as
    SQLAlchemy reads them) and in a ``password=`` query parameter."""
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: hide what looks like user info
        shown = re.sub(r"^([\w+.-]+://[^:/@]*):.*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", shown, flags=re.IGNORECASE)


__all__ = ["Config", "ConfigError", "describe", "display_url", "load_config"]
