"""The Feishu / Lark custom bot channel (worker/channels/feishu.py) against its HTTPS emulator
(worker/devtools/emulators/feishu.py): the interactive card (header colour per severity, markdown
with the text and data rows, Chinese exact), the post and text fall-backs, signing (timestamp
and sign in the body, an injected wall clock), custom keywords, @mentions for critical alerts,
the 20 KB body limit, Feishu's own reply codes (HTTP 200 with ``code``, or the older
``StatusCode``), throttling, keep-alive, transport faults, the probe that sends nothing, and no
token, secret or URL in any message or repr."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from producer.event import parse_event
from worker.channels.feishu import (
    DEFAULT_RATE_PER_MINUTE,
    MAX_BODY_BYTES,
    FeishuChannel,
    FeishuSettings,
    sign,
)
from worker.content import Alert, build_alert, build_digest
from worker.devtools.emulators.feishu import FeishuEmulator
from worker.errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from worker.settings import first_error

TOKEN = "5e3d587e-d78e-4a07-bd07-265f269f86fd"
SECRET = "nIMtb7r3N9pkXyXdtAbx6e"
NOW = 1796100000.75  # the wall clock of the signing tests
# Computed apart from the code under test (Feishu's recipe: HMAC-SHA256 of the empty string
# keyed with "<timestamp>\n<secret>", base64):
#   printf '' | openssl dgst -sha256 -hmac "$(printf '1796100000\n%s' "$SECRET")" -binary | base64
SIGN_AT_NOW = "zt1nhNXvh1te73BDryHrpYh+hYrmsisWb26G1heuJrE="


@pytest.fixture(scope="module")
def shared_bot(tls_ca):
    server = FeishuEmulator(ssl_context=tls_ca.server_context(), token=TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def bot(shared_bot):
    """A bot without signing or keywords (one server for the module, reset for each test)."""
    shared_bot.reset()
    return shared_bot


@pytest.fixture
def make_bot(tls_ca):
    made: list[FeishuEmulator] = []

    def make(**kwargs: Any) -> FeishuEmulator:
        server = FeishuEmulator(ssl_context=tls_ca.server_context(), token=TOKEN, **kwargs)
        made.append(server.start())
        return server

    yield make
    for server in made:
        server.stop()


def _settings(bot: FeishuEmulator, tls_ca, **extra: Any) -> FeishuSettings:
    return FeishuSettings.model_validate(
        {
            "name": "desk",
            "type": "feishu",
            "url": bot.hook_url,
            "ca_file": str(tls_ca.ca_file),
            "timeout_s": 1.0,
            **extra,
        }
    )


@pytest.fixture
async def channels():
    made: list[FeishuChannel] = []

    def make(bot: FeishuEmulator, tls_ca, *, wall_clock=None, **extra: Any) -> FeishuChannel:
        kwargs: dict[str, Any] = {} if wall_clock is None else {"wall_clock": wall_clock}
        ch = FeishuChannel(_settings(bot, tls_ca, **extra), priority=1, **kwargs)
        made.append(ch)
        return ch

    yield make
    for ch in made:
        await ch.close()


def _alert(severity: str = "info", body: str = "", subject: str = "止损 600519", **kw) -> Alert:
    event: dict[str, Any] = {
        "id": "f1",
        "subject": subject,
        "severity": severity,
        "strategy": "ma_cross",
        "ts": 1796100000,
        "data": {"symbol": "600519", "side": "卖出", "price": 1700.5},
    }
    if body:
        event["body"] = body
    return build_alert(parse_event(json.dumps(event, ensure_ascii=False)), event_id="f1", **kw)


def _sent(bot: FeishuEmulator) -> dict[str, Any]:
    data: dict[str, Any] = bot.requests[-1].json
    return data


def _card_markdown(body: dict[str, Any]) -> str:
    (element,) = body["card"]["elements"]
    assert element["tag"] == "markdown"
    text: str = element["content"]
    return text


def _no_secret_in(text: str) -> None:
    assert TOKEN not in text and SECRET not in text


# ----------------------------------------------------------------------- the request
@pytest.mark.parametrize(
    ("severity", "colour"), [("info", "blue"), ("warning", "orange"), ("critical", "red")]
)
async def test_an_alert_is_a_card_with_a_coloured_header_and_the_text_in_markdown(
    bot, tls_ca, channels, severity, colour
):
    ch = channels(bot, tls_ca)
    receipt = await ch.send(0, _alert(severity, body="跌破 20 日均线\n减仓 50%"), ["a@b.c"])
    body = _sent(bot)
    assert body["msg_type"] == "interactive" and "timestamp" not in body and "sign" not in body
    card = body["card"]
    assert card["header"]["template"] == colour
    subject = "[CRITICAL] 止损 600519" if severity == "critical" else "止损 600519"
    assert card["header"]["title"] == {"tag": "plain_text", "content": subject}
    md = _card_markdown(body)
    assert "跌破 20 日均线  \n减仓 50%" in md  # Chinese exactly, line breaks kept
    assert "**symbol**: 600519" in md and "**side**: 卖出" in md and "**price**: 1700.50" in md
    assert "止损 600519" not in md  # the subject is the header, not said twice
    assert md.endswith("event f1")
    assert receipt.channel == "desk" and receipt.subject == subject
    assert len(bot.messages) == 1


async def test_post_is_rich_text_with_the_subject_as_title(bot, tls_ca, channels):
    ch = channels(bot, tls_ca, msg_type="post")
    await ch.send(0, _alert(body="跌破均线"), [])
    body = _sent(bot)
    assert body["msg_type"] == "post"
    post = body["content"]["post"]["en_us"]
    assert post["title"] == "止损 600519"
    lines = [el["text"] for para in post["content"] for el in para if el["tag"] == "text"]
    assert "跌破均线" in lines and "symbol: 600519\nside: 卖出\nprice: 1700.50" in lines
    assert not any("止损 600519" in line for line in lines)


async def test_text_is_the_plain_text(bot, tls_ca, channels):
    ch = channels(bot, tls_ca, msg_type="text")
    await ch.send(0, _alert(body="跌破均线"), [])
    body = _sent(bot)
    assert body["msg_type"] == "text"
    text = body["content"]["text"]
    assert text.startswith("止损 600519\nINFO · info · ma_cross\n\n跌破均线\n\nsymbol: 600519")
    assert text.endswith("event f1")


async def test_a_chinese_locale_posts_in_zh_cn(bot, tls_ca, channels):
    ch = channels(bot, tls_ca, msg_type="post")
    await ch.send(0, _alert(locale="zh"), [])
    assert list(_sent(bot)["content"]["post"]) == ["zh_cn"]


async def test_a_digest_is_one_card_coloured_by_its_worst_severity(bot, tls_ca, channels):
    items = [
        ("a", parse_event('{"subject": "信号 买入", "ts": 1796100000, "strategy": "grid"}')),
        ("b", parse_event('{"subject": "回撤", "severity": "warning", "ts": 1796100001}')),
    ]
    ch = channels(bot, tls_ca)
    await ch.send(0, build_digest(items, reason="desk: rate limit 100/min reached"), [])
    card = _sent(bot)["card"]
    assert card["header"]["template"] == "orange"
    assert card["header"]["title"]["content"].startswith("[DIGEST] 2 alerts")
    md = _card_markdown(_sent(bot))
    assert "信号 买入" in md and "回撤" in md and "[DIGEST]" not in md


async def test_text_that_looks_like_an_at_tag_mentions_nobody(bot, tls_ca, channels):
    ch = channels(bot, tls_ca, msg_type="text")
    await ch.send(0, _alert(body='<at user_id="all">所有人</at> 看这里'), [])
    assert bot.messages[-1].mentions == ()
    card = channels(bot, tls_ca)
    await card.send(0, _alert(body="<at id=all></at> 看这里"), [])
    assert bot.messages[-1].mentions == ()


# ----------------------------------------------------------------------- signing
def test_the_signature_is_feishus_recipe():
    assert sign(1796100000, SECRET) == SIGN_AT_NOW
    key = f"1599360473\n{SECRET}".encode()
    expected = base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()
    assert sign(1599360473, SECRET) == expected


async def test_signed_with_the_wall_clock_in_seconds(make_bot, tls_ca, channels):
    bot = make_bot(secret=SECRET, clock=lambda: NOW + 5)
    ch = channels(bot, tls_ca, secret=SECRET, wall_clock=lambda: NOW)
    await ch.send(0, _alert(), [])
    body = _sent(bot)
    assert body["timestamp"] == "1796100000" and body["sign"] == SIGN_AT_NOW
    assert len(bot.messages) == 1


async def test_a_wrong_secret_is_a_configuration_error_naming_secret(make_bot, tls_ca, channels):
    bot = make_bot(secret=SECRET)
    ch = channels(bot, tls_ca, secret="0therSecretFromAnotherBot")
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 19021 and "secret" in (info.value.hint or "")
    _no_secret_in(str(info.value))
    assert "0therSecret" not in str(info.value)
    assert bot.messages == []


async def test_a_signed_bot_without_secret_says_to_set_it(make_bot, tls_ca, channels):
    bot = make_bot(secret=SECRET)
    ch = channels(bot, tls_ca)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 19021 and "secret" in (info.value.hint or "")


async def test_a_clock_over_an_hour_off_fails_the_signature_check(make_bot, tls_ca, channels):
    bot = make_bot(secret=SECRET)
    ch = channels(bot, tls_ca, secret=SECRET, wall_clock=lambda: time.time() - 2 * 3600)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 19021 and "clock" in (info.value.hint or "")


# ----------------------------------------------------------------------- keywords
@pytest.mark.parametrize("msg_type", ["interactive", "post", "text"])
async def test_the_first_keyword_goes_into_the_title_when_none_is_there(
    make_bot, tls_ca, channels, msg_type
):
    bot = make_bot(keywords=("告警",))
    ch = channels(bot, tls_ca, keywords=["告警", "notifier"], msg_type=msg_type)
    await ch.send(0, _alert(body="跌" * 15000), [])  # the keyword must survive the cut
    body = _sent(bot)
    if msg_type == "interactive":
        assert body["card"]["header"]["title"]["content"] == "[告警] 止损 600519"
    elif msg_type == "post":
        assert body["content"]["post"]["en_us"]["title"] == "[告警] 止损 600519"
    else:
        assert body["content"]["text"].startswith("[告警] 止损 600519\n")
    assert len(bot.messages) == 1


async def test_a_message_that_has_a_keyword_is_left_alone(make_bot, tls_ca, channels):
    bot = make_bot(keywords=("止损",))
    ch = channels(bot, tls_ca, keywords=["告警", "止损"])
    await ch.send(0, _alert(), [])
    assert _sent(bot)["card"]["header"]["title"]["content"] == "止损 600519"
    assert len(bot.messages) == 1


async def test_missing_keywords_setting_is_a_configuration_error(make_bot, tls_ca, channels):
    bot = make_bot(keywords=("告警",))
    ch = channels(bot, tls_ca)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 19024 and "keywords" in (info.value.hint or "")


# ----------------------------------------------------------------------- @mentions
OU = "ou_5ad573a6411d72b8305fda3a9c15c70e"


@pytest.mark.parametrize("msg_type", ["interactive", "text", "post"])
async def test_critical_mentions_the_ids(bot, tls_ca, channels, msg_type):
    ch = channels(bot, tls_ca, msg_type=msg_type, mention_ids=[OU])
    await ch.send(0, _alert("critical", body="爆仓风险"), [])
    assert bot.messages[-1].mentions == (OU,)
    body = _sent(bot)
    if msg_type == "interactive":
        assert _card_markdown(body).endswith(f"<at id={OU}></at>")
    elif msg_type == "text":
        assert body["content"]["text"].endswith(f'<at user_id="{OU}"></at>')
    else:
        paragraphs = body["content"]["post"]["en_us"]["content"]
        assert paragraphs[-1] == [{"tag": "at", "user_id": OU}]
    await ch.send(0, _alert("warning"), [])
    assert bot.messages[-1].mentions == ()


async def test_critical_mentions_everyone_when_told(bot, tls_ca, channels):
    ch = channels(bot, tls_ca, mention_all=True)
    await ch.send(0, _alert("critical"), [])
    assert "<at id=all></at>" in _card_markdown(_sent(bot))
    assert bot.messages[-1].mentions == ("all",)


async def test_a_critical_row_in_a_digest_mentions(bot, tls_ca, channels):
    items = [
        ("a", parse_event('{"subject": "信号", "ts": 1796100000}')),
        ("b", parse_event('{"subject": "断线", "severity": "critical", "ts": 1796100001}')),
    ]
    ch = channels(bot, tls_ca, mention_all=True, msg_type="text")
    await ch.send(0, build_digest(items), [])
    assert bot.messages[-1].mentions == ("all",)


# ----------------------------------------------------------------------- size
LONG_TEXTS = {
    "chinese": "价格跌破止损线，请立即处理。\n" * 1200 + '引号"与反斜杠\\\t结束',  # ~52 KB
    # JSON doubles each " and \, markdown escapes * and _: the body is 2 to 4 times the text
    "escapes": '"\\' * 8000 + "\t" * 2000 + "*_\n" * 4000,
}


@pytest.mark.parametrize("kind", list(LONG_TEXTS))
@pytest.mark.parametrize("msg_type", ["interactive", "post", "text"])
async def test_long_text_is_cut_with_a_marker_within_the_limit(
    bot, tls_ca, channels, msg_type, kind
):
    ch = channels(bot, tls_ca, msg_type=msg_type, mention_all=True, secret=None, keywords=["告警"])
    await ch.send(0, _alert("critical", body=LONG_TEXTS[kind], locale="zh"), [])
    raw = bot.requests[-1].body
    assert len(raw) <= MAX_BODY_BYTES <= 20 * 1024
    assert len(raw) > MAX_BODY_BYTES - 1000  # cut to fit, not thrown away
    sent = json.loads(raw.decode("utf-8"))  # whole JSON, never a character cut in half
    assert "…（已截断）" in repr(sent)
    message = bot.messages[-1]
    assert "price" in message.text and "1700.50" in message.text and "事件 f1" in message.text
    assert message.mentions == ("all",)


async def test_a_huge_digest_keeps_the_oldest_rows_and_says_how_many_more(bot, tls_ca, channels):
    items = [
        (
            f"e{i}",
            parse_event(json.dumps({"subject": f"信号 {i:04d} 买入 600519", "ts": 1796100000 + i})),
        )
        for i in range(2000)
    ]
    ch = channels(bot, tls_ca)
    await ch.send(0, build_digest(items), [])
    raw = bot.requests[-1].body
    assert len(raw) <= MAX_BODY_BYTES
    md = _card_markdown(json.loads(raw))
    assert "信号 0000 买入" in md and "信号 1999 买入" not in md
    assert "more" in md


# ----------------------------------------------------------------------- replies
@pytest.mark.parametrize(
    ("status", "reply", "headers", "kind", "code", "hint"),
    [
        (
            200,
            {
                "code": 19001,
                "data": {},
                "msg": "param invalid: incoming webhook access token invalid",
            },
            {},
            ConfigurationError,
            19001,
            "url",
        ),
        (200, {"code": 19002, "msg": "param invalid: msg_type"}, {}, PermanentError, 19002, None),
        (200, {"code": 19007, "msg": "Bot Not Enabled"}, {}, ConfigurationError, 19007, "enable"),
        (
            200,
            {
                "code": 19021,
                "msg": "sign match fail or timestamp is not within one hour from current time",
            },
            {},
            ConfigurationError,
            19021,
            "secret",
        ),
        (200, {"code": 19022, "msg": "Ip Not Allowed"}, {}, ConfigurationError, 19022, "IP"),
        (
            200,
            {"code": 19024, "msg": "Key Words Not Found"},
            {},
            ConfigurationError,
            19024,
            "keywords",
        ),
        (
            200,
            {
                "code": 11232,
                "data": {},
                "msg": "frequency limited psm[lark.oapi.app_platform_runtime]appID[1500]",
            },
            {},
            ThrottledError,
            11232,
            None,
        ),
        (
            200,
            {"StatusCode": 0, "StatusMessage": "", "code": 9499, "msg": "too many request"},
            {},
            ThrottledError,
            9499,
            None,
        ),
        (400, {"code": 9499, "msg": "Bad Request", "data": {}}, {}, PermanentError, 9499, None),
        (
            429,
            {"code": 99991400, "msg": "request trigger frequency limit"},
            {"x-ogw-ratelimit-reset": "7"},
            ThrottledError,
            99991400,
            None,
        ),
        (
            200,
            {"StatusCode": 19021, "StatusMessage": "sign match fail"},
            {},
            ConfigurationError,
            19021,
            "secret",
        ),
        (200, {"code": 12345, "msg": "something new"}, {}, TransientError, 12345, None),
        (500, {"code": 0}, {}, TransientError, 500, None),
        (503, b"<html>busy</html>", {}, TransientError, 503, None),
        (429, b"", {"Retry-After": "3"}, ThrottledError, 429, None),
        (404, b"404 page not found", {}, ConfigurationError, 404, "url"),
        (200, b"<html>captive portal</html>", {}, ConfigurationError, None, "url"),
    ],
)
async def test_replies_are_classified(
    bot, tls_ca, channels, status, reply, headers, kind, code, hint
):
    ch = channels(bot, tls_ca, secret=SECRET)
    bot.fail_next(status, reply, headers=headers)
    with pytest.raises(SendError) as info:
        await ch.send(0, _alert(), [])
    err = info.value
    assert type(err) is kind, err
    assert err.code == code
    if hint is not None:
        assert hint in (err.hint or ""), err
    if "x-ogw-ratelimit-reset" in headers:
        assert err.retry_after_s == 7.0
    if "Retry-After" in headers:
        assert err.retry_after_s == 3.0
    _no_secret_in(str(err))
    assert "\n" not in str(err)


async def test_legacy_success_reply_is_a_success(bot, tls_ca, channels):
    ch = channels(bot, tls_ca)
    bot.fail_next(200, {"Extra": None, "StatusCode": 0, "StatusMessage": "success"})
    await ch.send(0, _alert(), [])


async def test_a_msg_that_echoes_the_token_is_scrubbed(bot, tls_ca, channels):
    ch = channels(bot, tls_ca, secret=SECRET)
    bot.fail_next(200, {"code": 19001, "msg": f"token {TOKEN} invalid, secret {SECRET}"})
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    _no_secret_in(str(info.value))


async def test_the_bot_throttles_the_sixth_message_in_a_second(make_bot, tls_ca, channels):
    bot = make_bot(clock=lambda: NOW)  # a frozen clock: every send is in the same second
    ch = channels(bot, tls_ca)
    for _ in range(5):
        await ch.send(0, _alert(), [])
    with pytest.raises(ThrottledError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code == 11232
    ch.health.failed(info.value)
    assert ch.state == "throttled" and ch.retry_at() - time.monotonic() <= 2.0


async def test_several_sends_share_one_connection(bot, tls_ca, channels):
    ch = channels(bot, tls_ca)
    for _ in range(4):
        await ch.send(0, _alert(), [])
    assert bot.connections == 1 and len(bot.messages) == 4


@pytest.mark.parametrize("fault", ["drop", "stall"])
async def test_a_drop_or_a_stall_is_transient_and_names_no_url(make_bot, tls_ca, channels, fault):
    bot = make_bot()  # its own: the stalled request is answered after the test
    ch = channels(bot, tls_ca)
    if fault == "drop":
        bot.drop_next()
    else:
        bot.stall_next(1.5)
    with pytest.raises(TransientError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code is None
    _no_secret_in(str(info.value))
    ch.health.failed(info.value)
    assert ch.state == "down"
    await ch.send(0, _alert(), [])  # and works again on the next send
    assert bot.messages[-1].msg_type == "interactive"


# ----------------------------------------------------------------------- probe
async def test_probe_checks_url_and_secret_and_sends_nothing(make_bot, tls_ca, channels):
    bot = make_bot(secret=SECRET)
    await channels(bot, tls_ca, secret=SECRET).probe()
    with pytest.raises(ConfigurationError) as info:
        await channels(bot, tls_ca, secret="wrong").probe()
    assert info.value.code == 19021
    other = channels(bot, tls_ca, secret=SECRET, url=bot.hook_url.replace(TOKEN, "0" * 36))
    with pytest.raises(ConfigurationError) as info:
        await other.probe()
    assert info.value.code == 19001
    _no_secret_in(str(info.value))
    assert bot.messages == []


# ----------------------------------------------------------------------- secrets
async def test_no_secret_in_repr_describe_or_dump(make_bot, tls_ca, channels):
    bot = make_bot(secret=SECRET)
    ch = channels(bot, tls_ca, secret=SECRET)
    for text in (repr(ch.settings), str(ch.settings.model_dump()), repr(ch), str(ch.describe())):
        _no_secret_in(text)
    assert ch.describe()["host"] == "127.0.0.1"


def test_secrets_from_files(tmp_path):
    url_file, secret_file = tmp_path / "url", tmp_path / "secret"
    url_file.write_text(f"https://open.feishu.cn/open-apis/bot/v2/hook/{TOKEN}\n")
    secret_file.write_text(f"{SECRET}\n")
    s = FeishuSettings(name="d", type="feishu", url_file=url_file, secret_file=secret_file)
    assert s.secret is not None and s.secret.get_secret_value() == SECRET
    assert s.host == "open.feishu.cn"


# ----------------------------------------------------------------------- settings
def _error(**table: Any) -> str:
    base: dict[str, Any] = {
        "name": "desk",
        "type": "feishu",
        "url": f"https://open.feishu.cn/open-apis/bot/v2/hook/{TOKEN}",
    }
    with pytest.raises(ValidationError) as info:
        FeishuSettings.model_validate({**base, **table})
    where, what, _ = first_error(info.value)
    line = f"{where}: {what}" if where else what
    _no_secret_in(line)
    assert "\n" not in line
    return line


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"url": None}, ["url", "webhook"]),
        (
            {"url": "https://open.feishu.cn/open-apis/bot/v2/hook/"},
            ["url", "/open-apis/bot/v2/hook/<token>"],
        ),
        (
            {"url": f"https://oapi.dingtalk.com/robot/send?access_token={TOKEN}"},
            ["url", "/open-apis/bot/v2/hook/<token>"],
        ),
        ({"url": f"https://open.feishu.cn/open-apis/bot/hook/{TOKEN}"}, ["url", "v2"]),
        (
            {"url": f"https://open.feishu.cn/open-apis/bot/v2/hook/{TOKEN}?sign=x"},
            ["url", "secret"],
        ),
        ({"url": f"http://open.feishu.cn/open-apis/bot/v2/hook/{TOKEN}"}, ["url", "https"]),
        ({"secret": "has space"}, ["secret"]),
        ({"keywords": ["告警", " "]}, ["keywords"]),
        ({"keywords": [f"k{i}" for i in range(11)]}, ["keywords", "10"]),
        ({"mention_ids": ["someone@example.com"]}, ["mention_ids", "open_id"]),
        ({"mention_ids": ["13800000000"]}, ["mention_ids", "open_id"]),
        ({"msg_type": "card"}, ["msg_type"]),
        ({"type": "dingtalk"}, ["type"]),
        ({"mentions": ["ou_1"]}, ["mentions"]),
    ],
)
def test_each_mistake_is_one_line_naming_the_setting(table, words):
    line = _error(**table)
    for word in words:
        assert word in line, line


def test_defaults_and_lark():
    s = FeishuSettings(
        name="desk", type="feishu", url=f"https://open.larksuite.com/open-apis/bot/v2/hook/{TOKEN}"
    )
    assert (s.msg_type, s.keywords, s.mention_ids, s.mention_all) == ("interactive", [], [], False)
    assert s.secret is None and s.rate_per_minute is None and s.host == "open.larksuite.com"
    ch = FeishuChannel(s, priority=0)
    assert ch.kind == "feishu" and ch.service == "Feishu"
    assert ch.per_minute == DEFAULT_RATE_PER_MINUTE == 100
    req = ch.request(_alert(), [])
    assert req.url.endswith(f"/open-apis/bot/v2/hook/{TOKEN}") and req.method == "POST"
    assert "sign" not in req.json  # unsigned without a secret


def test_a_single_keyword_string_is_a_list():
    s = FeishuSettings(
        name="d",
        type="feishu",
        url=f"https://open.feishu.cn/open-apis/bot/v2/hook/{TOKEN}",
        keywords="告警",  # type: ignore[arg-type]
    )
    assert s.keywords == ["告警"]
