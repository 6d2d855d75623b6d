"""The `notifier` command and the IM channels (issue 11): `check` probes every channel of the
channels file, `send-test --channel NAME` sends through one, `stats` shows each channel's state
and figures, `dead list`/`dead replay` handle a channel's dead letter. The command runs as a
real subprocess; the services are their HTTPS emulators (worker/devtools/emulators) and Redis
is a real redis-server."""

from __future__ import annotations

import json
import re
import time
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


@pytest.fixture(scope="module")
def servers(tls_ca):
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


@pytest.fixture
def services(servers):
    """The emulators as they started: nothing recorded, no faults."""
    for server in servers.values():
        if isinstance(server, WebhookEmulator):  # (it has no reset of its own)
            server.received.clear()
            server.requests.clear()
            server.clear_faults()
        else:
            server.reset()
    return servers


def channels_file(
    tmp_path: Path, tls_ca, services, *, timeout_s: float = 2.0, **override: str
) -> Path:
    """Every kind of channel, with its secrets written in the file."""
    ca = f'ca_file = "{tls_ca.ca_file}"\ntimeout_s = {timeout_s}\n'
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


def test_check_probes_the_channels_at_once(
    notifier, redis_url, smtp_server, worker_env, tmp_path, tls_ca, services
):
    """Two services that do not answer cost their timeout once, not once each."""
    path = channels_file(tmp_path, tls_ca, services, timeout_s=2.5)
    services["tg"].stall_next(6.0)
    services["feishu"].stall_next(6.0)
    started = time.monotonic()
    res = notifier("check", env=worker_env(redis_url, smtp_server, channels_file=path))
    took = time.monotonic() - started
    assert res.code == 1, res
    got = lines_of(res.out, "channel")
    assert list(got) == ["desk", "lark", "tg", "ops", "hook"]  # the file's order
    assert got["tg"] == "FAIL (transient): Telegram (127.0.0.1) did not answer in time", res
    assert got["lark"] == "FAIL (transient): Feishu (127.0.0.1) did not answer in time", res
    assert took < 4.5, took  # one after the other: more than 5 s


# -- send-test --channel -------------------------------------------------------------------------


def test_send_test_through_a_channel(notifier, redis_url, tmp_path, tls_ca, services):
    env = {"NOTIFIER_REDIS_URL": redis_url}
    env["NOTIFIER_CHANNELS_FILE"] = str(channels_file(tmp_path, tls_ca, services))
    res = notifier("send-test", "--channel", "desk", env=env)  # no SMTP settings needed
    assert res.code == 0, res
    assert_no_secret(res)
    assert "sent through channel desk (dingtalk 127.0.0.1)" in res.out, res
    assert re.search(r"^  send +\d+\.\d ms", res.out, re.M), res
    assert re.search(r"^  total +\d+\.\d ms", res.out, re.M), res
    assert services["ding"].accepted == 1
    (payload,) = [r.json for r in services["ding"].requests]
    text = json.dumps(payload, ensure_ascii=False)
    assert "notifier send-test" in text and "告警" in text  # the robot's keyword
    res = notifier("send-test", "--channel", "tg", env=env)
    assert res.code == 0, res
    (msg,) = services["tg"].messages
    assert "notifier send-test" in msg.text and "提醒通道已经打通" in msg.text


def test_send_test_failure_and_unknown_channel_are_one_line(
    notifier, redis_url, tmp_path, tls_ca, services
):
    env = {"NOTIFIER_REDIS_URL": redis_url}
    env["NOTIFIER_CHANNELS_FILE"] = str(channels_file(tmp_path, tls_ca, services))
    services["wecom"].fail_next(403)
    res = notifier("send-test", "--channel", "ops", env=env)
    assert res.code == 1, res
    assert_no_secret(res)
    (line,) = (res.out + res.err).strip().splitlines()
    assert line.startswith("send-test FAIL (configuration): ") and "403" in line, res
    res = notifier("send-test", "--channel", "nosuch", env=env)
    assert res.code == 2, res
    assert res.out == "" and res.err_lines == [
        "notifier send-test: no channel 'nosuch'; known: email, desk, lark, tg, ops, hook"
    ], res
    res = notifier("send-test", "--channel", "tg", "--to", "a@example.com", env=env)
    assert res.code == 2 and res.err_lines == [
        "notifier send-test: --to is for e-mail; channel tg sends to its own group or chat"
    ], res
    res = notifier("send-test", "--channel", "email", env=env)  # e-mail still wants --to
    assert res.code == 2 and len(res.err_lines) == 1 and "--to" in res.err, res


