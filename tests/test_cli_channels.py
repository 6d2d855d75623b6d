"""The `notifier` command and the IM channels (issue 11): `check` probes every channel of the
channels file, `send-test --channel NAME` sends through one, `stats` shows each channel's state
and figures, `dead list`/`dead replay` handle a channel's dead letter. The command runs as a
real subprocess; the services are their HTTPS emulators (worker/devtools/emulators) and Redis
is a real redis-server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import test_cli_edges as cli
from worker.devtools.emulators.dingtalk import DingTalkEmulator
from worker.devtools.emulators.feishu import FeishuEmulator
from worker.devtools.emulators.telegram import TelegramEmulator
from worker.devtools.emulators.webhook import WebhookEmulator
from worker.devtools.emulators.wecom import WeComEmulator

DING_TOKEN, DING_SECRET = "d1n9t0ken5ecret0a1b2c3", "SECd1n9s1gn5ecret77"
FEISHU_TOKEN, FEISHU_SECRET = "f3154u-70k3n-5ecret-99", "f3154u5ecretZZ"
TG_TOKEN, TG_CHAT = "123456789:AAEhBOweik9ai3o3Kx7Wq0aqSECRETtg", -1001234567890
WECOM_KEY = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"
HOOK_SECRET, HOOK_AUTH = "wh5ecret-signing-key", "Bearer h34der-5ecret"
SECRETS = (DING_TOKEN, DING_SECRET, FEISHU_TOKEN, FEISHU_SECRET, TG_TOKEN, WECOM_KEY)
SECRETS += (HOOK_SECRET, HOOK_AUTH, TG_TOKEN.split(":", 1)[1])


# the subprocess runner of the CLI tests (an empty working directory, no .env)
cwd, notifier, Result = cli.cwd, cli.notifier, cli.Result


def assert_no_secret(res: Result) -> None:
    for secret in SECRETS:
        assert secret not in res.out + res.err, (secret, res)


@pytest.fixture
def services(tls_ca):
    """One emulator of each service, over HTTPS with the test CA."""
    ctx = tls_ca.server_context
    made = {
        "ding": DingTalkEmulator(
            access_token=DING_TOKEN, secret=DING_SECRET, keywords=["告警"], ssl_context=ctx()
        ),
        "feishu": FeishuEmulator(token=FEISHU_TOKEN, secret=FEISHU_SECRET, ssl_context=ctx()),
        "tg": TelegramEmulator(token=TG_TOKEN, chats=[TG_CHAT], ssl_context=ctx()),
        "wecom": WeComEmulator(key=WECOM_KEY, ssl_context=ctx()),
        "hook": WebhookEmulator(
            secret=HOOK_SECRET, headers={"Authorization": HOOK_AUTH}, ssl_context=ctx()
        ),
    }
    for server in made.values():
        server.start()
    yield made
    for server in made.values():
        server.stop()


def channels_file(tmp_path: Path, tls_ca, services, **override: str) -> Path:
    """Every kind of channel, with its secrets written in the file."""
    ca = f'ca_file = "{tls_ca.ca_file}"\ntimeout_s = 2.0\n'
    tables = {
        "desk": (
            'type = "dingtalk"\n'
            f'url = "{services["ding"].webhook_url}"\nsecret = "{DING_SECRET}"\n'
            'keywords = ["告警"]\n'
        ),
        "lark": (
            f'type = "feishu"\nurl = "{services["feishu"].hook_url}"\nsecret = "{FEISHU_SECRET}"\n'
        ),
        "tg": (
            f'type = "telegram"\ntoken = "{TG_TOKEN}"\nchat_id = {TG_CHAT}\n'
            f'api_base = "{services["tg"].base_url}"\n'
        ),
        "ops": f'type = "wecom"\nurl = "{services["wecom"].webhook_url}"\n',
        "hook": (
            f'type = "webhook"\nurl = "{services["hook"].url}"\nsecret = "{HOOK_SECRET}"\n'
            f'headers = {{ Authorization = "{HOOK_AUTH}" }}\n'
        ),
    }
    tables.update(override)
    path = tmp_path / "channels.toml"
    path.write_text(
        "".join(f'[[channel]]\nname = "{name}"\n{body}{ca}\n' for name, body in tables.items()),
        encoding="utf-8",
    )
    return path


def lines_of(out: str, prefix: str) -> dict[str, str]:
    """`channel NAME   rest` lines: NAME -> rest."""
    found = re.findall(rf"^{prefix} (\S+) +(.*)$", out, re.M)
    return dict(found)


# -- check -------------------------------------------------------------------------------------


def test_check_probes_every_channel_and_shows_no_secret(
    notifier, redis_url, smtp_server, worker_env, tmp_path, tls_ca, services
):
    path = channels_file(tmp_path, tls_ca, services)
    res = notifier("check", env=worker_env(redis_url, smtp_server, channels_file=path))
    assert res.code == 0, res
    assert_no_secret(res)
    got = lines_of(res.out, "channel")
    assert got["desk"] == ("ok: dingtalk 127.0.0.1, signed, keywords 告警, limit 20/min"), res
    assert got["lark"].startswith("ok: feishu 127.0.0.1, signed, limit "), res
    assert got["tg"].startswith(f"ok: telegram 127.0.0.1, chat {TG_CHAT}, limit "), res
    assert got["ops"] == "ok: wecom 127.0.0.1, limit 20/min", res
    assert got["hook"] == "ok: webhook 127.0.0.1, signed, headers Authorization, no rate limit"
    # Telegram's probe asked getMe and getChat; Feishu's a signed request that posts nothing
    assert [r.path.rsplit("/", 1)[1] for r in services["tg"].requests] == ["getMe", "getChat"]
    assert services["tg"].messages == [] and services["feishu"].messages == []
    assert services["ding"].accepted == 0 and services["hook"].received == []


def test_check_fails_a_channel_with_one_line_and_no_secret(
    notifier, redis_url, smtp_server, worker_env, tmp_path, tls_ca, services
):
    wrong = {
        "lark": (
            f'type = "feishu"\nurl = "{services["feishu"].hook_url}"\nsecret = "{DING_SECRET}"\n'
        ),
        "tg": (
            f'type = "telegram"\ntoken = "{TG_TOKEN}"\nchat_id = -1009999999999\n'
            f'api_base = "{services["tg"].base_url}"\n'
        ),
    }
    path = channels_file(tmp_path, tls_ca, services, **wrong)
    res = notifier("check", env=worker_env(redis_url, smtp_server, channels_file=path))
    assert res.code == 1, res
    assert_no_secret(res)
    got = lines_of(res.out, "channel")
    assert got["lark"].startswith("FAIL (configuration): "), res
    assert "sign" in got["lark"].lower(), res
    assert got["tg"].startswith("FAIL (configuration): "), res
    assert "chat" in got["tg"], res
    assert got["desk"].startswith("ok: ") and got["hook"].startswith("ok: "), res
    assert res.out.count("\n") == len(res.out.splitlines())  # one line each
    assert "Traceback" not in res.err
