"""Secrets: the SMTP password (and a password in the Redis URL) never shows.

Not in any log line of a worker that fails to log in and then succeeds, not in the output of
``notifier check``, ``send-test``, ``stats`` or ``dead list``, not in an exception's text or
traceback, not in ``repr``/``str``/JSON dumps of the settings, and not in anything the worker
writes to Redis. Besides the password itself the tests look for the forms a careless log
line would show it in: base64 (AUTH LOGIN), the AUTH PLAIN blob, URL-quoted and hex.
"""

from __future__ import annotations

import base64
import json
import signal
import traceback
import urllib.parse
from typing import Any

import pytest
import redis

from tests.support.helpers import (
    QQ_535,
    clean_env,
    event,
    log_of,
    push,
    rclient,
    run_cli,
    settings_from,
    wait_delivered,
    wait_for_log,
)
from worker.errors import ConfigurationError, SendError
from worker.mailer import Connection, classify
from worker.settings import Settings, SettingsError, load_settings

PASSWORD = "S3cr3t-AuthCode!"
USER = "12345@qq.com"
REDIS_PASSWORD = "R3dis-Pa55!word"
MAIL_FROM = "alerts@example.com"
MAIL_TO = "trader@example.com"


def forms(secret: str, user: str = USER) -> list[str]:
    """The secret and the encodings it travels in on the wire."""
    raw = secret.encode()
    return [
        secret,
        base64.b64encode(raw).decode(),  # AUTH LOGIN
        base64.b64encode(b"\0" + user.encode() + b"\0" + raw).decode(),  # AUTH PLAIN
        urllib.parse.quote(secret, safe=""),
        raw.hex(),
    ]


def assert_hidden(text: str, where: str, secret: str = PASSWORD) -> None:
    for form in forms(secret):
        assert form not in text, f"{where} shows the secret (as {form!r})"


def redis_dump(r: redis.Redis) -> str:
    """Every key and value in the database, as text."""
    out = []
    for key in r.scan_iter():
        kind = r.type(key).decode()
        if kind == "string":
            value: Any = r.get(key)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "hash":
            value = r.hgetall(key)
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = r.smembers(key)
        else:
            value = kind
        out.append(f"{key!r} {value!r}")
    return "\n".join(out)


def _settings(**values: Any) -> Settings:
    base: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": 2525,
        "smtp_tls": "none",
        "smtp_username": USER,
        "smtp_password": PASSWORD,
        "mail_from": MAIL_FROM,
        "mail_to": MAIL_TO,
        "redis_url": "redis://127.0.0.1:1/0",
    }
    return settings_from(**(base | values))


# -- a real worker and the commands --------------------------------------------------------


