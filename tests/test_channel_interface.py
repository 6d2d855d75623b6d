"""Adding a channel takes one module and its settings model (tests/support/list_channel.py):
the delivery core fails over to it, renders the neutral content for it, classifies what it
raises, and settles each outcome like e-mail's (issue 10)."""

from __future__ import annotations

import json

import pytest

from tests.support.helpers import PREFIX, QQ_THROTTLE, delivered
from tests.support.list_channel import ListChannel, ListChannelSettings
from worker.errors import ConfigurationError, PermanentError, ThrottledError, TransientError
from worker.records import DeliveryRecord


@pytest.fixture
def desk() -> ListChannel:
    return ListChannel(ListChannelSettings(name="desk", max_bytes=256), priority=1)


async def test_a_throttled_mail_account_fails_over_to_the_new_channel(make_rig, smtp_server, desk):
    rig = make_rig(smtp_server, channels=[desk])
    smtp_server.fail_next("MAIL", 550, QQ_THROTTLE)
    event = rig.event(
        "c1", subject="止损触发 600519", strategy="ma_cross", data={"price": 1700.5, "side": "SELL"}
    )
    await rig.deliver(event)
    assert delivered(smtp_server) == {}
    ((recipients, text),) = desk.sent
    assert recipients == ["trader@example.com"]
    assert "止损触发 600519" in text and "price" in text and "1700.50" in text
    assert rig.outcomes[-1].status == "sent" and rig.outcomes[-1].account == "desk"
    (raw,) = await rig.redis.lrange(f"{PREFIX}:deliveries", 0, 0)
    record = DeliveryRecord.from_json(raw)
    assert (record.status, record.channel, record.mode) == ("sent", "desk", "list")
    assert rig.channels[0].state == "throttled" and desk.state == "ok"


async def test_the_new_channel_classifies_and_the_core_settles(make_rig, smtp_server, desk):
    rig = make_rig(smtp_server, channels=[desk])
    smtp_server.fail_next("MAIL", 550, QQ_THROTTLE)
    desk.failures = [PermanentError("400 bad request: chat not found")]
    await rig.deliver(rig.event("c2"))
    (letter,) = [json.loads(x) for x in await rig.redis.lrange(f"{PREFIX}:dead", 0, -1)]
    assert letter["reason"] == "permanent" and "chat not found" in letter["error"]


async def test_a_paused_or_throttled_new_channel_keeps_the_event(make_rig, smtp_server, desk):
    rig = make_rig(smtp_server, channels=[desk], throttle_base_s=1)
    smtp_server.fail_next("MAIL", 550, QQ_THROTTLE)
    desk.failures = [ConfigurationError("93000 invalid webhook key")]
    await rig.deliver(rig.event("c3"))
    assert desk.paused and "93000" in desk.reason
    out = rig.outcomes[-1]
    assert out.status == "retry" and out.attempts == 0  # throttled + paused: not an attempt
    assert await rig.dead() == []
    desk.failures = [ThrottledError("45009 too many requests")]
    assert desk.health.succeeded()  # the key was fixed
    rig.channels[0].health.succeeded()
    await rig.run_retries()
    assert set(delivered(smtp_server)) == {"c3"}  # back on e-mail


async def test_the_new_channel_gets_digests_within_its_size_limit(make_rig, tmp_path):
    desk = ListChannel(
        ListChannelSettings(name="desk", rate_per_minute=1, max_bytes=300), priority=0
    )
    routes = tmp_path / "routes.toml"
    routes.write_text('[default]\nchannels = ["desk"]\n')  # no e-mail at all
    rig = make_rig(None, channels=[desk], routes_file=routes)
    await rig.deliver(*(rig.event(f"d{i}", body="行情" * 40) for i in range(6)))
    assert len(desk.sent) == 1  # the first went at once; the rest wait for a digest
    groups = await rig.redis.zrange(f"{PREFIX}:digests", 0, -1)
    await rig.redis.zadd(f"{PREFIX}:digests", dict.fromkeys(groups, 0))
    desk.per_minute = 0
    assert await rig.run_digest()
    digest = desk.sent[-1][1]
    assert "[DIGEST] 5 alerts" in digest
    assert len(digest.encode()) <= 300


async def test_an_event_fans_out_to_each_channel_of_its_route_once(make_rig, smtp_server, tmp_path):
    """One delivery per (event, channel): the channel that succeeded is never sent again
    because the other failed; the failed one retries (and dead-letters) on its own."""
    desk = ListChannel(ListChannelSettings(name="desk"), priority=0)
    routes = tmp_path / "routes.toml"
    routes.write_text('[default]\nchannels = ["email", "desk"]\n')
    rig = make_rig(
        smtp_server, channels=[desk], routes_file=routes, retry_base_s=0.01, retry_max_s=0.02
    )
    desk.failures = [TransientError("HTTP 502 from the service", code=502)]
    await rig.deliver(rig.event("f1", subject="开仓 600519"))
    assert set(delivered(smtp_server)) == {"f1"}
    assert desk.sent == []
    retry = await rig.redis.zrange(f"{PREFIX}:retry", 0, -1)
    assert len(retry) == 1 and json.loads(retry[0])["_meta"]["channel"] == "desk"
    await rig.run_retries()
    assert len(desk.sent) == 1 and "开仓 600519" in desk.sent[0][1]
    assert delivered(smtp_server) == {"f1": 1}  # e-mail was not sent again
    assert await rig.redis.exists(f"{PREFIX}:sent:f1", f"{PREFIX}:sent:f1@desk") == 2
    # a producer's re-send of the same id is a no-op on both channels
    await rig.deliver(rig.event("f1", subject="开仓 600519"))
    assert delivered(smtp_server) == {"f1": 1} and len(desk.sent) == 1
    # a channel that refuses for good dead-letters only its own delivery
    desk.failures = [PermanentError("400 chat not found")]
    await rig.deliver(rig.event("f2"))
    assert set(delivered(smtp_server)) == {"f1", "f2"}
    (letter,) = await rig.dead()
    assert (letter["id"], letter["channel"], letter["reason"]) == ("f2", "desk", "permanent")
    assert await rig.leftovers() == {}
