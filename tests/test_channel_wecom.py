"""The WeCom group robot channel (worker/channels/wecom.py) against the local robot
(worker/devtools/emulators/wecom.py) over real HTTPS: the request as WeCom documents it,
markdown within 4096 bytes and text within 2048 (Chinese exact, cut with a marker), @-mentions
for critical alerts only, every errcode classified, the 20-a-minute limit, keep-alive, a drop
and a stall, and never the key in a message or a repr."""

from __future__ import annotations

import json
import re
import time

import pytest
from pydantic import ValidationError

from producer.event import parse_event
from tests.support.helpers import FakeClock
from worker.channels.registry import build_channel, kind_of
from worker.channels.wecom import (
    DEFAULT_RATE_PER_MINUTE,
    MARKDOWN_MAX_BYTES,
    TEXT_MAX_BYTES,
    WeComChannel,
    WeComSettings,
)
from worker.content import (
    Alert,
    as_markdown,
    as_text,
    build_alert,
    build_digest,
    truncated_marker,
)
from worker.devtools.emulators.wecom import PATH, WeComEmulator
from worker.errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from worker.settings import first_error

KEY = "693a91f6-7a0c-4bc4-97a0-0ec2sifa5aaa"
OFFICIAL = f"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={KEY}"


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def shared_robot(tls_ca, clock):
    server = WeComEmulator(key=KEY, ssl_context=tls_ca.server_context(), clock=clock.monotonic)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def robot(shared_robot):
    """One robot for the module (stopping one takes 0.5 s), clean for each test."""
    shared_robot.reset()
    return shared_robot


@pytest.fixture
async def make_channel(robot, tls_ca):
    made: list[WeComChannel] = []

    def make(**extra) -> WeComChannel:
        fields = {"url": robot.webhook_url, "ca_file": tls_ca.ca_file, "timeout_s": 1.0}
        fields.update(extra)
        ch = WeComChannel(WeComSettings(name="desk", type="wecom", **fields), priority=0)
        made.append(ch)
        return ch

    yield make
    for ch in made:
        await ch.close()


def _alert(severity: str = "info", body: str = "", **fields) -> Alert:
    event = {"id": "w1", "subject": "止损 600519", "ts": 1796100000, "severity": severity}
    if body:
        event["body"] = body
    event.update(fields)
    return build_alert(parse_event(json.dumps(event, ensure_ascii=False)), event_id="w1")


def _secret_free(text: str) -> None:
    """Neither the key nor any key=… value (the URL) is in ``text``."""
    assert KEY not in text and re.search(r"key=[\w-]", text) is None


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


# ------------------------------------------------------------------------------ settings
async def test_settings_and_defaults():
    s = WeComSettings(name="desk", type="wecom", url=OFFICIAL)
    assert s.msgtype == "markdown" and s.mention_users == [] and s.mention_mobiles == []
    assert s.host == "qyapi.weixin.qq.com" and s.key == KEY
    # the kinds registry finds this module's settings model and channel, and builds it
    assert kind_of("wecom") == (WeComSettings, WeComChannel)
    built = build_channel(s, priority=1, throttle_base_s=5.0, retry_base_s=0.5, retry_max_s=60.0)
    fewer = WeComChannel(s.model_copy(update={"rate_per_minute": 5}), priority=0)
    try:
        assert isinstance(built, WeComChannel) and built.kind == "wecom"
        assert built.service == "WeCom" and built.priority == 1
        assert built.per_minute == DEFAULT_RATE_PER_MINUTE == 20 and fewer.per_minute == 5
        assert built.health.throttle_base_s == 5.0 and built.health.down_base_s == 0.5
    finally:
        await built.close()
        await fewer.close()


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        ({"url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"}, "", "no key="),
        ({"url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key="}, "", "no key="),
        ({"url": f"https://qyapi.weixin.qq.com/cgi-bin/gettoken?key={KEY}"}, "", "webhook address"),
        ({"url": f"{OFFICIAL}%3E"}, "", "characters a WeCom key never has"),
        ({"url": KEY}, "", "https://"),
        ({"url": OFFICIAL.replace("https", "http")}, "", "loopback"),
        ({"url": OFFICIAL, "secret": "SEC123"}, "", "no signing secret"),
        ({"url": OFFICIAL, "msgtype": "news"}, "msgtype", "'markdown' or 'text'"),
        ({"url": OFFICIAL, "mention_users": ["张三"]}, "mention_users", "not a WeCom userid"),
        ({"url": OFFICIAL, "mention_mobiles": ["138-0000"]}, "mention_mobiles", "mobile number"),
        ({"url": OFFICIAL, "mention_user": ["zhangsan"]}, "mention_user", "Extra inputs"),
        ({"url": OFFICIAL, "type": "dingtalk"}, "type", "'wecom'"),
    ],
)
def test_each_mistake_is_one_clear_line_without_the_key(fields, where, says):
    with pytest.raises(ValidationError) as info:
        WeComSettings.model_validate({"name": "desk", "type": "wecom", **fields})
    key, msg, _ = first_error(info.value)
    assert key == where and says in msg and "\n" not in msg
    _secret_free(msg)


