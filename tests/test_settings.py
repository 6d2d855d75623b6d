"""Settings (worker/settings.py): environment, .env, presets, passwords, one-line errors."""

from __future__ import annotations

import pytest

from tests.support.helpers import clean_env
from worker.settings import PROVIDERS, Settings, SettingsError, load_settings

SECRET = "abcdefghijklmnop"  # a 16-character QQ authorization code


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    """No NOTIFIER_* variables from outside, no credentials, and an empty working directory."""
    clean_env(monkeypatch, tmp_path)


def error(**env: str) -> str:
    mp = pytest.MonkeyPatch()
    try:
        for key, value in env.items():
            mp.setenv(f"NOTIFIER_{key.upper()}", value)
        with pytest.raises(SettingsError) as info:
            load_settings()
    finally:
        mp.undo()
    text = str(info.value)
    assert "\n" not in text
    return text


# -- sources --------------------------------------------------------------------------------


def test_defaults():
    s = load_settings()
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.key_prefix == "notifier"
    assert (s.smtp_host, s.smtp_port, s.smtp_tls) == ("localhost", 25, "none")
    assert s.smtp_validate_certs is True
    assert s.smtp_password is None
    assert s.mail_to == [] and s.allowed == frozenset()
    assert s.metrics_host == "127.0.0.1"
    assert s.latency_target_s == 1.0
    assert s.worker_id  # assigned: host-pid


def test_environment_with_the_notifier_prefix(monkeypatch):
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://127.0.0.1:7777/3")
    monkeypatch.setenv("NOTIFIER_KEY_PREFIX", "alerts")
    monkeypatch.setenv("NOTIFIER_SMTP_HOST", "mail.example.com")
    monkeypatch.setenv("NOTIFIER_SMTP_PORT", "2525")
    monkeypatch.setenv("NOTIFIER_SMTP_TLS", "starttls")
    monkeypatch.setenv("NOTIFIER_SMTP_VALIDATE_CERTS", "false")
    monkeypatch.setenv("NOTIFIER_CONCURRENCY", "8")
    monkeypatch.setenv("NOTIFIER_LATENCY_TARGET_S", "0.5")
    monkeypatch.setenv("SMTP_HOST", "unprefixed.example.com")  # ignored: no prefix
    s = load_settings()
    assert s.redis_url == "redis://127.0.0.1:7777/3"
    assert s.key_prefix == "alerts"
    assert (s.smtp_host, s.smtp_port, s.smtp_tls) == ("mail.example.com", 2525, "starttls")
    assert s.smtp_validate_certs is False
    assert s.concurrency == 8
    assert s.latency_target_s == 0.5


def test_dotenv_file_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        "# a comment\n"
        "NOTIFIER_SMTP_PROVIDER=qq\n"
        "NOTIFIER_SMTP_USERNAME=12345@qq.com\n"
        f"NOTIFIER_SMTP_PASSWORD={SECRET}\n"
        "NOTIFIER_MAIL_TO=trader@example.com, risk@example.com\n"
        "NOTIFIER_CONCURRENCY=2\n",
        encoding="utf-8",
    )
    s = load_settings()
    assert (s.smtp_host, s.smtp_port, s.smtp_tls) == ("smtp.qq.com", 465, "ssl")
    assert s.smtp_username == "12345@qq.com"
    assert s.smtp_password is not None and s.smtp_password.get_secret_value() == SECRET
    assert s.mail_from == "12345@qq.com"  # from the username when it is an address
    assert s.mail_to == ["trader@example.com", "risk@example.com"]
    assert s.concurrency == 2
    monkeypatch.setenv("NOTIFIER_CONCURRENCY", "5")  # the environment wins over .env
    assert load_settings().concurrency == 5


def test_no_dotenv_outside_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("NOTIFIER_CONCURRENCY=3\n")
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert load_settings().concurrency == 4


# -- provider presets -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "host", "port", "tls"),
    [
        ("qq", "smtp.qq.com", 465, "ssl"),
        ("163", "smtp.163.com", 465, "ssl"),
        ("126", "smtp.126.com", 465, "ssl"),
        ("gmail", "smtp.gmail.com", 465, "ssl"),
        ("outlook", "smtp.office365.com", 587, "starttls"),
        ("exmail", "smtp.exmail.qq.com", 465, "ssl"),
    ],
)
def test_provider_presets(monkeypatch, provider, host, port, tls):
    monkeypatch.setenv("NOTIFIER_SMTP_PROVIDER", provider.upper())  # case does not matter
    s = load_settings()
    assert s.smtp_provider == provider
    assert (s.smtp_host, s.smtp_port, s.smtp_tls) == (host, port, tls)
    assert s.provider is PROVIDERS[provider]


