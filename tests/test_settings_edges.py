"""Settings people get wrong (worker/settings.py): where the env file comes from, unknown
variables, address separators, files that are missing or broken, ports, the sender address."""

from __future__ import annotations

import socket

import pytest

from tests.support.helpers import clean_env
from worker import settings as settings_module
from worker.metrics import Metrics
from worker.settings import (
    SettingsError,
    find_env_file,
    load_settings,
    unknown_variables,
)

SECRET = "abcdefghijklmnop"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    clean_env(monkeypatch, tmp_path)
    # the installer's file of this machine (if any) never leaks into a test
    monkeypatch.setattr(settings_module, "SYSTEM_ENV_FILE", tmp_path / "etc" / "notifier.env")


def one_line(exc: pytest.ExceptionInfo[SettingsError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# -- where the env file comes from --------------------------------------------------------------


def test_env_file_order(tmp_path, monkeypatch):
    system = settings_module.SYSTEM_ENV_FILE
    assert find_env_file() is None  # nothing anywhere: the environment only
    system.parent.mkdir()
    system.write_text("NOTIFIER_CONCURRENCY=2\n")
    assert find_env_file() == system
    assert load_settings().concurrency == 2
    (tmp_path / ".env").write_text("NOTIFIER_CONCURRENCY=3\n")
    assert find_env_file() == tmp_path / ".env"  # ./.env before the installer's file
    assert load_settings().concurrency == 3
    named = tmp_path / "named.env"
    named.write_text("NOTIFIER_CONCURRENCY=5\n")
    monkeypatch.setenv("NOTIFIER_ENV_FILE", str(named))
    assert find_env_file() == named
    assert load_settings().concurrency == 5
    given = tmp_path / "given.env"
    given.write_text("NOTIFIER_CONCURRENCY=7\n")
    assert find_env_file(given) == given  # --env-file before everything
    assert load_settings(env_file=given).concurrency == 7
    monkeypatch.setenv("NOTIFIER_ENV_FILE", "/dev/null")  # what the systemd units set
    assert find_env_file() is None
    assert load_settings().concurrency == 4


def test_the_environment_wins_over_any_env_file(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("NOTIFIER_CONCURRENCY=3\n")
    monkeypatch.setenv("NOTIFIER_CONCURRENCY", "9")
    assert load_settings().concurrency == 9


def test_a_named_env_file_that_is_missing_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(SettingsError) as info:
        find_env_file(tmp_path / "nope.env")
    assert one_line(info).startswith(f"--env-file {tmp_path / 'nope.env'}: no such file")
    monkeypatch.setenv("NOTIFIER_ENV_FILE", str(tmp_path / "gone.env"))
    with pytest.raises(SettingsError) as info:
        find_env_file()
    assert one_line(info).startswith(f"NOTIFIER_ENV_FILE={tmp_path / 'gone.env'}: no such file")


def test_an_unreadable_installer_file_says_how_to_get_past_it(tmp_path):
    system = settings_module.SYSTEM_ENV_FILE
    system.mkdir(parents=True)  # exists but cannot be read as a file (root reads anything)
    with pytest.raises(SettingsError) as info:
        find_env_file()
    text = one_line(info)
    assert text.startswith(f"{system}: cannot read it")
    assert "sudo" in text and "--env-file" in text and "NOTIFIER_ENV_FILE=/dev/null" in text


# -- unknown NOTIFIER_* variables ---------------------------------------------------------------


def test_unknown_variable_in_the_environment_names_the_closest_setting(monkeypatch):
    monkeypatch.setenv("NOTIFIER_SMTP_PASWORD", SECRET)
    monkeypatch.setenv("NOTIFIER_MAIL_TOO", "a@example.com")
    monkeypatch.setenv("NOTIFIER_ENV_FILE", "/dev/null")  # not a setting, but ours: allowed
    monkeypatch.setenv("NOTIFIER_PRODUCER_TIMEOUT_S", "1")  # reserved for the producer
    monkeypatch.setenv("NOTIFIER_SMTP_HOST", "x")  # a setting
    found = unknown_variables(None)
    assert found == [
        "NOTIFIER_MAIL_TOO (in the environment) is not a setting: did you mean NOTIFIER_MAIL_TO?",
        "NOTIFIER_SMTP_PASWORD (in the environment) is not a setting: did you mean "
        "NOTIFIER_SMTP_PASSWORD?",
    ]
    assert SECRET not in " ".join(found)


def test_unknown_variable_in_the_env_file_and_a_missing_prefix(tmp_path):
    env = tmp_path / "notifier.env"
    env.write_text(
        "NOTIFIER_SMTP_USERNAME=1@qq.com\n"
        "notifier_smtp_pasword=x\n"  # pydantic-settings is case-insensitive: so are we
        "SMTP_PASSWORD=y\n"
        "NOTIFIER_FROBNICATE=1\n"
        "PYTHONUNBUFFERED=1\n"
    )
    assert unknown_variables(env) == [
        f"notifier_smtp_pasword (in {env}) is not a setting: did you mean NOTIFIER_SMTP_PASSWORD?",
        f"SMTP_PASSWORD (in {env}) is ignored: settings take the prefix, NOTIFIER_SMTP_PASSWORD",
        f"NOTIFIER_FROBNICATE (in {env}) is not a setting (every setting is in .env.example)",
    ]


# -- address lists -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "a@example.com，b@example.com",  # full-width comma (Chinese input method)
        "a@example.com; b@example.com",
        "a@example.com；b@example.com",  # full-width semicolon
        "a@example.com、b@example.com",  # enumeration comma
        "a@example.com b@example.com",
        "a@example.com\tb@example.com",
        "量化 提醒 <a@example.com>, B@example.com",  # a display name with spaces: dropped
        '"Doe, Jane" <a@example.com>；b@example.com',
    ],
)
def test_address_separators(monkeypatch, value):
    monkeypatch.setenv("NOTIFIER_MAIL_TO", value)
    monkeypatch.setenv("NOTIFIER_ALLOWED_RECIPIENTS", value)
    s = load_settings()
    assert s.mail_to == ["a@example.com", "b@example.com"]
    assert s.allowed_recipients == ["a@example.com", "b@example.com"]


def test_an_unknown_separator_is_named(monkeypatch):
    monkeypatch.setenv("NOTIFIER_MAIL_TO", "a@example.com|b@example.com")
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = one_line(info)
    assert text.startswith("NOTIFIER_MAIL_TO: ")
    assert "'|'" in text and "commas" in text


# -- files that are missing or broken ------------------------------------------------------------


def test_missing_ca_file(tmp_path):
    with pytest.raises(SettingsError) as info:
        load_settings(smtp_ca_file=tmp_path / "ca.pem")
    text = one_line(info)
    assert text.startswith(f"NOTIFIER_SMTP_CA_FILE: {tmp_path / 'ca.pem'}: no such file")


def test_ca_file_that_is_not_a_certificate(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(SettingsError) as info:
        load_settings(smtp_ca_file=tmp_path / "ca.pem")
    assert "no PEM certificate" in one_line(info)


def test_ca_file_of_a_failover_account(tmp_path):
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(f'[[account]]\nname = "b"\nca_file = "{tmp_path / "x.pem"}"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(accounts_file=accounts)
    text = one_line(info)
    assert text.startswith(f"NOTIFIER_ACCOUNTS_FILE={accounts}: account 'b': ca_file: ")
    assert "no such file" in text


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_template_dir_that_is_not_a_directory(tmp_path, kind):
    path = tmp_path / "templates"
    if kind == "file":
        path.write_text("x")
    with pytest.raises(SettingsError) as info:
        load_settings(template_dir=path)
    text = one_line(info)
    assert text.startswith(f"NOTIFIER_TEMPLATE_DIR: {path}: ")
    assert ("no such directory" if kind == "missing" else "not a directory") in text


def test_template_dir_the_user_cannot_read(tmp_path, monkeypatch):
    """The tests run as root, who reads anything: the refusal is simulated at os.listdir."""
    path = tmp_path / "templates"
    path.mkdir()

    def refuse(where):
        raise PermissionError(13, "Permission denied", str(where))

    monkeypatch.setattr(settings_module.os, "listdir", refuse)
    with pytest.raises(SettingsError) as info:
        load_settings(template_dir=path)
    text = one_line(info)
    assert text.startswith(f"NOTIFIER_TEMPLATE_DIR: {path}: cannot read it (Permission denied)")
    assert "dynamic user" in text


@pytest.mark.parametrize("setting", ["routes_file", "accounts_file"])
def test_toml_syntax_error_gives_line_and_column(tmp_path, setting):
    path = tmp_path / "x.toml"
    path.write_text('[[route]]\nto = ["a@example.com"\nname = "x"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(**{setting: path}, mail_to="a@example.com")
    text = one_line(info)
    assert text.startswith(f"NOTIFIER_{setting.upper()}={path}: not valid TOML at line 3, ")
    assert "column 1" in text


def test_redis_url_without_a_scheme_is_named_and_the_password_hidden():
    with pytest.raises(SettingsError) as info:
        load_settings(redis_url=f"default:{SECRET}@localhost:6379")
    text = one_line(info)
    assert text.startswith("NOTIFIER_REDIS_URL: ")
    assert "redis://" in text and SECRET not in text


# -- metrics port --------------------------------------------------------------------------------


def test_metrics_port_offset_for_template_instances(monkeypatch):
    monkeypatch.setenv("NOTIFIER_METRICS_PORT_OFFSET", "2")
    assert load_settings().metrics_port == 9466
    assert load_settings(metrics_port=9500).metrics_port == 9502
    assert load_settings(metrics_port=0).metrics_port == 0  # off stays off
    monkeypatch.setenv("NOTIFIER_METRICS_PORT_OFFSET", "worker-a")
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = one_line(info)
    assert text.startswith("NOTIFIER_METRICS_PORT_OFFSET: ")
    assert "notifier@1" in text and "NOTIFIER_METRICS_PORT_OFFSET=0" in text


def test_metrics_port_in_use_is_a_settings_error():
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        with pytest.raises(SettingsError) as info:
            Metrics(1.0).serve("127.0.0.1", port)
    finally:
        held.close()
    text = one_line(info)
    assert text.startswith(f"NOTIFIER_METRICS_PORT: 127.0.0.1:{port} is already in use")
    assert "0 turns /metrics off" in text


# -- the sender address --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "warned"),
    [
        ({"smtp_provider": "qq", "smtp_username": "1@qq.com", "mail_from": "x@example.com"}, True),
        (
            {"smtp_provider": "qq", "smtp_username": "1@qq.com", "mail_from": "量化 <1@QQ.com>"},
            False,
        ),
        ({"smtp_host": "smtp.163.com", "smtp_username": "me@163.com", "mail_from": "a@b.cn"}, True),
        ({"smtp_provider": "gmail", "smtp_username": "me@gmail.com", "mail_from": "a@b.cn"}, True),
        ({"smtp_host": "relay.example.com", "smtp_username": "u", "mail_from": "a@b.cn"}, False),
        ({"smtp_provider": "outlook", "smtp_username": "u@x.com", "mail_from": "a@b.cn"}, False),
    ],
)
def test_sender_differs_from_the_account(fields, warned):
    warnings = load_settings(smtp_password=SECRET, **fields).sender_warnings()
    if not warned:
        assert warnings == []
        return
    (text,) = warnings
    assert text.startswith("NOTIFIER_MAIL_FROM: ")
    assert fields["mail_from"].lower() in text.lower()
    assert fields["smtp_username"] in text
    assert "NOTIFIER_SMTP_USERNAME" in text


def test_sender_of_a_failover_account(tmp_path):
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(
        '[[account]]\nname = "b"\nprovider = "163"\nusername = "me@163.com"\n'
        'password = "x"\nmail_from = "other@example.com"\n'
    )
    s = load_settings(accounts_file=accounts, mail_to="t@example.com")
    (text,) = s.sender_warnings()
    assert text.startswith(f"NOTIFIER_ACCOUNTS_FILE={accounts}: account 'b': mail_from ")
    assert "other@example.com" in text and "me@163.com" in text
