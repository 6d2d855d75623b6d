"""The DingTalk custom robot channel (worker/channels/dingtalk.py) against its HTTPS emulator
(worker/devtools/emulators/dingtalk.py): the request (text and markdown, Chinese exact), 加签
signing with an injected wall clock, custom keywords, @mobiles for critical alerts, the 20000-byte
limit, DingTalk's own errcodes (HTTP 200 with an error in the body), throttling, keep-alive,
transport faults, and no token, secret or URL in any message or repr."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from typing import Any

import pytest
from pydantic import ValidationError

from producer.event import parse_event
from worker.channels.dingtalk import (
    MAX_BODY_BYTES,
    DingTalkChannel,
    DingTalkSettings,
)
from worker.content import Alert, build_alert, build_digest
from worker.devtools.emulators.dingtalk import DingTalkEmulator
from worker.errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from worker.settings import first_error

TOKEN = "7f3c0ffee9d41b2a6c5e8f90d1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4"
SECRET = "SEC0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd"
NOW = 1796100000.126  # the wall clock of the signing tests
# Computed apart from the code under test:
#   printf '%s\n%s' 1796100000126 "$SECRET" | openssl dgst -sha256 -hmac "$SECRET" -binary | base64
SIGN_AT_NOW = "tiYmW+mtTNXojJLRc1qN8C12gj4pp8k7H7C/3s8C4p8="


@pytest.fixture(scope="module")
def shared_robot(tls_ca):
    # one server for the module: stopping one takes half a second (its poll interval)
    server = DingTalkEmulator(ssl_context=tls_ca.server_context(), access_token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def robot(shared_robot):
    """A robot without 加签 or keywords, its counts at zero."""
    shared_robot.reset()
    shared_robot.secret, shared_robot.keywords, shared_robot.clock = None, (), time.time
    return shared_robot


@pytest.fixture
def make_robot(robot):
    """The robot with 加签 (``secret``, ``clock``) or ``keywords``."""

    def make(**kwargs: Any) -> DingTalkEmulator:
        for key, value in kwargs.items():
            assert hasattr(robot, key)
            setattr(robot, key, value)
        return robot

    return make


def _settings(robot: DingTalkEmulator, tls_ca, **extra: Any) -> DingTalkSettings:
    return DingTalkSettings.model_validate(
        {
            "name": "desk",
            "type": "dingtalk",
            "url": robot.webhook_url,
            "ca_file": str(tls_ca.ca_file),
            "timeout_s": 1.0,
            **extra,
        }
    )


@pytest.fixture
async def channels():
    made: list[DingTalkChannel] = []

    def make(robot: DingTalkEmulator, tls_ca, *, wall_clock=None, **extra: Any) -> DingTalkChannel:
        kwargs: dict[str, Any] = {} if wall_clock is None else {"wall_clock": wall_clock}
        ch = DingTalkChannel(_settings(robot, tls_ca, **extra), priority=1, **kwargs)
        made.append(ch)
        return ch

    yield make
    for ch in made:
        await ch.close()


def _alert(severity: str = "info", body: str = "", subject: str = "止损 600519", **kw) -> Alert:
    event: dict[str, Any] = {
        "id": "d1",
        "subject": subject,
        "severity": severity,
        "strategy": "ma_cross",
        "ts": 1796100000,
        "data": {"symbol": "600519", "price": 1700.5},
    }
    if body:
        event["body"] = body
    return build_alert(parse_event(json.dumps(event, ensure_ascii=False)), event_id="d1", **kw)


def _sent(robot: DingTalkEmulator) -> dict[str, Any]:
    data: dict[str, Any] = robot.requests[-1].json
    return data


def _no_secret_in(text: str) -> None:
    """No token, secret, signature or URL (a placeholder ``access_token=...`` in a hint is
    fine)."""
    assert TOKEN not in text and SECRET not in text and SIGN_AT_NOW not in text
    assert TOKEN[:8] not in text and SECRET[3:11] not in text
    assert not re.search(
        r"access_token=(?!\.\.\.)|sign=|/robot/send\?(?!access_token=\.\.\.)", text
    )


# ----------------------------------------------------------------------- the request
async def test_markdown_message_has_a_title_and_the_chinese_text_exactly(robot, tls_ca, channels):
    ch = channels(robot, tls_ca)
    receipt = await ch.send(0, _alert(body="盘中急跌，触发止损"), ["ignored@example.com"])
    assert receipt.channel == "desk" and receipt.subject == "止损 600519"
    req = robot.requests[-1]
    assert req.path == "/robot/send" and req.query == {"access_token": TOKEN}
    assert req.headers["content-type"] == "application/json; charset=utf-8"
    body = _sent(robot)
    assert body["msgtype"] == "markdown"
    assert body["markdown"]["title"] == "止损 600519"
    text = body["markdown"]["text"]
    assert text.startswith("**止损 600519**")
    assert "盘中急跌，触发止损" in text and "1700.50" in text
    assert body["at"] == {"atMobiles": [], "isAtAll": False}
    assert robot.accepted == 1


async def test_text_message_is_the_plain_text(robot, tls_ca, channels):
    ch = channels(robot, tls_ca, format="text")
    await ch.send(0, _alert(body="**不是** markdown"), [])
    body = _sent(robot)
    assert body["msgtype"] == "text" and "markdown" not in body
    content = body["text"]["content"]
    assert content.startswith("止损 600519\nINFO · info · ma_cross")
    assert "**不是** markdown" in content  # nothing escaped in plain text


async def test_a_digest_is_one_markdown_message(robot, tls_ca, channels):
    items = [
        (f"e{i}", parse_event(json.dumps({"subject": f"信号 {i}", "ts": 1796100000 + i})))
        for i in range(5)
    ]
    digest = build_digest(items, reason="desk: rate limit 20/min reached")
    ch = channels(robot, tls_ca)
    await ch.send(0, digest, [])
    body = _sent(robot)
    assert body["markdown"]["title"] == digest.subject
    assert all(f"信号 {i}" in body["markdown"]["text"] for i in range(5))


# ----------------------------------------------------------------------- 加签
async def test_signed_with_the_wall_clock_in_milliseconds(make_robot, tls_ca, channels):
    robot = make_robot(secret=SECRET, clock=lambda: NOW)
    ch = channels(robot, tls_ca, secret=SECRET, wall_clock=lambda: NOW)
    await ch.send(0, _alert(), [])
    query = robot.requests[-1].query
    assert query == {"access_token": TOKEN, "timestamp": "1796100000126", "sign": SIGN_AT_NOW}
    assert robot.accepted == 1
    # (the emulator decodes the query as DingTalk does: an unescaped "+" would arrive as " ")
    assert "+" in SIGN_AT_NOW and "/" in SIGN_AT_NOW


def test_the_signature_matches_dingtalks_recipe():
    """HMAC-SHA256 over "timestamp\\nsecret" keyed with the secret, base64 (DingTalk's docs)."""
    mac = hmac.new(SECRET.encode(), f"1796100000126\n{SECRET}".encode(), hashlib.sha256)
    assert base64.b64encode(mac.digest()).decode() == SIGN_AT_NOW


async def test_a_wrong_secret_is_a_configuration_error_naming_secret(make_robot, tls_ca, channels):
    robot = make_robot(secret=SECRET)
    wrong = "SEC" + "f" * 64
    ch = channels(robot, tls_ca, secret=wrong)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 310000 and "sign not match" in str(info.value)
    assert "secret" in (info.value.hint or "")
    assert wrong not in str(info.value)
    _no_secret_in(str(info.value))


async def test_a_signed_robot_without_secret_says_to_set_it(make_robot, tls_ca, channels):
    robot = make_robot(secret=SECRET)
    ch = channels(robot, tls_ca)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert "secret_file" in (info.value.hint or "")


async def test_a_clock_an_hour_off_is_an_invalid_timestamp(make_robot, tls_ca, channels):
    robot = make_robot(secret=SECRET)
    ch = channels(robot, tls_ca, secret=SECRET, wall_clock=lambda: time.time() - 2 * 3600)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert "invalid timestamp" in str(info.value) and "clock" in (info.value.hint or "")


# ----------------------------------------------------------------------- keywords
async def test_the_first_keyword_goes_into_the_title_when_none_is_there(
    make_robot, tls_ca, channels
):
    robot = make_robot(keywords=("告警",))
    ch = channels(robot, tls_ca, keywords=["告警", "notifier"])
    await ch.send(0, _alert(body="x" * 30000), [])  # a keyword must survive the cut too
    body = _sent(robot)
    assert body["markdown"]["title"] == "[告警] 止损 600519"
    assert body["markdown"]["text"].startswith("**[告警] 止损 600519**")
    assert robot.accepted == 1


async def test_a_subject_that_has_a_keyword_is_left_alone(make_robot, tls_ca, channels):
    robot = make_robot(keywords=("止损",))
    ch = channels(robot, tls_ca, keywords=["告警", "止损"], format="text")
    await ch.send(0, _alert(), [])
    assert _sent(robot)["text"]["content"].startswith("止损 600519\n")
    assert robot.accepted == 1


async def test_missing_keywords_setting_is_a_configuration_error(make_robot, tls_ca, channels):
    robot = make_robot(keywords=("告警",))
    ch = channels(robot, tls_ca)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 310000 and "keywords" in (info.value.hint or "")


# ----------------------------------------------------------------------- @mentions
async def test_critical_mentions_the_mobiles_in_at_and_in_the_markdown(robot, tls_ca, channels):
    ch = channels(robot, tls_ca, mention_mobiles=["13800000000", "+86-13900000000"])
    await ch.send(0, _alert("critical", body="爆仓风险"), [])
    body = _sent(robot)
    assert body["at"] == {"atMobiles": ["13800000000", "+86-13900000000"], "isAtAll": False}
    assert body["markdown"]["text"].endswith("@13800000000 @+86-13900000000")
    assert robot.mentioned == [["13800000000", "+86-13900000000"]]
    await ch.send(0, _alert("warning"), [])
    assert _sent(robot)["at"] == {"atMobiles": [], "isAtAll": False}
    assert "@138" not in _sent(robot)["markdown"]["text"]


async def test_critical_mentions_everyone_when_told(robot, tls_ca, channels):
    ch = channels(robot, tls_ca, mention_all=True, format="text")
    await ch.send(0, _alert("critical"), [])
    assert _sent(robot)["at"] == {"atMobiles": [], "isAtAll": True}


async def test_a_critical_row_in_a_digest_mentions(robot, tls_ca, channels):
    items = [
        ("a", parse_event('{"subject": "信号", "ts": 1796100000}')),
        ("b", parse_event('{"subject": "断线", "severity": "critical", "ts": 1796100001}')),
    ]
    ch = channels(robot, tls_ca, mention_mobiles=["13800000000"])
    await ch.send(0, build_digest(items), [])
    assert _sent(robot)["at"]["atMobiles"] == ["13800000000"]


# ----------------------------------------------------------------------- size
@pytest.mark.parametrize("fmt", ["markdown", "text"])
async def test_long_chinese_text_is_cut_with_a_marker_within_the_limit(
    robot, tls_ca, channels, fmt
):
    ch = channels(robot, tls_ca, format=fmt, mention_mobiles=["13800000000"], keywords=["告警"])
    body_text = (
        "价格异动，" * 3000 + '"*_`\\<>' * 500
    )  # CJK, and characters JSON or markdown escape
    await ch.send(0, _alert("critical", body=body_text, locale="zh"), [])
    req = robot.requests[-1]
    assert len(req.body) <= MAX_BODY_BYTES == 20000
    assert len(req.body) > MAX_BODY_BYTES - 200  # cut to the limit, not far below it
    text = req.json["markdown"]["text"] if fmt == "markdown" else req.json["text"]["content"]
    assert "…（已截断）" in text and "价格异动，价格异动" in text
    assert "止损 600519" in text and "1700.50" in text  # subject and data rows survive
    assert text.endswith("@13800000000")
    text.encode("utf-8")  # whole characters only
    assert robot.accepted == 1


async def test_a_huge_digest_keeps_the_oldest_rows_and_says_how_many_more(robot, tls_ca, channels):
    items = [
        (
            f"e{i}",
            parse_event(json.dumps({"subject": f"信号{i} " + "长" * 200, "ts": 1796100000 + i})),
        )
        for i in range(200)
    ]
    ch = channels(robot, tls_ca)
    await ch.send(0, build_digest(items, locale="zh"), [])
    req = robot.requests[-1]
    assert len(req.body) <= MAX_BODY_BYTES
    assert "信号0 " in req.json["markdown"]["text"] and "另有" in req.json["markdown"]["text"]
    assert robot.accepted == 1


# ----------------------------------------------------------------------- DingTalk's errcodes
@pytest.mark.parametrize(
    ("errcode", "errmsg", "kind", "hint_word"),
    [
        (130101, "send too fast, exceed 20 times per minute", ThrottledError, None),
        (410100, "发送速度太快而限流", ThrottledError, None),
        (310000, "keywords not in content", ConfigurationError, "keywords"),
        (310000, "ip 203.0.113.7 not in whitelist", ConfigurationError, "IP"),
        (300001, "token is not exist", ConfigurationError, "url"),
        (300005, "token is not exist", ConfigurationError, "url"),
        (400101, "access_token不存在", ConfigurationError, "url"),
        (400013, "群已被解散", ConfigurationError, "group"),
        (400102, "机器人已停用", ConfigurationError, "robot"),
        (400106, "机器人不存在", ConfigurationError, "robot"),
        (430102, "含有不合适的文本", PermanentError, None),
        (400105, "不支持的消息类型", PermanentError, None),
        (-1, "系统繁忙", TransientError, None),
        (987654, "something new", PermanentError, None),
    ],
)
async def test_errcodes_in_a_200_reply_are_classified(
    robot, tls_ca, channels, errcode, errmsg, kind, hint_word
):
    ch = channels(robot, tls_ca)
    robot.fail_next_errcode(errcode, errmsg)
    with pytest.raises(SendError) as info:
        await ch.send(0, _alert(), [])
    err = info.value
    assert type(err) is kind and err.code == errcode
    assert errmsg in str(err)
    if hint_word:
        assert hint_word in (err.hint or "")
    _no_secret_in(str(err))
    if kind is ThrottledError:  # DingTalk throttles a robot for 10 minutes
        assert err.retry_after_s == 600
        ch.health.failed(err)
        assert ch.state == "throttled"
        assert 599 < ch.retry_at() - time.monotonic() <= 600


async def test_the_robot_throttles_the_21st_message_of_a_minute(robot, tls_ca, channels):
    ch = channels(robot, tls_ca)
    assert ch.per_minute == 20  # DingTalk's published limit is the default rate
    for _ in range(20):
        await ch.send(0, _alert(), [])
    with pytest.raises(ThrottledError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 130101 and info.value.retry_after_s == 600
    assert robot.connections == 1  # and all of them on one kept-alive connection


async def test_an_errmsg_that_echoes_the_token_is_scrubbed(robot, tls_ca, channels):
    ch = channels(robot, tls_ca)
    robot.fail_next_errcode(300001, f"token {TOKEN} is not exist")
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    _no_secret_in(str(info.value))


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind"),
    [
        (429, {"Retry-After": "42"}, {}, ThrottledError),
        (502, {}, b"<html>bad gateway</html>", TransientError),
        (404, {}, b"not found", ConfigurationError),
        (200, {}, b"<html>portal login</html>", ConfigurationError),
    ],
)
async def test_http_statuses_and_replies_that_are_not_dingtalks(
    robot, tls_ca, channels, status, headers, body, kind
):
    ch = channels(robot, tls_ca)
    robot.fail_next(status, body, headers=headers)
    with pytest.raises(kind) as info:
        await ch.send(0, _alert(), [])
    _no_secret_in(str(info.value))
    if status == 429:
        assert info.value.retry_after_s == 42.0


# ----------------------------------------------------------------------- the connection
async def test_several_sends_share_one_connection(robot, tls_ca, channels):
    ch = channels(robot, tls_ca)
    for _ in range(3):
        await ch.send(0, _alert(), [])
    assert robot.connections == 1 and robot.accepted == 3


@pytest.mark.parametrize("fault", ["drop", "stall"])
async def test_a_drop_or_a_stall_is_transient_and_names_no_url(robot, tls_ca, channels, fault):
    ch = channels(robot, tls_ca, timeout_s=0.3)
    if fault == "drop":
        robot.drop_next()
    else:
        robot.stall_next(0.8)
    with pytest.raises(TransientError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code is None  # no reply: the channel is down
    _no_secret_in(str(info.value))
    ch.health.failed(info.value)
    assert ch.state == "down"
    await ch.send(0, _alert(), [])  # and the next send works (a new connection if need be)
    if fault == "stall":  # the stalled request is answered late: let it end within this test
        deadline = time.monotonic() + 3.0
        while robot.accepted < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert robot.accepted == 2


# ----------------------------------------------------------------------- secrets
async def test_no_secret_in_repr_describe_or_dump(make_robot, tls_ca, channels):
    robot = make_robot(secret=SECRET)
    ch = channels(robot, tls_ca, secret=SECRET)
    for text in (
        repr(ch.settings),
        str(ch.settings),
        str(ch.settings.model_dump()),
        repr(ch),
        str(ch.describe()),
    ):
        _no_secret_in(text)
        assert "SEC" not in text
    assert ch.describe()["signed"] is True and ch.describe()["host"] == "127.0.0.1"


def test_secrets_from_files(tmp_path):
    (tmp_path / "url").write_text(f"https://oapi.dingtalk.com/robot/send?access_token={TOKEN}\n")
    (tmp_path / "secret").write_text(SECRET + "\n")
    s = DingTalkSettings(
        name="desk", type="dingtalk", url_file=tmp_path / "url", secret_file=tmp_path / "secret"
    )
    assert s.host == "oapi.dingtalk.com" and s.secret is not None
    assert s.secret.get_secret_value() == SECRET


# ----------------------------------------------------------------------- settings
def _error(**table: Any) -> str:
    base: dict[str, Any] = {
        "name": "desk",
        "type": "dingtalk",
        "url": f"https://oapi.dingtalk.com/robot/send?access_token={TOKEN}",
    }
    with pytest.raises(ValidationError) as info:
        DingTalkSettings.model_validate({**base, **table})
    where, what, _ = first_error(info.value)
    line = f"{where}: {what}" if where else what
    _no_secret_in(line)
    assert "\n" not in line
    return line


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"url": None}, ["url", "Webhook"]),
        ({"url": "https://oapi.dingtalk.com/robot/send"}, ["access_token"]),
        (
            {
                "url": f"https://oapi.dingtalk.com/robot/send?access_token={TOKEN}&timestamp=1&sign=x"
            },
            ["sign", "secret"],
        ),
        ({"secret": "0123456789abcdef"}, ["secret", "SEC"]),
        ({"secret": "SEC 12"}, ["secret", "SEC"]),
        ({"keywords": ["告警", " "]}, ["keywords"]),
        ({"keywords": [f"k{i}" for i in range(11)]}, ["keywords", "10"]),
        ({"mention_mobiles": ["138-abc"]}, ["mention_mobiles", "138-abc"]),
        ({"format": "card"}, ["format"]),
        ({"type": "wecom"}, ["type"]),
        ({"mentions": ["13800000000"]}, ["mentions"]),
    ],
)
def test_each_mistake_is_one_line_naming_the_setting(table, words):
    line = _error(**table)
    for word in words:
        assert word in line, line