def test_explicit_values_win_over_the_preset(monkeypatch):
    monkeypatch.setenv("NOTIFIER_SMTP_PROVIDER", "qq")
    monkeypatch.setenv("NOTIFIER_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("NOTIFIER_SMTP_PORT", "10465")
    s = load_settings()
    assert (s.smtp_host, s.smtp_port, s.smtp_tls) == ("127.0.0.1", 10465, "ssl")
    monkeypatch.setenv("NOTIFIER_SMTP_TLS", "none")
    assert load_settings().smtp_tls == "none"


def test_explicit_tls_mode_gets_its_own_port_not_the_presets():
    # QQ offers STARTTLS on 587; the preset's 465 is implicit TLS and would hang STARTTLS
    s = load_settings(smtp_provider="qq", smtp_tls="starttls")
    assert (s.smtp_host, s.smtp_port, s.smtp_tls) == ("smtp.qq.com", 587, "starttls")
    s = load_settings(smtp_provider="outlook", smtp_tls="ssl")
    assert (s.smtp_port, s.smtp_tls) == (465, "ssl")


@pytest.mark.parametrize(("tls", "port"), [("ssl", 465), ("starttls", 587), ("none", 25)])
def test_port_follows_the_tls_mode_without_preset(monkeypatch, tls, port):
    monkeypatch.setenv("NOTIFIER_SMTP_TLS", tls)
    assert load_settings().smtp_port == port


def test_unknown_provider_names_the_known_ones():
    text = error(smtp_provider="yahoo")
    assert text.startswith("NOTIFIER_SMTP_PROVIDER: unknown provider 'yahoo'")
    for name in ("qq", "163", "126", "gmail", "outlook", "exmail"):
        assert name in text


# -- passwords --------------------------------------------------------------------------------


def test_password_file(tmp_path, monkeypatch):
    path = tmp_path / "pw"
    path.write_text(f"{SECRET}\n", encoding="utf-8")
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD_FILE", str(path))
    s = load_settings()
    assert s.smtp_password is not None
    assert s.smtp_password.get_secret_value() == SECRET  # trailing newline stripped


def test_password_wins_over_password_file(tmp_path, monkeypatch):
    path = tmp_path / "pw"
    path.write_text("from-file")
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD_FILE", str(path))
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD", "from-env")
    s = load_settings()
    assert s.smtp_password is not None and s.smtp_password.get_secret_value() == "from-env"


def test_unreadable_password_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError) as info:
        load_settings()
    text = str(info.value)
    assert text.startswith("NOTIFIER_SMTP_PASSWORD_FILE=")
    assert "cannot read it" in text and "\n" not in text


def test_systemd_credentials_directory(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "smtp_password").write_text(SECRET)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_settings()
    assert s.smtp_password is not None and s.smtp_password.get_secret_value() == SECRET
    # an explicit password file wins over the credential
    other = tmp_path / "other"
    other.write_text("explicit-file")
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD_FILE", str(other))
    s = load_settings()
    assert s.smtp_password is not None and s.smtp_password.get_secret_value() == "explicit-file"


def test_credentials_directory_without_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert load_settings().smtp_password is None


def test_empty_password_file_means_no_password(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("\n")
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD_FILE", str(tmp_path / "pw"))
    assert load_settings().smtp_password is None


def test_secret_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD", SECRET)
    monkeypatch.setenv("NOTIFIER_SMTP_USERNAME", "12345@qq.com")
    s = load_settings()
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump()), str(s.redacted())):
        assert SECRET not in text
    assert s.redacted()["smtp_password"] == "**********"
    assert s.smtp_password is not None and s.smtp_password.get_secret_value() == SECRET


