"""When the daemon's own TLS certificates expire: said at start and served as a metric.

An expired listener certificate fails every peer that verifies it, an expired destination
client certificate every delivery to a PACS that asks for one; both look like a network
fault from the other side. The daemon still starts with one (a PACS that does not verify
keeps working, and scoring goes on), but says so at start — an error once expired, a warning
within :data:`WARN_BEFORE_DAYS` — and ``/metrics`` serves each certificate's end of validity
as ``triage_tls_certificate_expiry_timestamp_seconds`` for an alert well before that.

The listener loads its certificate when it starts, so its end of validity is read then (a
renewed file counts after a restart); a destination's is read at each scrape, as the sender
loads its certificate for each association.

The first certificate of each PEM file is the one presented (the leaf, as ``load_cert_chain``
expects it first). Its validity is read from the DER with a few lines of ASN.1 walking: the
standard library parses certificates only inside a handshake, and a new dependency for one
date is not worth it.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from triage.config import Config
from triage.logs import get_logger
from triage.store.models import utcnow

log = get_logger("triage.tls")

#: A certificate closer than this to its end is warned about at start.
WARN_BEFORE_DAYS = 30

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL
)
_UTC_TIME, _GENERALIZED_TIME, _EXPLICIT_VERSION = 0x17, 0x18, 0xA0


@dataclass(frozen=True)
class Certificate:
    """A certificate the daemon presents: its role (``listener`` or ``destination``), the
    destination's name ("" for the listener) and its file."""

    role: str
    name: str
    path: str


def certificates_in_use(config: Config) -> list[Certificate]:
    """The listener's certificate when TLS is on, and each destination's client one."""
    found = []
    if config.dicom.tls and config.dicom.tls_cert:
        found.append(Certificate("listener", "", config.dicom.tls_cert))
    for destination in config.destinations:
        if destination.tls and destination.tls_cert:
            found.append(Certificate("destination", destination.name, destination.tls_cert))
    return found


def not_after(path: str | Path) -> datetime | None:
    """The end of validity (naive UTC) of the first certificate in the PEM file *path*, or
    ``None`` when it cannot be read."""
    try:
        pem = Path(path).read_bytes()
    except OSError:
        return None
    match = _PEM_CERTIFICATE.search(pem)
    if match is None:
        return None
    try:
        return validity_end(base64.b64decode(b"".join(match.group(1).split()), validate=True))
    except (ValueError, IndexError, binascii.Error):
        return None


def validity_end(der: bytes) -> datetime:
    """notAfter of a DER X.509 certificate (RFC 5280 4.1); ValueError when malformed."""
    _, start, end = _first(der, 0, len(der))  # Certificate
    _, start, end = _first(der, start, end)  # TBSCertificate
    fields = list(_elements(der, start, end))
    if fields and fields[0][0] == _EXPLICIT_VERSION:
        fields = fields[1:]
    # serialNumber, signature, issuer, validity
    _, start, end = fields[3]
    times = list(_elements(der, start, end))
    tag, start, end = times[1]
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; 50..99 are 19xx (RFC 5280 4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"not a time: tag 0x{tag:02X}")
    if not re.fullmatch(r"\d{14}Z", text):
        raise ValueError(f"not a DER time: {text!r}")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ")


def _first(der: bytes, offset: int, end: int) -> tuple[int, int, int]:
    for element in _elements(der, offset, end):
        return element
    raise ValueError("empty DER")


def _elements(der: bytes, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER element in ``der[offset:end]``."""
    while offset < end:
        tag, length = der[offset], der[offset + 1]
        offset += 2
        if length & 0x80:
            count = length & 0x7F
            if not 1 <= count <= 4:
                raise ValueError("DER length out of range")
            length = int.from_bytes(der[offset : offset + count], "big")
            offset += count
        if offset + length > end:
            raise ValueError("DER element runs past its container")
        yield tag, offset, offset + length
        offset += length


def expiry_notes(certificates: list[Certificate], now: datetime | None = None) -> list[str]:
    """One line per certificate expired or expiring within :data:`WARN_BEFORE_DAYS`, for
    `triage config` (``[dicom] tls_cert /etc/…/server.pem expired 2026-11-30T00:00:00Z``)."""
    now = now or utcnow()
    notes = []
    for certificate in certificates:
        end = not_after(certificate.path)
        if end is None:
            continue
        where = (
            "[dicom] tls_cert"
            if certificate.role == "listener"
            else f"[destinations.{certificate.name}] tls_cert"
        )
        days_left = (end - now).total_seconds() / 86400
        if days_left <= 0:
            notes.append(f"{where} {certificate.path} expired {end.isoformat()}Z")
        elif days_left <= WARN_BEFORE_DAYS:
            days = int(days_left)
            notes.append(
                f"{where} {certificate.path} expires {end.isoformat()}Z"
                f" (in {days} day{'' if days == 1 else 's'})"
            )
    return notes


def report_expiry(certificates: list[Certificate], now: datetime | None = None) -> None:
    """Log an error for each expired certificate, a warning for each that expires within
    :data:`WARN_BEFORE_DAYS`."""
    now = now or utcnow()
    for certificate in certificates:
        end = not_after(certificate.path)
        if end is None:
            continue
        fields = {
            "role": certificate.role,
            "destination": certificate.name or None,
            "path": certificate.path,
            "not_after": end.isoformat() + "Z",
        }
        days_left = (end - now).total_seconds() / 86400
        if days_left <= 0:
            log.error(
                "tls_certificate_expired",
                **fields,
                hint="peers that verify it refuse every association; renew it and restart",
            )
        elif days_left <= WARN_BEFORE_DAYS:
            log.warning("tls_certificate_expires_soon", **fields, days_left=int(days_left))


class CertificateCollector(Collector):
    """``triage_tls_certificate_expiry_timestamp_seconds{role, destination}``."""

    def __init__(self, certificates: list[Certificate]) -> None:
        self._certificates = certificates
        # What the listener serves was loaded at its start: fix its date now.
        self._fixed = {c: not_after(c.path) for c in certificates if c.role == "listener"}

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: registering must not read files."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """Each readable certificate's end of validity, as a Unix time."""
        gauge = GaugeMetricFamily(
            "triage_tls_certificate_expiry_timestamp_seconds",
            "End of validity (notAfter) of each TLS certificate the daemon presents",
            labels=["role", "destination"],
        )
        for certificate in self._certificates:
            if certificate in self._fixed:
                end = self._fixed[certificate]
            else:
                end = not_after(certificate.path)
            if end is not None:
                epoch = (end - datetime(1970, 1, 1)).total_seconds()
                gauge.add_metric([certificate.role, certificate.name], epoch)
        yield gauge