@pytest.mark.slow
def test_worker_and_commands_never_show_the_smtp_password(
    worker_proc, worker_env, smtp_factory, redis_url, tmp_path
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    smtp.auth_fail(535, QQ_535)
    r = rclient(redis_url)
    env = worker_env(redis_url, smtp, smtp_provider="qq", log_level="DEBUG",
                     retry_base_s=0.05, retry_max_s=0.5)  # fmt: skip
    assert env["NOTIFIER_SMTP_PASSWORD"] == PASSWORD
    password_file = tmp_path / "smtp_password"
    password_file.write_text(PASSWORD + "\n")
    file_env = env | {
        "NOTIFIER_SMTP_PASSWORD": "",
        "NOTIFIER_SMTP_PASSWORD_FILE": str(password_file),
    }
    file_env.pop("NOTIFIER_SMTP_PASSWORD")
    wrong_env = env | {"NOTIFIER_SMTP_PASSWORD": PASSWORD + "-wrong"}

    push(r, event("sec-1"), event("sec-2", body="正文"))
    worker = worker_proc(env)
    wait_for_log(worker, "授权码")  # the login failed, loudly
    outputs = {"check (login refused)": run_cli(worker_proc, env, "check")}
    assert outputs["check (login refused)"][0] == 1

    smtp.auth_fail(None)
    wait_delivered(smtp, ["sec-1", "sec-2"], 20)
    outputs["check"] = run_cli(worker_proc, env, "check")
    outputs["check (password file)"] = run_cli(worker_proc, file_env, "check")
    outputs["check (wrong password)"] = run_cli(worker_proc, wrong_env, "check")
    outputs["send-test"] = run_cli(worker_proc, env, "send-test", "--to", MAIL_TO)
    outputs["stats"] = run_cli(worker_proc, env, "stats")
    outputs["stats --json"] = run_cli(worker_proc, env, "stats", "--json")
    outputs["dead list"] = run_cli(worker_proc, env, "dead", "list")
    assert outputs["check"][0] == 0, outputs["check"][1]
    assert outputs["check (password file)"][0] == 0, outputs["check (password file)"][1]
    assert outputs["check (wrong password)"][0] == 1
    assert outputs["send-test"][0] == 0, outputs["send-test"][1]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0

    log = log_of(worker)
    assert "works again" in log and "sent sec-1 " in log, log
    assert_hidden(log, "the worker log")
    for line in log.splitlines():
        assert_hidden(line, f"log line {line[:80]!r}")
    for name, (_, out) in outputs.items():
        assert_hidden(out, f"`notifier {name}`")
    assert_hidden(redis_dump(r), "Redis")
    for m in smtp.messages:
        assert_hidden(m.data.decode("utf-8", "replace"), "a sent mail")


def test_bad_settings_with_a_password_never_show_it(
    worker_proc, worker_env, smtp_server, redis_url
):
    env = worker_env(redis_url, smtp_server, smtp_username=USER, smtp_password=PASSWORD,
                     retry_base_s=10, retry_max_s=1)  # fmt: skip
    rc, out = run_cli(worker_proc, env, "run")
    assert rc == 2, out
    assert "NOTIFIER_RETRY_MAX_S" in out
    assert_hidden(out, "`notifier run` with bad settings")
    rc, out = run_cli(worker_proc, env | {"NOTIFIER_SMTP_PORT": "smtp"}, "check")
    assert rc == 2 and "NOTIFIER_SMTP_PORT" in out, out
    assert_hidden(out, "`notifier check` with a bad port")


def test_settings_errors_never_show_the_password(monkeypatch, tmp_path):
    clean_env(monkeypatch, tmp_path)  # no NOTIFIER_* variable, no .env here
    monkeypatch.setenv("NOTIFIER_SMTP_USERNAME", USER)
    monkeypatch.setenv("NOTIFIER_SMTP_PASSWORD", PASSWORD)
    cases = {
        "cross-field": {"NOTIFIER_RETRY_BASE_S": "10", "NOTIFIER_RETRY_MAX_S": "1"},
        "bad port": {"NOTIFIER_SMTP_PORT": "not-a-port"},
        "bad mail_from": {"NOTIFIER_MAIL_FROM": "not an address"},
        "bad provider": {"NOTIFIER_SMTP_PROVIDER": "nope"},
    }
    for case, values in cases.items():
        with monkeypatch.context() as m:
            for k, v in values.items():
                m.setenv(k, v)
            with pytest.raises(SettingsError) as info:
                load_settings()
            text = "".join(traceback.format_exception(info.value))
            assert_hidden(str(info.value), f"SettingsError ({case})")
            assert_hidden(repr(info.value), f"repr(SettingsError) ({case})")
            assert_hidden(text, f"the traceback of SettingsError ({case})")


def test_settings_repr_str_and_dumps_never_show_the_password():
    s = _settings()
    assert s.smtp_password is not None and s.smtp_password.get_secret_value() == PASSWORD
    shown = {
        "repr": repr(s),
        "str": str(s),
        "model_dump_json": s.model_dump_json(),
        "model_dump(mode=json)": json.dumps(s.model_dump(mode="json")),
        "model_dump": repr(s.model_dump()),
        "redacted": json.dumps(s.redacted(), ensure_ascii=False),
        "repr(secret)": repr(s.smtp_password),
        "str(secret)": str(s.smtp_password),
        "format": f"{s}",
    }
    for where, text in shown.items():
        assert_hidden(text, f"Settings {where}")
    assert s.redacted()["smtp_password"] and s.redacted()["smtp_password"] != PASSWORD


async def test_login_exceptions_never_show_the_password(smtp_factory, smtp_server):
    auth = smtp_factory(auth={USER: PASSWORD + "-the-real-one"})
    cases = [
        ("login refused", _settings(smtp_port=auth.port, smtp_provider="qq")),
        ("no AUTH offered", _settings(smtp_port=smtp_server.port)),
        ("nothing listening", _settings(smtp_port=1)),
    ]
    for where, settings in cases:
        conn = Connection(settings, None)
        with pytest.raises(SendError) as info:
            await conn.open()
        await conn.close()
        err = info.value
        texts = [str(err), repr(err), "".join(traceback.format_exception(err))]
        cause: BaseException | None = err
        while cause is not None:  # the whole chain, even where it is suppressed
            texts += [str(cause), repr(cause), repr(cause.args)]
            cause = cause.__cause__ or cause.__context__
        for text in texts:
            assert_hidden(text, f"the exception ({where})")
    assert isinstance(classify(Exception(f"x {USER}")), SendError)
    assert isinstance(ConfigurationError("535 x"), SendError)


# -- a password in the Redis URL -----------------------------------------------------------


@pytest.fixture
def redis_with_password(redis_factory):
    server = redis_factory()
    client = redis.Redis.from_url(server.url)
    client.config_set("requirepass", REDIS_PASSWORD)
    client.close()
    return (
        server,
        f"redis://:{urllib.parse.quote(REDIS_PASSWORD, safe='')}@127.0.0.1:{server.port}/0",
    )


def test_redis_password_in_the_url_is_never_shown(
    worker_proc, worker_env, smtp_server, redis_with_password
):
    server, url = redis_with_password
    r = redis.Redis.from_url(url)
    env = worker_env(url, smtp_server, log_level="DEBUG")
    push(r, event("rp-1"))
    worker = worker_proc(env)
    wait_delivered(smtp_server, ["rp-1"], 15)
    outputs = {
        "check": run_cli(worker_proc, env, "check"),
        "stats": run_cli(worker_proc, env, "stats"),
        "dead list": run_cli(worker_proc, env, "dead", "list"),
    }
    assert outputs["check"][0] == 0, outputs["check"][1]
    r.close()
    server.stop()  # now every command reports Redis unreachable, naming the URL's host
    wait_for_log(worker, "Redis unreachable")
    outputs["check (Redis down)"] = run_cli(worker_proc, env, "check")
    outputs["stats (Redis down)"] = run_cli(worker_proc, env, "stats")
    outputs["push (Redis down)"] = run_cli(worker_proc, env, "push", "hello")
    assert outputs["stats (Redis down)"][0] != 0
    for name, (_, out) in outputs.items():
        assert_hidden(out, f"`notifier {name}`", REDIS_PASSWORD)
    assert_hidden(log_of(worker), "the worker log", REDIS_PASSWORD)


def test_redis_password_in_the_url_is_not_in_the_settings_repr():
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:6390/0"
    s = _settings(redis_url=url)
    for where, text in {
        "repr": repr(s),
        "redacted": json.dumps(s.redacted()),
    }.items():
        assert_hidden(text, f"Settings {where}", REDIS_PASSWORD)