def test_url_from_a_file_is_checked_too(tmp_path):
    path = tmp_path / "wecom_url"
    path.write_text("https://qyapi.weixin.qq.com/cgi-bin/webhook/send\n")
    with pytest.raises(ValidationError, match="no key="):
        WeComSettings(name="desk", type="wecom", url_file=path)
    path.write_text(OFFICIAL + "\n")
    s = WeComSettings(name="desk", type="wecom", url_file=path)
    assert s.key == KEY


def test_mentions_are_kept_once_in_order():
    s = WeComSettings(
        name="desk",
        type="wecom",
        url=OFFICIAL,
        mention_users=["ZhangSan", " li.si@corp ", "ZhangSan", "@all"],
        mention_mobiles=["13800001111", "+8613900002222", "13800001111"],
    )
    assert s.mention_users == ["ZhangSan", "li.si@corp", "@all"]
    assert s.mention_mobiles == ["13800001111", "+8613900002222"]


# ------------------------------------------------------------------------------ requests
async def test_markdown_alert_as_wecom_documents_it(robot, make_channel):
    ch = make_channel()
    alert = _alert(body="均线金叉，买入 100 股", data={"symbol": "600519", "price": 1700.5})
    receipt = await ch.send(0, alert, ["trader@qq.com"])
    req = robot.requests[0]
    assert req.method == "POST" and req.path == PATH and req.query == {"key": KEY}
    assert req.headers["content-type"].startswith("application/json")
    assert req.json == {"msgtype": "markdown", "markdown": {"content": as_markdown(alert)}}
    (msg,) = robot.messages
    assert "止损 600519" in msg.content and "均线金叉，买入 100 股" in msg.content
    assert "1700.50" in msg.content and msg.mentioned == ()
    assert receipt.channel == "desk" and receipt.subject == "止损 600519"


async def test_text_msgtype(robot, make_channel):
    ch = make_channel(msgtype="text", mention_users=["ZhangSan"])
    alert = _alert(severity="warning", body="仓位 80%")
    await ch.send(0, alert, [])
    assert robot.requests[0].json == {"msgtype": "text", "text": {"content": as_text(alert)}}
    assert robot.messages[0].mentioned == ()  # warning: nobody is mentioned


async def test_critical_mentions_userids_in_markdown(robot, make_channel):
    ch = make_channel(mention_users=["ZhangSan", "li.si"])
    await ch.send(0, _alert(severity="warning"), [])
    await ch.send(0, _alert(severity="critical", body="爆仓风险"), [])
    warn, crit = robot.messages
    assert warn.mentioned == () and "<@" not in warn.content
    assert crit.msgtype == "markdown" and crit.mentioned == ("ZhangSan", "li.si")
    assert crit.content.endswith("\n\n<@ZhangSan><@li.si>") and "爆仓风险" in crit.content


async def test_critical_mentions_by_mobile_or_all_go_as_text(robot, make_channel):
    ch = make_channel(mention_users=["ZhangSan"], mention_mobiles=["13800001111"])
    alert = _alert(severity="critical", body="止损失败")
    await ch.send(0, alert, [])
    assert robot.requests[0].json == {
        "msgtype": "text",
        "text": {
            "content": as_text(alert),
            "mentioned_list": ["ZhangSan"],
            "mentioned_mobile_list": ["13800001111"],
        },
    }
    await ch.send(0, _alert(severity="info"), [])  # not critical: markdown, no mention
    assert robot.requests[1].json["msgtype"] == "markdown"
    everyone = make_channel(mention_users=["@all"])
    await everyone.send(0, alert, [])
    assert robot.messages[-1].msgtype == "text" and robot.messages[-1].mentioned == ("@all",)


