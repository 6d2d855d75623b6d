"""The IM channels through the delivery core (issue 11): a channels file and a routes file,
real channel classes (built by the registry) talking HTTPS to local service emulators, and
real SMTP. Fan-out with per-channel guarantees; e-mail throttled -> the fallback channel and
back; a 5xx storm on one channel while the other succeeds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.helpers import PREFIX, QQ_THROTTLE, delivered, mail_ids
from worker.devtools.emulators.webhook import WebhookEmulator
from worker.devtools.emulators.wecom import WeComEmulator

KEY = "693a91f6-7xxx-4bc4-97a0-0ec2sifa5aaa"


@pytest.fixture
def wecom(tls_ca):
    server = WeComEmulator(key=KEY, ssl_context=tls_ca.server_context()).start()
    yield server
    server.stop()


@pytest.fixture
def hook(tls_ca):
    server = WebhookEmulator(ssl_context=tls_ca.server_context()).start()
    yield server
    server.stop()


def _files(tmp_path: Path, tls_ca, wecom, hook, routes: str) -> dict[str, Path]:
    channels = tmp_path / "channels.toml"
    channels.write_text(
        "[[channel]]\n"
        'name = "desk"\ntype = "wecom"\n'
        f'url = "{wecom.webhook_url}"\nca_file = "{tls_ca.ca_file}"\n'
        'mention_users = ["ZhangSan"]\n\n'
        "[[channel]]\n"
        'name = "hook"\ntype = "webhook"\n'
        f'url = "{hook.url}"\nca_file = "{tls_ca.ca_file}"\n',
        encoding="utf-8",
    )
    routes_file = tmp_path / "routes.toml"
    routes_file.write_text(routes, encoding="utf-8")
    return {"channels_file": channels, "routes_file": routes_file}


async def test_a_critical_alert_fans_out_and_each_channel_is_tracked_on_its_own(
    make_rig, smtp_server, tmp_path, tls_ca, wecom, hook
):
    routes = '[[route]]\nseverity = "critical"\nchannels = ["email", "desk"]\n'
    rig = make_rig(
        smtp_server,
        retry_base_s=0.01,
        retry_max_s=0.02,
        **_files(tmp_path, tls_ca, wecom, hook, routes),
    )
    wecom.fail_next(502, count=3)  # a 5xx storm on the IM channel
    await rig.deliver(rig.event("c1", subject="止损触发 600519", severity="critical"))
    for _ in range(3):
        await rig.run_retries()
    assert delivered(smtp_server) == {"c1": 1}  # e-mail once, never again for desk's retries
    ((msg),) = wecom.messages
    assert "止损触发 600519" in msg.content and msg.mentioned == ("ZhangSan",)
    assert await rig.leftovers() == {} and await rig.dead() == []
    marks = await rig.redis.exists(f"{PREFIX}:sent:c1", f"{PREFIX}:sent:c1@desk")
    assert marks == 2
    # info events follow the default: e-mail only
    await rig.deliver(rig.event("i1"))
    assert set(delivered(smtp_server)) == {"c1", "i1"} and len(wecom.messages) == 1


async def test_e_mail_throttled_goes_to_the_fallback_channel_and_comes_back(
    make_rig, smtp_server, tmp_path, tls_ca, wecom, hook
):
    routes = '[default]\nfallback = ["hook"]\n'
    rig = make_rig(
        smtp_server, throttle_base_s=0.3, **_files(tmp_path, tls_ca, wecom, hook, routes)
    )
    smtp_server.fail_next("MAIL", 550, QQ_THROTTLE)
    started = time.monotonic()
    await rig.deliver(rig.event("t1", subject="开仓 IF2412"))
    took = time.monotonic() - started
    assert [p["id"] for p in hook.received] == ["t1"] and delivered(smtp_server) == {}
    assert hook.received[0]["subject"] == "开仓 IF2412"
    assert took < 1.0
    assert rig.outcomes[-1].account == "hook"
    await rig.deliver(rig.event("t2"))  # the account cools down: still the fallback
    assert [p["id"] for p in hook.received] == ["t1", "t2"]
    time.sleep(0.7)  # the cool-down (0.3 s, jittered below 0.6 s) is over
    await rig.deliver(rig.event("t3"))
    assert set(mail_ids(smtp_server.messages)) == {"t3"}  # back on e-mail by itself
    assert len(hook.received) == 2
    assert await rig.leftovers() == {} and await rig.dead() == []


async def test_a_channel_that_refuses_for_good_dead_letters_only_its_delivery(
    make_rig, smtp_server, tmp_path, tls_ca, wecom, hook
):
    routes = '[default]\nchannels = ["email", "hook"]\n'
    rig = make_rig(smtp_server, **_files(tmp_path, tls_ca, wecom, hook, routes))
    hook.fail_next(422, {"error": "unprocessable"})
    await rig.deliver(rig.event("p1"))
    assert delivered(smtp_server) == {"p1": 1}
    (letter,) = await rig.dead()
    assert (letter["id"], letter["channel"], letter["reason"]) == ("p1", "hook", "permanent")
    assert KEY not in str(letter)


def test_a_worker_opens_its_channels_connections_at_start(
    worker_proc, worker_env, smtp_server, redis_url, tmp_path, tls_ca, wecom, hook
):
    files = _files(tmp_path, tls_ca, wecom, hook, '[default]\nchannels = ["email", "hook"]\n')
    env = worker_env(redis_url, smtp_server, **{k: str(v) for k, v in files.items()})
    proc = worker_proc(env)
    deadline = time.monotonic() + 10
    while (hook.warmups < 1 or wecom.warmups < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None
    assert hook.warmups == 1 and wecom.warmups == 1
    assert hook.requests == [] and wecom.requests == []  # nothing was sent to warm them