# -- stats ---------------------------------------------------------------------------------------


async def test_stats_shows_each_channel_state_and_figures(
    notifier, make_rig, smtp_server, redis_url, tmp_path, tls_ca, services
):
    routes = tmp_path / "routes.toml"
    routes.write_text('[default]\nchannels = ["email", "ops", "hook"]\n', encoding="utf-8")
    rig = make_rig(
        smtp_server,
        retry_base_s=0.01,
        retry_max_s=0.02,
        channels_file=channels_file(tmp_path, tls_ca, services),
        routes_file=routes,
    )
    await rig.deliver(rig.event("e1"), rig.event("e2"))
    services["hook"].fail_next(500)
    await rig.deliver(rig.event("e3"))
    await rig.run_retries()  # e3's hook delivery: retried once, then delivered
    services["hook"].fail_next(422)
    services["wecom"].error_next(45009)  # WeCom: too many messages -> ops throttled
    await rig.deliver(rig.event("e4"))
    (letter,) = await rig.dead()
    assert letter["channel"] == "hook"
    # the worker's heartbeat, as its keeper writes it: every channel's describe()
    await rig.queue.heartbeat(
        {"accounts": {c.name: c.describe() for c in rig.deliverer.by_name.values()}}
    )
    env = {"NOTIFIER_REDIS_URL": redis_url}
    res = notifier("stats", env=env)
    assert res.code == 0, res
    assert "{" not in res.out and "}" not in res.out, res.out
    ms = r"p50 \d+\.\d ms, p95 \d+\.\d ms"
    assert re.search(rf"^account primary \(email\): ok; delivered 4; {ms}$", res.out, re.M), res
    assert re.search(
        rf"^channel hook \(webhook\): ok; delivered 3, retried 1, dead 1; {ms}$", res.out, re.M
    ), res
    assert re.search(
        rf"^channel ops \(wecom\): throttled; delivered 3, retried 1; {ms}; why: 45009 WeCom: ",
        res.out,
        re.M,
    ), res
    assert re.search(r"^channel lark \(feishu\): ok; nothing in the window$", res.out, re.M), res
    st = json.loads(notifier("stats", "--json", env=env).out)["channels"]
    hook = st["hook"]
    assert (hook["kind"], hook["state"], hook["delivered"], hook["retried"], hook["dead"]) == (
        "webhook",
        "ok",
        3,
        1,
        1,
    )
    assert 0 < hook["p50_s"] <= hook["p95_s"] < 5
    assert (st["ops"]["state"], st["ops"]["retried"]) == ("throttled", 1)
    assert "45009" in st["ops"]["reason"]
    assert st["primary"]["delivered"] == 4 and st["primary"]["kind"] == "email"


# -- dead letters --------------------------------------------------------------------------------


async def test_a_channels_dead_letter_is_listed_with_its_channel_and_replays_only_that_copy(
    notifier, make_rig, smtp_server, redis_url, tmp_path, tls_ca, services
):
    routes = tmp_path / "routes.toml"
    routes.write_text('[default]\nchannels = ["email", "hook"]\n', encoding="utf-8")
    rig = make_rig(
        smtp_server, channels_file=channels_file(tmp_path, tls_ca, services), routes_file=routes
    )
    services["hook"].fail_next(422, {"error": "unprocessable"})
    await rig.deliver(rig.event("p1", subject="止损触发 600519"))
    assert [p["id"] for p in services["hook"].received] == []
    assert len(smtp_server.messages) == 1
    env = {"NOTIFIER_REDIS_URL": redis_url}
    res = notifier("dead", "list", env=env)
    assert res.code == 0, res
    assert re.search(r"  p1  channel hook  \[permanent\] .*422 ", res.out), res
    (row,) = map(json.loads, notifier("dead", "list", "--json", env=env).out.splitlines())
    assert row["channel"] == "hook"
    res = notifier("dead", "replay", "--id", "p1", env=env)
    assert (res.code, res.out) == (0, "replayed 1 event(s)\n"), res
    (queued,) = [json.loads(x) for x in await rig.redis.lrange("notifier:queue", 0, -1)]
    assert queued["_meta"] == {"replayed": True, "channel": "hook"}
    assert queued["subject"] == "止损触发 600519"
    await rig.run_queue()
    assert [p["id"] for p in services["hook"].received] == ["p1"]
    assert len(smtp_server.messages) == 1  # e-mail's copy was delivered: never again
    assert await rig.leftovers() == {} and await rig.dead() == []
