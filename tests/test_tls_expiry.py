"""The end of validity of the daemon's TLS certificates: read from real openssl certificates,
logged at start when near or past, served as a metric."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from triage.config import Config, DestinationConfig, DicomConfig
from triage.tls_expiry import (
    Certificate,
    CertificateCollector,
    certificates_in_use,
    expiry_notes,
    not_after,
    report_expiry,
)


def _self_signed(folder: Path, name: str, days: int) -> Path:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", str(days),
            "-subj", f"/CN={name}",
        ],
        cwd=folder,
        check=True,
        capture_output=True,
    )  # fmt: skip
    return folder / f"{name}.pem"


def _openssl_end(path: Path) -> datetime:
    out = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-enddate"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return datetime.strptime(out.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y GMT")


@pytest.mark.parametrize("days", [2, 20000], ids=["utc-time", "generalized-time"])
def test_the_end_of_validity_is_what_openssl_reads(tmp_path: Path, days: int) -> None:
    # Before 2050 a certificate's dates are UTCTime (two-digit year), from 2050 GeneralizedTime.
    pem = _self_signed(tmp_path, "leaf", days)
    assert not_after(pem) == _openssl_end(pem)
    # A chain file: the first certificate is the one presented.
    chain = tmp_path / "chain.pem"
    chain.write_bytes(pem.read_bytes() + _self_signed(tmp_path, "other", 5).read_bytes())
    assert not_after(chain) == _openssl_end(pem)


def test_what_is_no_certificate_reads_as_none(tmp_path: Path) -> None:
    pem = _self_signed(tmp_path, "leaf", 2)
    text = pem.read_text()
    broken = tmp_path / "broken.pem"
    broken.write_text(text[: len(text) // 2] + "\n-----END CERTIFICATE-----\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    for path in (tmp_path / "missing.pem", tmp_path / "leaf.key", broken, garbage):
        assert not_after(path) is None, path


def test_expired_and_expiring_certificates_are_logged(tmp_path: Path) -> None:
    pem = _self_signed(tmp_path, "leaf", 40)
    end = _openssl_end(pem)
    listener = Certificate("listener", "", str(pem))
    pacs = Certificate("destination", "pacs", str(pem))
    unreadable = Certificate("destination", "gone", str(tmp_path / "missing.pem"))
    with capture_logs() as logs:
        report_expiry([listener, pacs, unreadable], now=end - timedelta(days=35))
    assert logs == []
    with capture_logs() as logs:
        report_expiry([listener, pacs], now=end - timedelta(days=10, hours=1))
    assert [(r["event"], r["role"], r["destination"], r["days_left"]) for r in logs] == [
        ("tls_certificate_expires_soon", "listener", None, 10),
        ("tls_certificate_expires_soon", "destination", "pacs", 10),
    ]
    with capture_logs() as logs:
        report_expiry([pacs], now=end + timedelta(seconds=1))
    [record] = logs
    assert record["event"] == "tls_certificate_expired" and record["log_level"] == "error"
    assert record["not_after"] == end.isoformat() + "Z" and "renew" in record["hint"]


def test_the_metric_fixes_the_listeners_date_and_rereads_a_destinations(tmp_path: Path) -> None:
    """The listener serves the certificate it loaded at start; the sender loads its
    certificate for each association, so a renewed file counts at once."""
    first = _self_signed(tmp_path, "first", 2)
    renewed = _self_signed(tmp_path, "renewed", 400)
    listener_file, destination_file = tmp_path / "listener.pem", tmp_path / "client.pem"
    listener_file.write_bytes(first.read_bytes())
    destination_file.write_bytes(first.read_bytes())
    config = Config(
        dicom=DicomConfig(tls=True, tls_cert=str(listener_file), tls_key="k"),
        destinations=(
            DestinationConfig(name="pacs", tls=True, tls_cert=str(destination_file)),
            DestinationConfig(name="plain"),
        ),
    )
    certificates = certificates_in_use(config)
    assert [(c.role, c.name) for c in certificates] == [("listener", ""), ("destination", "pacs")]
    collector = CertificateCollector(certificates)

    def samples() -> dict[tuple[str, str], datetime]:
        [family] = collector.collect()
        assert family.name == "triage_tls_certificate_expiry_timestamp_seconds"
        return {
            (s.labels["role"], s.labels["destination"]): datetime(1970, 1, 1)
            + timedelta(seconds=s.value)
            for s in family.samples
        }

    start = _openssl_end(first)
    assert samples() == {("listener", ""): start, ("destination", "pacs"): start}
    listener_file.write_bytes(renewed.read_bytes())
    destination_file.write_bytes(renewed.read_bytes())
    later = _openssl_end(renewed)
    assert samples() == {("listener", ""): start, ("destination", "pacs"): later}
    destination_file.unlink()
    assert samples() == {("listener", ""): start}


def test_triage_config_warns_of_a_certificate_near_its_end(tmp_path: Path) -> None:
    from tests.peers import run_triage, write_config

    pem = _self_signed(tmp_path, "server", 2)
    config = write_config(
        tmp_path / "triage.toml",
        {"dicom": {"tls": True, "tls_cert": str(pem), "tls_key": str(tmp_path / "server.key")}},
    )
    result = run_triage(config, "config")
    assert result.returncode == 0, result.stderr
    end = _openssl_end(pem).isoformat()
    assert result.stderr == (f"triage: warning: [dicom] tls_cert {pem} expires {end}Z (in 1 day)\n")
    later = _openssl_end(pem) + timedelta(days=1)
    pacs = Certificate("destination", "pacs", str(pem))
    assert expiry_notes([pacs], now=later) == [f"[destinations.pacs] tls_cert {pem} expired {end}Z"]