async def test_a_digest_holding_a_critical_event_mentions(robot, make_channel):
    ch = make_channel(mention_users=["ZhangSan"])
    events = [
        ("d1", parse_event('{"subject": "信号 1", "ts": 1796100000}')),
        ("d2", parse_event('{"subject": "熔断", "severity": "critical", "ts": 1796100001}')),
    ]
    await ch.send(0, build_digest(events, reason="desk: rate limit 20/min reached"), [])
    (msg,) = robot.messages
    assert msg.msgtype == "markdown" and msg.mentioned == ("ZhangSan",)
    assert "信号 1" in msg.content and "熔断" in msg.content


@pytest.mark.parametrize("msgtype", ["markdown", "text"])
async def test_the_alerts_own_text_mentions_nobody(robot, make_channel, msgtype):
    ch = make_channel(msgtype=msgtype, mention_users=["ZhangSan"])
    await ch.send(0, _alert(severity="critical", body="请 <@all> 和 <@boss> 处理"), [])
    (msg,) = robot.messages
    assert set(msg.mentioned) == {"ZhangSan"}  # only the configured member
    assert "@all> 和" in msg.content and "\u200b@boss>" in msg.content  # still reads the same


# ------------------------------------------------------------------------------ limits
@pytest.mark.parametrize(
    ("msgtype", "limit", "extra"),
    [
        ("markdown", MARKDOWN_MAX_BYTES, {}),
        ("text", TEXT_MAX_BYTES, {}),
        ("markdown", MARKDOWN_MAX_BYTES, {"mention_users": ["ZhangSan", "li.si"]}),
        ("text", TEXT_MAX_BYTES, {"mention_mobiles": ["13800001111"]}),
    ],
)
async def test_long_chinese_is_cut_to_the_limit_with_a_marker(
    robot, make_channel, msgtype, limit, extra
):
    ch = make_channel(msgtype=msgtype, **extra)
    body = "均线金叉，买入信号确认。" * 900 + "<@all>"  # ~32 KB of CJK
    await ch.send(0, _alert(severity="critical", body=body, data={"symbol": "600519"}), [])
    (msg,) = robot.messages  # the robot accepted it: within its limit
    assert limit - 8 <= _size(msg.content) <= limit
    assert truncated_marker() in msg.content
    assert "止损 600519" in msg.content and "w1" in msg.content and "600519" in msg.content
    assert "均线金叉，买入信号确认。均线金叉" in msg.content  # whole characters, exact


async def test_a_long_digest_keeps_the_oldest_rows_and_says_how_many_more(robot, make_channel):
    ch = make_channel()
    events = [
        (f"d{i}", parse_event(json.dumps({"subject": f"买入信号 {i} 号", "ts": 1796100000 + i})))
        for i in range(300)
    ]
    await ch.send(0, build_digest(events), [])
    (msg,) = robot.messages
    assert _size(msg.content) <= MARKDOWN_MAX_BYTES
    assert "买入信号 0 号" in msg.content and "买入信号 299 号" not in msg.content
    assert "and" in msg.content and "more" in msg.content


# ------------------------------------------------------------------------------ replies
@pytest.mark.parametrize(
    ("errcode", "kind"),
    [
        (45009, ThrottledError),
        (45033, ThrottledError),
        (-1, TransientError),
        (93000, ConfigurationError),
        (40008, PermanentError),
        (44004, PermanentError),
        (40058, PermanentError),
        (60020, PermanentError),  # any other errcode: this message, not the channel
    ],
)
async def test_each_errcode_is_classified(robot, make_channel, errcode, kind):
    ch = make_channel()
    robot.error_next(errcode)
    with pytest.raises(SendError) as info:
        await ch.send(0, _alert(), [])
    err = info.value
    assert type(err) is kind and err.code == errcode
    assert "hint:" not in str(err) and "from ip" not in str(err)  # the service's tail is cut
    _secret_free(str(err))
    _secret_free(repr(err))
    if errcode == 93000:
        assert "url_file" in str(err) and "webhook" in str(err)
        ch.health.failed(err)
        assert ch.paused


