"""Configuration: TOML + environment overrides, one-line errors naming the key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.peers import run_triage
from triage.config import Config, ConfigError, describe, load_config
from triage.tls_expiry import not_after

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_put_everything_under_var_of_the_working_directory(tmp_path) -> None:
    config = load_config(None, env={}, base_dir=tmp_path)
    assert config.dicom.ae_title == "TRIAGE" and config.dicom.port == 11112
    assert config.store.url == f"sqlite:///{tmp_path}/var/triage.db"
    assert config.store.spool_dir == f"{tmp_path}/var/spool"
    assert config.study.quiet_period_s == 10.0


def test_example_config_documents_exactly_the_defaults(tmp_path) -> None:
    example = load_config(ROOT / "deploy" / "triage.toml", env={}, base_dir=tmp_path)
    defaults = load_config(None, env={}, base_dir=tmp_path)
    assert describe(example) == describe(defaults)


def test_environment_overrides_every_kind_of_key(tmp_path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('[dicom]\nport = 104\nae_title = "FROMFILE"\n')
    env = {
        "TRIAGE_DICOM_PORT": "11113",
        "TRIAGE_DICOM_ALLOWED_PEERS": "PACS@10.0.0.5, ROUTER",
        "TRIAGE_DICOM_REQUIRE_CALLED_AE": "false",
        "TRIAGE_STUDY_QUIET_PERIOD_S": "2.5",
        "TRIAGE_DICOM_EXTRA_SOP_CLASSES": '["1.2.840.10008.5.1.4.1.1.7.2"]',
        "TRIAGE_CONFIG": str(path),
    }
    config = load_config(path, env=env, base_dir=tmp_path)
    assert config.dicom.port == 11113 and config.dicom.ae_title == "FROMFILE"
    assert config.dicom.allowed_peers == ("PACS@10.0.0.5", "ROUTER")
    assert config.dicom.require_called_ae is False
    assert config.study.quiet_period_s == 2.5
    assert config.dicom.extra_sop_classes == ("1.2.840.10008.5.1.4.1.1.7.2",)
    assert isinstance(config, Config)


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[dicom]\nprot = 1\n", {}, "config error: [dicom] prot: unknown key"),
        ("[dicmo]\nport = 1\n", {}, "config error: [dicmo]: unknown section"),
        ('[dicom]\nport = "x"\n', {}, "config error: [dicom] port: expected an integer (got 'x')"),
        ("[dicom]\nport = 70000\n", {}, "config error: [dicom] port: must be a TCP port"),
        ('[dicom]\nae_title = "A\\\\B"\n', {}, "config error: [dicom] ae_title: not a valid AE"),
        ('[dicom]\nae_title = "SEVENTEEN_CHARS_X"\n', {}, "[dicom] ae_title: not a valid AE"),
        ("", {"TRIAGE_DICOM_PORT": "many"}, "config error: [dicom] port: expected an integer"),
        ("", {"TRIAGE_DICOM_PROT": "1"}, "unknown environment override TRIAGE_DICOM_PROT"),
        ("", {"TRIAGE_DICOM_TLS": "maybe"}, "[dicom] tls: expected true or false"),
        ("[dicom]\ntls = true\n", {}, "config error: [dicom] tls_cert: required when tls = true"),
        ('[store]\nurl = "mysql://x"\n', {}, "[store] url: must be a sqlite:/// or postgresql://"),
        ('[log]\nlevel = "loud"\n', {}, "[log] level: must be debug, info, warning or error"),
        ("[dicom]\nport = 0\nlistener_processes = 2\n", {}, "[dicom] listener_processes"),
        ('[dicom]\nallowed_peers = ["PACS@"]\n', {}, "[dicom] allowed_peers: empty host"),
        # Never matched the peer's address: that PACS was rejected, with no word on the entry.
        (
            '[dicom]\nallowed_peers = ["PACS@10.0.0.5:104"]\n',
            {},
            "[dicom] allowed_peers: not an IP address or host name (no port, no spaces) after",
        ),
        (
            "",
            {"TRIAGE_DICOM_ALLOWED_PEERS": "PACS @ 10.0.0.5"},
            "[dicom] allowed_peers: not an IP address or host name",
        ),
        ('[dicom]\nextra_sop_classes = ["1.2.x"]\n', {}, "[dicom] extra_sop_classes: not a UID"),
        ("[dicom\n", {}, "not valid TOML"),
        ('[dicom]\nbind = "10.0.0.300"\n', {}, "[dicom] bind: not an IP address or a host"),
        ('[http]\nbind = "no-such-host.invalid"\n', {}, "[http] bind: not an IP address"),
        ('[http]\nbind = ""\n', {}, "[http] bind: must not be empty"),
        ("[dicom]\ntls_verify_client = true\n", {}, "[dicom] tls_verify_client: needs tls"),
        ("[model]\nthreads = 100000\n", {}, "[model] threads: must be 0..1024 (got 100000)"),
        ("[model]\nthreads = -1\n", {}, "[model] threads: must be 0..1024 (got -1)"),
    ],
)
def test_wrong_keys_and_values_give_one_line_naming_the_key(tmp_path, toml, env, message) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env, base_dir=tmp_path)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[dicom]\ntls_cert = "{pem}"\ntls_key = "{pem}"\n',
            "[dicom] tls: tls_cert, tls_key set but tls = false (DICOM would go unencrypted)",
        ),
        (
            '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.9"\n'
            'tls_ca = "{pem}"\n',
            "[destinations.pacs] tls: tls_ca set but tls = false",
        ),
    ],
)
def test_tls_files_without_tls_are_refused(tmp_path, toml: str, message: str) -> None:
    """Named TLS files mean TLS: with ``tls = false`` the images would go in plain text."""
    pem = tmp_path / "some.pem"
    pem.write_text("not read: refused before")
    path = tmp_path / "bad.toml"
    path.write_text(toml.format(pem=pem))
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={}, base_dir=tmp_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bind_addresses_and_names_that_resolve_are_taken(tmp_path) -> None:
    for bind in ("0.0.0.0", "::", "127.0.0.1", "::1", "localhost"):
        env = {"TRIAGE_DICOM_BIND": bind, "TRIAGE_HTTP_BIND": bind}
        config = load_config(None, env=env, base_dir=tmp_path)
        assert config.dicom.bind == config.http.bind == bind
    # Empty: every interface, as the DICOM listener always took it (configs that say so).
    assert load_config(None, env={"TRIAGE_DICOM_BIND": ""}, base_dir=tmp_path).dicom.bind == ""


def test_missing_config_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml", env={})


def test_destinations_from_file_and_from_the_environment(tmp_path) -> None:
    path = tmp_path / "d.toml"
    path.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[[destinations]]\nname = "archive"\nae_title = "ARCH"\nhost = "10.0.0.9"\n'
    )
    config = load_config(path, env={}, base_dir=tmp_path)
    assert [(d.name, d.ae_title, d.port) for d in config.destinations] == [
        ("pacs", "ORTHANC", 4242),
        ("archive", "ARCH", 104),
    ]
    env = {"TRIAGE_DESTINATIONS": '[{name="x", ae_title="X", host="h", port=11112}]'}
    assert [d.name for d in load_config(path, env=env, base_dir=tmp_path).destinations] == ["x"]
    # Set empty (an EnvironmentFile line "TRIAGE_DESTINATIONS="): no destinations, no error.
    for empty in ("", "  "):
        env = {"TRIAGE_DESTINATIONS": empty}
        assert load_config(path, env=env, base_dir=tmp_path).destinations == ()


def test_triage_config_prints_the_store_url_without_its_password(tmp_path) -> None:
    path = tmp_path / "pg.toml"
    path.write_text('[store]\nurl = "postgresql://triage:s3cr%40t@db.example:5432/triage"\n')
    result = run_triage(path, "config")
    assert result.returncode == 0, result.stderr
    assert "s3cr" not in result.stdout
    assert '"url": "postgresql://triage:***@db.example:5432/triage"' in result.stdout
    from triage.config import display_url

    # A "/" in the password (base64), one in the query string.
    assert display_url("postgresql://t:Xy/9kP+q@db/triage") == "postgresql://t:***@db/triage"
    assert display_url("postgresql://t@db/x?sslmode=require&password=Xy9") == (
        "postgresql://t@db/x?password=***&sslmode=require"  # SQLAlchemy sorts the query
    )
    assert load_config(path, env={}).store.url.endswith("triage:s3cr%40t@db.example:5432/triage")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[destinations]]\nname = "p"\nhost = "h"\n', "[destinations.p] ae_title: not a valid AE"),
        ('[[destinations]]\nname = "p"\nae_title = "P"\n', "[destinations.p] host: required"),
        (
            '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nprot = 1\n',
            "[destinations.p] prot: unknown key",
        ),
        ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\n' * 2, "duplicated ['p']"),
        ('[model]\ndevice = "tpu"\n', "[model] device: must be auto, cpu or cuda"),
        ('[model]\ncard = "nope.toml"\n', "[model] card: no such file"),
        ("[outputs]\nopacity = 2.0\n", "[outputs] opacity: must be 0..1"),
        ("[delivery]\nbackoff_factor = 0.5\n", "[delivery] backoff_factor: must be >= 1"),
    ],
)
def test_wrong_destination_model_and_delivery_values(tmp_path, toml, message) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(path, env={}, base_dir=tmp_path)
    assert message in str(caught.value)


# --- through the command line: exit status 2 and one line ----------------------------------


def _cli(capsys, *args: str) -> tuple[int, str]:
    """`triage ARGS` in-process: (exit status, stderr)."""
    from triage.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def _self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its (unencrypted) key, made by openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}"),
        ],
        cwd=folder,
        check=True,
        capture_output=True,
    )
    return folder / f"{name}.pem", folder / f"{name}.key"


def test_tls_files_that_exist_but_do_not_load_are_config_errors(
    tmp_path, capsys, monkeypatch
) -> None:
    for name in [n for n in os.environ if n.startswith("TRIAGE_")]:
        monkeypatch.delenv(name)
    cert, key = _self_signed(tmp_path / "pki", "server")
    other_cert, other_key = _self_signed(tmp_path / "pki", "other")
    text = tmp_path / "notes.txt"
    text.write_text("not a certificate\n")
    destination = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\ntls = true\n'
    cases = [
        (
            f'{destination}tls_ca = "{text}"\n',
            "config error: [destinations.pacs] tls_ca: cannot load CA certificates from",
        ),
        (
            f'{destination}tls_cert = "{text}"\ntls_key = "{key}"\n',
            "config error: [destinations.pacs] tls_cert: no PEM certificate in",
        ),
        (
            f'[dicom]\ntls = true\ntls_cert = "{text}"\ntls_key = "{key}"\n',
            "config error: [dicom] tls_cert: no PEM certificate in",
        ),
        (
            f'[dicom]\ntls = true\ntls_cert = "{cert}"\ntls_key = "{other_key}"\n',
            "config error: [dicom] tls_key: cannot load",
        ),
        (
            f'[dicom]\ntls = true\ntls_cert = "{cert}"\ntls_key = "{key}"\ntls_ca = "{text}"\n',
            "config error: [dicom] tls_ca: cannot load CA certificates",
        ),
    ]
    path = tmp_path / "tls.toml"
    for toml, message in cases:
        path.write_text(toml)
        for command in ("config", "serve"):
            code, err = _cli(capsys, "--config", str(path), command)
            assert code == 2, (toml, err)
            assert err.startswith(f"triage: {message}"), err
            assert len(err.strip().splitlines()) == 1
    # The same files, right, load.
    path.write_text(
        f'[dicom]\ntls = true\ntls_cert = "{cert}"\ntls_key = "{key}"\ntls_ca = "{other_cert}"\n'
        f'{destination}tls_ca = "{cert}"\ntls_cert = "{other_cert}"\ntls_key = "{other_key}"\n'
    )
    # Valid; the test CA's two days are said, not refused.
    code, err = _cli(capsys, "--config", str(path), "config")
    assert code == 0 and err.splitlines() == [
        f"triage: warning: [dicom] tls_cert {cert} expires {not_after(cert).isoformat()}Z"
        " (in 1 day)",
        f"triage: warning: [destinations.pacs] tls_cert {other_cert} expires"
        f" {not_after(other_cert).isoformat()}Z (in 1 day)",
    ]


def test_a_config_file_that_cannot_be_read_is_a_config_error(tmp_path, capsys, monkeypatch) -> None:
    from triage import config as config_module
    from triage.cli.admin import main as admin_main

    folder = tmp_path / "a-directory.toml"
    folder.mkdir()
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[dicom]\nae_title = "ÄRZTE"\n'.encode("latin-1"))
    expected = {
        folder: f"config error: cannot read {folder}: Is a directory",
        latin1: f"config error: {latin1}: not UTF-8 text (byte 20)",
    }
    for path, message in expected.items():
        assert _cli(capsys, "--config", str(path), "config") == (2, f"triage: {message}\n")
        assert admin_main(["--config", str(path), "status"]) == 2
        assert capsys.readouterr().err == f"triage-admin: {message}\n"

    def refused(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    # The tests run as root, whom file modes do not stop: refuse the open itself.
    monkeypatch.setattr(config_module, "open", refused, raising=False)
    code, err = _cli(capsys, "--config", str(latin1), "config")
    assert (code, err) == (2, f"triage: config error: cannot read {latin1}: Permission denied\n")


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[study]\nquiet_period_s = nan\n", {}, "[study] quiet_period_s: expected a finite number"),
        ("[study]\ncheck_interval_s = inf\n", {}, "[study] check_interval_s: expected a finite"),
        ("", {"TRIAGE_STUDY_QUIET_PERIOD_S": "nan"}, "[study] quiet_period_s: expected a finite"),
        ("", {"TRIAGE_WORKER_LEASE_S": "-inf"}, "[worker] lease_s: expected a finite number"),
        ("", {"TRIAGE_DELIVERY_TIMEOUT_S": "Infinity"}, "[delivery] timeout_s: expected a finite"),
        (
            "[store]\nretention_days = 1000000\n",
            {},
            "[store] retention_days: must be 1..36500 (100 years) (got 1000000)",
        ),
        (
            "",
            {"TRIAGE_STORE_AUDIT_RETENTION_DAYS": "-1"},
            "[store] audit_retention_days: must be 0 (keep for ever) or 1..36500",
        ),
        (
            "[study]\ncheck_interval_s = 1e12\n",
            {},
            "[study] check_interval_s: must be > 0 and <= 86400 s (one day)",
        ),
        ("[worker]\nlease_s = 4\n", {}, "[worker] lease_s: must be >= 5 and <= 86400 s"),
        ("[dicom]\nshutdown_grace_s = 1e9\n", {}, "[dicom] shutdown_grace_s: must be >= 0 and"),
        ("[model]\nbatch_wait_ms = 1e9\n", {}, "[model] batch_wait_ms: must be 0..60000"),
        ("[delivery]\nbackoff_factor = 1e300\n", {}, "[delivery] backoff_factor: must be <= 10"),
        ("[delivery]\nmax_attempts = 5000\n", {}, "[delivery] max_attempts: must be 1..100"),
        ('[store]\nurl = "sqlite:///:memory:"\n', {}, "[store] url: an in-memory SQLite"),
        ('[store]\nurl = "sqlite://"\n', {}, "[store] url: an in-memory SQLite database"),
        ('[store]\nurl = "sqlite+pysqlite://"\n', {}, "[store] url: an in-memory SQLite"),
        ("", {"TRIAGE_STORE_URL": "sqlite:///:memory:"}, "[store] url: an in-memory SQLite"),
        # Resolved against the working directory before validation, "" became the working
        # directory itself: the spool (and its outbox, and the purge) ran in it.
        ('[store]\nspool_dir = ""\n', {}, "[store] spool_dir: must not be empty"),
        ("", {"TRIAGE_STORE_SPOOL_DIR": ""}, "[store] spool_dir: must not be empty"),
        # A card path with no parts ("." or "./") raised IndexError: a traceback, exit 1.
        ('[model]\ncard = "."\n', {}, "[model] card: no such file:"),
        ('[model]\ncard = "./"\n', {}, "[model] card: no such file:"),
    ],
)
def test_non_finite_huge_and_in_memory_values_are_refused(
    tmp_path, capsys, monkeypatch, toml, env, message
) -> None:
    for name in [n for n in os.environ if n.startswith("TRIAGE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "c.toml"
    path.write_text(toml)
    code, err = _cli(capsys, "--config", str(path), "config")
    assert code == 2 and err.startswith(f"triage: config error: {message}"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "store", "message"),
    [
        (
            "serve",
            'url = "sqlite:///in-the-way/x.db"',
            "cannot create the SQLite database's folder: a file is in the way: {dir}/in-the-way",
        ),
        (
            "serve",
            'spool_dir = "in-the-way/spool"',
            "cannot create the spool folder {dir}/in-the-way/spool: a file is in the way:",
        ),
        (
            "worker",
            'spool_dir = "in-the-way"',
            "cannot create the spool folder {dir}/in-the-way: a file is in the way:",
        ),
    ],
)
def test_a_store_or_spool_folder_that_cannot_be_made_stops_start_in_one_line(
    tmp_path, command, store, message
) -> None:
    (tmp_path / "in-the-way").write_text("a file, not a folder\n")
    config = tmp_path / "c.toml"
    config.write_text(
        f"[store]\n{store}\n[worker]\nenabled = false\n[dicom]\nport = 0\n[http]\nport = 0\n"
    )
    result = run_triage(config, command, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("triage: " + message.format(dir=tmp_path)), last


def test_triage_config_resolves_relative_paths_against_workdir(
    tmp_path, capsys, monkeypatch
) -> None:
    """`triage config --workdir DIR` shows what the daemon running in DIR uses, as
    `triage-admin --workdir` and `triage demo --workdir` do; a relative TLS file found only
    there is no config error."""
    import json

    for name in [n for n in os.environ if n.startswith("TRIAGE_")]:
        monkeypatch.delenv(name)
    workdir = tmp_path / "var-lib-msk-triage"
    cert, _key = _self_signed(workdir / "pki", "server")
    path = tmp_path / "triage.toml"
    path.write_text(
        '[dicom]\ntls = true\ntls_cert = "pki/server.pem"\ntls_key = "pki/server.key"\n'
    )
    monkeypatch.chdir(tmp_path)
    code, err = _cli(capsys, "--config", str(path), "config")
    assert code == 2 and "[dicom] tls_cert: no such file" in err
    from triage.cli.main import main

    assert main(["--config", str(path), "config", "--workdir", str(workdir)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dicom"]["tls_cert"] == str(cert)
    assert shown["store"]["url"] == f"sqlite:///{workdir}/var/triage.db"
    assert shown["store"]["spool_dir"] == f"{workdir}/var/spool"
