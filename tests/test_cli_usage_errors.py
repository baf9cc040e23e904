"""`triage` usage errors: one line on stderr, exit status 2 (as triage-admin's)."""

from __future__ import annotations

import pytest

from triage.cli.main import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bogus"], "triage: argument command: invalid choice"),
        (["serve", "--bogus"], "triage: unrecognized arguments: --bogus"),
        (["demo", "--studies", "x"], "triage demo: argument --studies: not a whole number"),
        (["demo", "--studies", "0"], "triage demo: argument --studies: must be at least 1"),
        (["demo", "--studies", "-3"], "triage demo: argument --studies: must be at least 1"),
        (["demo", "--timeout", "-1"], "triage demo: argument --timeout: must be a positive"),
        (["demo", "--timeout", "nan"], "triage demo: argument --timeout: must be a positive"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(capsys, argv, expected) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(expected), err


def test_an_empty_config_path_is_an_error_not_the_defaults(capsys, monkeypatch, tmp_path) -> None:
    """`--config "$UNSET"` ran on the defaults: a store and spool in whatever directory that
    was, the demo model, and no word of it. TRIAGE_CONFIG set empty is as if unset."""
    from triage.cli.admin import main as admin_main

    monkeypatch.setenv("TRIAGE_CONFIG", "/nonexistent/triage.toml")
    assert main(["--config", "", "config"]) == 2
    assert capsys.readouterr().err.strip() == (
        "triage: config error: the config file path is empty"
    )
    assert admin_main(["--config", "", "status"]) == 2
    assert capsys.readouterr().err.strip() == (
        "triage-admin: config error: the config file path is empty"
    )
    monkeypatch.setenv("TRIAGE_CONFIG", "")
    monkeypatch.chdir(tmp_path)
    assert main(["config"]) == 0