def test_secret_from_a_file_never_shown(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text(SECRET)
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD_FILE", str(tmp_path / "pw"))
    s = load_settings()
    assert SECRET not in repr(s) and SECRET not in s.model_dump_json()


# -- recipients ------------------------------------------------------------------------------


def test_mail_to_comma_separated_and_allowed_is_the_union(monkeypatch):
    monkeypatch.setenv("NOTIFIER_MAIL_TO", " Trader@Example.com ,risk@example.com,, ")
    monkeypatch.setenv("NOTIFIER_ALLOWED_RECIPIENTS", "ops@example.com,risk@example.com")
    s = load_settings()
    assert s.mail_to == ["trader@example.com", "risk@example.com"]
    assert s.allowed_recipients == ["ops@example.com", "risk@example.com"]
    assert s.allowed == frozenset({"trader@example.com", "risk@example.com", "ops@example.com"})


def test_mail_from_with_a_display_name(monkeypatch):
    monkeypatch.setenv("NOTIFIER_MAIL_FROM", "量化提醒 <alerts@example.com>")
    assert load_settings().mail_from == "量化提醒 <alerts@example.com>"
    monkeypatch.setenv("NOTIFIER_MAIL_FROM", "alerts@example.com")
    assert load_settings().mail_from == "alerts@example.com"


def test_require_mail():
    with pytest.raises(SettingsError, match=r"^NOTIFIER_MAIL_FROM: not set"):
        load_settings().require_mail()
    with pytest.raises(SettingsError, match=r"^NOTIFIER_MAIL_TO: not set"):
        load_settings(mail_from="a@example.com").require_mail()
    with pytest.raises(SettingsError, match=r"^NOTIFIER_SMTP_PASSWORD: not set"):
        load_settings(
            mail_from="a@example.com", mail_to="b@example.com", smtp_username="u"
        ).require_mail()
    load_settings(mail_from="a@example.com", mail_to="b@example.com").require_mail()


# -- errors: one line naming the setting ------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "start", "words"),
    [
        ({"smtp_port": "abc"}, "NOTIFIER_SMTP_PORT: ", "'abc'"),
        ({"smtp_port": "70000"}, "NOTIFIER_SMTP_PORT: ", "65535"),
        ({"smtp_tls": "tls"}, "NOTIFIER_SMTP_TLS: ", "'ssl', 'starttls' or 'none'"),
        ({"mail_to": "a@example.com,bad"}, "NOTIFIER_MAIL_TO: ", "'bad' is not a plain address"),
        ({"allowed_recipients": "x@"}, "NOTIFIER_ALLOWED_RECIPIENTS: ", "'x@'"),
        ({"mail_from": "nope"}, "NOTIFIER_MAIL_FROM: ", "Display Name <name@example.com>"),
        ({"concurrency": "0"}, "NOTIFIER_CONCURRENCY: ", "greater than or equal to 1"),
        ({"smtp_validate_certs": "maybe"}, "NOTIFIER_SMTP_VALIDATE_CERTS: ", "boolean"),
        ({"key_prefix": "has space"}, "NOTIFIER_KEY_PREFIX: ", "pattern"),
        ({"latency_target_s": "-1"}, "NOTIFIER_LATENCY_TARGET_S: ", "greater than 0"),
        ({"log_level": "LOUD"}, "NOTIFIER_LOG_LEVEL: ", "'INFO'"),
        ({"retry_base_s": "10", "retry_max_s": "1"}, "NOTIFIER_RETRY_MAX_S must be at least", ""),
    ],
)
def test_errors_are_one_line_naming_the_setting(env, start, words):
    text = error(**env)
    assert text.startswith(start)
    assert words in text


def test_error_never_echoes_a_password():
    # a password is never echoed back even when it is what is wrong
    with pytest.raises(SettingsError) as info:
        load_settings(smtp_password=["not", "a", SECRET])
    assert str(info.value).startswith("NOTIFIER_SMTP_PASSWORD: ")
    assert SECRET not in str(info.value)


def test_settings_class_is_what_load_settings_builds():
    assert isinstance(load_settings(concurrency=3), Settings)
    assert load_settings(concurrency=3).concurrency == 3


def test_a_failover_account_never_borrows_the_primary_credential(tmp_path, monkeypatch):
    """Under systemd each account has its own credential (smtp_password_<name>); a backup
    account without one is an error, not a login with the primary's authorization code."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "smtp_password").write_text("primary-code-16ch")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    accounts = tmp_path / "accounts.toml"
    accounts.write_text('[[account]]\nname = "backup"\nprovider = "163"\nusername = "me@163.com"\n')
    base = {"smtp_provider": "qq", "smtp_username": "1@qq.com", "mail_to": "t@example.com",
            "accounts_file": str(accounts)}  # fmt: skip
    with pytest.raises(SettingsError, match="account 'backup': no password"):
        load_settings(**base)
    (creds / "smtp_password_backup").write_text("backup-code-16ch")
    primary, backup = load_settings(**base).accounts()
    assert primary.smtp_password.get_secret_value() == "primary-code-16ch"
    assert backup.smtp_password.get_secret_value() == "backup-code-16ch"