def test_defaults():
    s = DingTalkSettings(
        name="desk",
        type="dingtalk",
        url=f"https://oapi.dingtalk.com/robot/send?access_token={TOKEN}",
    )
    assert (s.format, s.keywords, s.mention_mobiles, s.mention_all) == ("markdown", [], [], False)
    assert s.secret is None and s.rate_per_minute is None
    ch = DingTalkChannel(s, priority=0)
    assert ch.kind == "dingtalk" and ch.service == "DingTalk" and ch.per_minute == 20
    assert isinstance(ch.request(_alert(), []).params, dict)
    assert ch.request(_alert(), []).params == {}  # unsigned: no timestamp, no sign


def test_a_single_keyword_and_comma_separated_mobiles_are_lists():
    s = DingTalkSettings.model_validate(
        {
            "name": "d",
            "type": "dingtalk",
            "url": f"https://oapi.dingtalk.com/robot/send?access_token={TOKEN}",
            "keywords": "告警",
            "mention_mobiles": "13800000000, 13900000000",
        }
    )
    assert s.keywords == ["告警"] and s.mention_mobiles == ["13800000000", "13900000000"]


def test_the_registry_finds_the_kind_and_builds_it_with_the_delivery_defaults(tmp_path):
    from worker.channels.registry import build_channel, load_channels

    path = tmp_path / "channels.toml"
    path.write_text(
        "[[channel]]\n"
        'name = "desk"\n'
        'type = "dingtalk"\n'
        f'url = "https://oapi.dingtalk.com/robot/send?access_token={TOKEN}"\n'
        f'secret = "{SECRET}"\n'
        'keywords = ["告警"]\n'
        'mention_mobiles = ["13800000000"]\n',
        encoding="utf-8",
    )
    (settings,) = load_channels(path)
    ch = build_channel(
        settings, priority=1, throttle_base_s=10.0, retry_base_s=0.5, retry_max_s=60.0
    )
    assert isinstance(ch, DingTalkChannel) and ch.signed and ch.per_minute == 20
    path.write_text(
        '[[channel]]\nname = "desk"\ntype = "dingtalk"\n'
        f'url = "https://oapi.dingtalk.com/robot/send?access_token={TOKEN}"\n'
        'secret = "not-a-dingtalk-secret"\n',
        encoding="utf-8",
    )
    with pytest.raises(ValueError) as info:
        load_channels(path)
    line = str(info.value)
    assert "channel 'desk'" in line and "secret" in line and "not-a-dingtalk" not in line
    _no_secret_in(line)
