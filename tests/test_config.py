"""Configuration: TOML + environment overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from triage.config import Config, ConfigError, describe, load_config

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
        ('[dicom]\nextra_sop_classes = ["1.2.x"]\n', {}, "[dicom] extra_sop_classes: not a UID"),
        ("[dicom\n", {}, "not valid TOML"),
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