async def test_a_wrong_key_is_the_services_93000_and_pauses_the_channel(robot, make_channel):
    ch = make_channel(url=robot.webhook_url.replace(KEY, "0" * 8 + KEY[8:]))
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 93000 and "invalid webhook url" in str(info.value)
    assert KEY[8:] not in str(info.value)
    assert robot.messages == []


async def test_an_errmsg_that_held_the_key_does_not_show_it(robot, make_channel):
    ch = make_channel()
    robot.fail_next(200, {"errcode": 93000, "errmsg": f"invalid webhook url key={KEY}"})
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert "<key>" in str(info.value)
    _secret_free(str(info.value))


async def test_the_robots_20_a_minute_is_throttled(robot, make_channel, clock):
    ch = make_channel()
    for _ in range(20):
        await ch.send(0, _alert(), [])
    with pytest.raises(ThrottledError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 45009 and "20 a minute" in str(info.value)
    ch.health.failed(info.value)
    assert ch.state == "throttled" and not ch.available()
    clock.advance(60.0)  # the robot's window has passed
    await ch.send(0, _alert(), [])
    assert len(robot.messages) == 21


async def test_429_honours_retry_after(robot, make_channel):
    ch = make_channel()
    robot.fail_next(429, {}, headers={"Retry-After": "12"})
    with pytest.raises(ThrottledError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.retry_after_s == 12.0
    ch.health.failed(info.value)
    assert 11.9 < ch.retry_at() - time.monotonic() <= 12.0


async def test_a_reply_without_an_errcode_is_transient(robot, make_channel):
    ch = make_channel()
    robot.fail_next(200, b"<html>gateway login</html>")
    with pytest.raises(TransientError, match="without an errcode"):
        await ch.send(0, _alert(), [])
    robot.fail_next(502, b"bad gateway")
    with pytest.raises(TransientError):
        await ch.send(0, _alert(), [])


# ------------------------------------------------------------------------------ transport
async def test_several_sends_on_one_kept_alive_connection(robot, make_channel):
    ch = make_channel()
    for i in range(4):
        receipt = await ch.send(0, _alert(body=f"第 {i} 条"), [])
    assert len(robot.messages) == 4 and robot.connections == 1
    assert receipt.mode.startswith("http/")


async def test_a_dropped_connection_is_transient_and_the_channel_is_down(robot, make_channel):
    ch = make_channel()
    robot.drop_next()
    with pytest.raises(TransientError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code is None  # no reply at all
    _secret_free(str(info.value))
    ch.health.failed(info.value)
    assert ch.state == "down"
    await ch.send(0, _alert(), [])  # a new connection, and it works again
    assert len(robot.messages) == 1 and robot.connections == 2


async def test_a_stall_times_out_as_transient_and_the_channel_is_down(tls_ca):
    # a robot of its own: the stalled reply is written after the client gave up
    with WeComEmulator(key=KEY, ssl_context=tls_ca.server_context()) as slow:
        settings = WeComSettings(
            name="desk", type="wecom", url=slow.webhook_url, ca_file=tls_ca.ca_file, timeout_s=0.3
        )
        ch = WeComChannel(settings, priority=0)
        slow.stall_next(0.5)
        try:
            with pytest.raises(TransientError, match="did not answer in time") as info:
                await ch.send(0, _alert(), [])
            assert info.value.code is None
            _secret_free(str(info.value))
            ch.health.failed(info.value)
            assert ch.state == "down"
        finally:
            await ch.close()


async def test_no_key_in_any_repr_or_description(make_channel):
    ch = make_channel(mention_users=["ZhangSan"])
    for text in (repr(ch.settings), str(ch.settings.model_dump()), repr(ch), str(ch.describe())):
        _secret_free(text)
    assert ch.describe()["host"] == "127.0.0.1"


async def test_no_url_is_a_configuration_error_naming_the_credential():
    ch = WeComChannel(WeComSettings(name="desk", type="wecom"), priority=0)
    try:
        with pytest.raises(ConfigurationError, match="wecom_desk_url"):
            ch.request(_alert(), [])
        with pytest.raises(ConfigurationError, match="url"):
            await ch.probe()
    finally:
        await ch.close()
