"""Configuration: one TOML file, overridable key by key from the environment.

Every key lives in a section (``[dicom]``, ``[store]`` …) and can be overridden by an
environment variable ``TRIAGE_<SECTION>_<KEY>`` (``TRIAGE_DICOM_PORT=104``). The result is one
frozen, typed :class:`Config`; anything unknown or invalid raises :class:`ConfigError` whose
message is a single line naming the key, so the daemon can stop with it.
"""

from __future__ import annotations

import dataclasses
import os
import re
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


def _check_ae_title(section: str, key: str, value: str) -> None:
    if not _AE_TITLE.match(value) or not value.strip():
        _fail(section, key, f"not a valid AE title (1-16 printable characters, no '\\'): {value!r}")


def _check_port(section: str, key: str, value: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        _fail(section, key, f"must be a TCP port {low}..65535 (got {value})")


def _check_positive(section: str, key: str, value: float) -> None:
    if value <= 0:
        _fail(section, key, f"must be > 0 (got {value})")


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
    #: Largest PDU we accept; 128 KiB nearly doubles receive speed over pynetdicom's 16 KiB.
    max_pdu_size: int = 131072
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

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        _check_ae_title("dicom", "ae_title", self.ae_title)
        _check_port("dicom", "port", self.port, allow_zero=True)
        for peer in self.allowed_peers:
            ae, _, host = peer.partition("@")
            _check_ae_title("dicom", "allowed_peers", ae)
            if "@" in peer and not host:
                _fail("dicom", "allowed_peers", f"empty host in {peer!r}")
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
            _check_positive("dicom", key, getattr(self, key))
        if self.shutdown_grace_s < 0:
            _fail("dicom", "shutdown_grace_s", "must be >= 0")
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


@dataclass(frozen=True)
class StoreConfig:
    """The database and the spool of received files (``[store]``)."""

    #: SQLAlchemy URL; ``postgresql://`` uses psycopg 3. Relative SQLite paths are made absolute.
    url: str = "sqlite:///var/triage.db"
    spool_dir: str = "var/spool"
    #: C-STORE answers 0xA700 (out of resources) while the spool has less free space than this.
    min_free_mb: int = 1024
    retention_days: int = 30

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.url):
            _fail("store", "url", "must be a sqlite:/// or postgresql:// URL")
        if not self.spool_dir:
            _fail("store", "spool_dir", "must not be empty")
        if self.min_free_mb < 0:
            _fail("store", "min_free_mb", "must be >= 0")
        if self.retention_days < 1:
            _fail("store", "retention_days", "must be >= 1")


@dataclass(frozen=True)
class StudyConfig:
    """When a study counts as complete (``[study]``)."""

    #: A study with no new instance for this long moves RECEIVING → QUEUED.
    quiet_period_s: float = 10.0
    #: How often the scheduler looks for quiet studies.
    check_interval_s: float = 1.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a wrong value."""
        if self.quiet_period_s < 0:
            _fail("study", "quiet_period_s", "must be >= 0")
        _check_positive("study", "check_interval_s", self.check_interval_s)


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
class Config:
    """The whole daemon configuration."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    log: LogConfig = field(default_factory=LogConfig)
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
}


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
                return float(value.strip())
            except ValueError:
                _fail(section, key, f"expected a number (got {value!r})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(section, key, f"expected a number (got {value!r})")
        return float(value)
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
    spool = str((base / store.spool_dir).resolve())
    dicom = config.dicom
    tls_paths = {
        key: str((base / getattr(dicom, key)).resolve())
        for key in ("tls_cert", "tls_key", "tls_ca")
        if getattr(dicom, key)
    }
    return dataclasses.replace(
        config,
        store=dataclasses.replace(store, url=url, spool_dir=spool),
        dicom=dataclasses.replace(dicom, **tls_paths),
    )


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Read *path* (or only defaults when ``None``), apply environment overrides, validate.

    Relative paths in the result are resolved against *base_dir* (default: the current
    directory), so the defaults put everything under ``./var``.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config error: no such file: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path}: not valid TOML: {exc}") from None
    _check_env_names(env)
    sections: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"config error: [{name}]: unknown section")
        if not isinstance(values, dict):
            raise ConfigError(f"config error: [{name}]: must be a table")
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(name, cls, raw.get(name, {}), env)
    config = _absolute_paths(
        Config(**sections, source=str(path or "")), Path(base_dir or os.getcwd())
    )
    for name in SECTIONS:
        getattr(config, name).validate()
    return config


def describe(config: Config) -> dict[str, dict[str, Any]]:
    """The effective configuration as plain data (for ``triage config`` and start-up logs)."""
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        section = getattr(config, name)
        out[name] = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(section).items()
        }
    return out


__all__ = ["Config", "ConfigError", "describe", "load_config"]
