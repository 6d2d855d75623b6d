"""The Telegram channel (worker/channels/telegram.py) against the Bot API emulator
(worker/devtools/emulators/telegram.py) over real HTTPS: sendMessage in HTML parse mode whose
parsed text is exactly the neutral text (Chinese and <, >, & included), 4096 UTF-16 units at
most, the Bot API's replies classified, flood control's retry_after honoured, keep-alive, a
dropped and a stalled connection, getMe/getChat as the probe, and the token nowhere."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from producer.event import event_from_dict
from tests.support.helpers import FakeClock
from worker.channels.registry import build_channel, load_channels
from worker.channels.telegram import (
    MAX_UNITS,
    TelegramChannel,
    TelegramSettings,
    render_html,
    utf16_units,
)
from worker.content import Alert, as_text, build_alert, build_digest, digest_as_text
from worker.devtools.emulators.telegram import TelegramEmulator, parse_html
from worker.errors import ConfigurationError, PermanentError, ThrottledError, TransientError
from worker.settings import first_error

TOKEN = "7012345678:AAHk3y-0f_th3-r0b0t-n0t-t0-b3-s33n-x"
OTHER = "7012345678:AAH-an0ther-t0ken-the-bot-d0es-not-have"
CHAT = -1001234567890
USER = 123456789


@pytest.fixture(scope="module")
def telegram_server(tls_ca):
    server = TelegramEmulator(token=TOKEN, chats=[CHAT, USER], ssl_context=tls_ca.server_context())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tg(telegram_server):
    telegram_server.reset()  # (its chats, no faults, nothing recorded)
    return telegram_server


@pytest.fixture
def make(tg, tls_ca):
    made: list[TelegramChannel] = []

    def factory(*, clock=None, **extra) -> TelegramChannel:
        fields = {
            "name": "desk",
            "type": "telegram",
            "chat_id": CHAT,
            "token": TOKEN,
            "api_base": tg.base_url,
            "ca_file": tls_ca.ca_file,
            "timeout_s": 1.0,
            **extra,
        }
        ch = TelegramChannel(
            TelegramSettings(**fields), priority=1, **({"clock": clock} if clock else {})
        )
        made.append(ch)
        return ch

    yield factory
    for ch in made:  # (closed by the test's loop: each test awaits ch.close() itself)
        assert ch.client.is_closed, "a test left its channel open"


def _alert(**fields) -> Alert:
    event = {"id": "ev1", "ts": 1796100000, "subject": "止损触发 600519", **fields}
    return build_alert(event_from_dict(event), event_id=event["id"])


def _secret_free(text: str) -> None:
    assert TOKEN not in text and TOKEN.split(":")[1] not in text


# --------------------------------------------------------------------------- the request
async def test_sends_html_whose_parsed_text_is_exactly_the_neutral_text(make, tg):
    ch = make()
    alert = _alert(
        subject="<b>止损</b> & 600519 > 1700",
        body="贵州茅台跌破止损线 2 < 3 && 4 > 1\n</pre><script>alert(1)</script> &amp; 不是实体",
        data={"symbol": "600519", "价格": 1700.5, "<side>": "SELL & run"},
        severity="critical",
        strategy="ma_cross",
    )
    try:
        receipt = await ch.send(0, alert, ["someone@example.com"])
    finally:
        await ch.close()
    assert receipt.channel == "desk" and receipt.mode == "http/1.1" and receipt.via_failover
    [req] = tg.requests
    assert req.method == "POST" and req.path == f"/bot{TOKEN}/sendMessage"
    [msg] = tg.messages
    assert msg.chat_id == str(CHAT) and req.json["chat_id"] == CHAT  # a number, not a string
    assert msg.text == as_text(alert)  # what the reader sees, character for character
    assert msg.params["parse_mode"] == "HTML"
    assert msg.params["link_preview_options"] == {"is_disabled": True}
    assert msg.params["disable_web_page_preview"] is True
    assert msg.params["disable_notification"] is False
    assert msg.entity_text("bold") == ["[CRITICAL] <b>止损</b> & 600519 > 1700", "CRITICAL"]
    assert msg.entity_text("pre") == ["symbol: 600519\n价格: 1700.50\n<side>: SELL & run"]
    assert "<script>" not in msg.source and "&lt;script&gt;" in msg.source


async def test_a_digest_is_one_message_with_its_subject_in_bold(make, tg):
    ch = make(chat_id=str(USER))
    events = [
        (f"d{i}", event_from_dict({"subject": f"信号 {i} <x>", "ts": 1796100000 + i}))
        for i in range(5)
    ]
    digest = build_digest(events, reason="telegram: rate limit 20/min reached")
    try:
        await ch.send(0, digest, [])
    finally:
        await ch.close()
    [msg] = tg.messages
    assert msg.text == digest_as_text(digest) and msg.chat_id == str(USER)
    assert msg.entity_text("bold") == [digest.subject]


async def test_username_chat_topic_and_silent_alerts_but_never_a_silent_critical(make, tg):
    tg.chats.add("@desk_alerts")
    tg.topics["@desk_alerts"] = {42}
    ch = make(chat_id="@desk_alerts", message_thread_id=42, disable_notification=True)
    try:
        await ch.send(0, _alert(severity="info"), [])
        await ch.send(0, _alert(severity="critical"), [])
    finally:
        await ch.close()
    sent = [r.json for r in tg.requests]
    assert [s["chat_id"] for s in sent] == ["@desk_alerts"] * 2
    assert [s["message_thread_id"] for s in sent] == [42, 42]
    assert [s["disable_notification"] for s in sent] == [True, False]


async def test_link_previews_can_be_kept(make, tg):
    ch = make(disable_web_page_preview=False)
    try:
        await ch.send(0, _alert(body="https://example.com/chart"), [])
    finally:
        await ch.close()
    assert tg.requests[0].json["link_preview_options"] == {"is_disabled": False}
    assert tg.requests[0].json["disable_web_page_preview"] is False


# -------------------------------------------------------------------------- size limits
@pytest.mark.parametrize(
    "fields",
    [
        {"body": "贵州茅台跌破止损线，立即平仓。" * 700},  # 10 500 characters, 31 500 bytes
        {"body": "📈🇨🇳" * 1500},  # 4 500 characters, 9 000 UTF-16 units
        {"body": "😀" * 2100},  # fewer than 4 000 characters, but 4 200 UTF-16 units
        {"body": "a < b & c > d " * 600},  # 8 400 characters, the escapes make it longer
        {"data": {f"字段{i:03d}": "值" * 60 for i in range(100)}},  # the rows alone too long
    ],
    ids=["chinese", "emoji-and-flags", "emoji-under-4000-characters", "escapes", "rows"],
)
async def test_a_long_alert_is_cut_with_a_marker_and_accepted(make, tg, fields):
    ch = make()
    alert = _alert(**fields)
    try:
        await ch.send(0, alert, [])
    finally:
        await ch.close()
    [msg] = tg.messages  # the emulator refuses more than 4096 units, as Telegram does
    assert msg.units <= MAX_UNITS < utf16_units(as_text(alert))
    assert msg.text.startswith(alert.subject + "\n") and "…(truncated)" in msg.text
    if "body" in fields:  # the text is cut first: data rows and event id survive
        assert msg.text.endswith("event ev1")
        parsed, _ = parse_html(render_html(alert))
        assert parsed == msg.text
    assert "\ufffd" not in msg.text and not any(0xD800 <= ord(c) <= 0xDFFF for c in msg.text)


async def test_a_digest_of_many_rows_keeps_the_oldest_and_says_how_many_more(make, tg):
    ch = make()
    events = [
        (f"r{i}", event_from_dict({"subject": f"成交 {i} 手 <买入>", "ts": 1796100000 + i}))
        for i in range(400)
    ]
    try:
        await ch.send(0, build_digest(events), [])
    finally:
        await ch.close()
    [msg] = tg.messages
    assert msg.units <= MAX_UNITS
    assert "成交 0 手 <买入>" in msg.text and "… and " in msg.text and "成交 399 手" not in msg.text


def test_render_html_fits_any_limit_in_utf16_units():
    alert = _alert(body="止损😀" * 2000)
    for limit in (200, 1000, 4000):
        parsed, _ = parse_html(render_html(alert, max_units=limit))
        assert limit - 4 <= utf16_units(parsed) <= limit  # cut as late as it can be
    assert render_html(_alert(body="short")).count("<b>") == 2  # a short one is as it is


# ----------------------------------------------------------------------- the replies
async def test_flood_control_retry_after_is_the_channels_cool_down(make, tg):
    clock = FakeClock()
    ch = make(clock=clock.monotonic)
    tg.flood_next(7)
    try:
        with pytest.raises(ThrottledError) as info:
            await ch.send(0, _alert(), [])
    finally:
        await ch.close()
    assert info.value.retry_after_s == 7.0 and info.value.code == 429
    assert "Too Many Requests" in str(info.value)
    ch.health.failed(info.value)
    assert ch.state == "throttled" and ch.retry_at() == clock.monotonic() + 7.0
    assert not ch.available()
    clock.advance(7.0)
    assert ch.available()


@pytest.mark.parametrize(
    ("setup", "kind", "hint"),
    [
        (lambda tg: tg.chats.discard(str(CHAT)), ConfigurationError, "check chat_id"),
        (lambda tg: tg.kicked.add(str(CHAT)), ConfigurationError, "add it to the group again"),
        (lambda tg: tg.migrated.update({str(CHAT): -1009}), ConfigurationError, "chat_id = -1009"),
        (lambda tg: setattr(tg, "revoked", True), ConfigurationError, "@BotFather"),
        (
            lambda tg: tg.error_next(403, "Forbidden: bot is not a member of the channel chat"),
            ConfigurationError,
            "add the bot",
        ),
        (
            lambda tg: tg.error_next(400, "Bad Request: not enough rights to send text messages"),
            ConfigurationError,
            "right to send",
        ),
        (
            lambda tg: tg.error_next(400, "Bad Request: can't parse entities: Unsupported tag"),
            PermanentError,
            None,
        ),
        (
            lambda tg: tg.error_next(400, "Bad Request: message is too long"),
            PermanentError,
            None,
        ),
        (lambda tg: tg.error_next(500, "Internal Server Error"), TransientError, None),
        (lambda tg: tg.fail_next(502, b"<html>502 Bad Gateway</html>"), TransientError, None),
        (
            lambda tg: tg.fail_next(429, b"slow down", headers={"Retry-After": "3"}),
            ThrottledError,
            None,
        ),
        (lambda tg: tg.fail_next(200, b"<html>welcome</html>"), ConfigurationError, "api_base"),
        (
            lambda tg: tg.error_next(400, f"Bad Request: bad token {TOKEN} in /bot{TOKEN}/x"),
            PermanentError,
            None,
        ),
    ],
    ids=[
        "chat-not-found",
        "kicked",
        "migrated",
        "revoked-token",
        "not-a-member",
        "no-rights",
        "cant-parse-entities",
        "too-long",
        "500",
        "502-html",
        "429-proxy",
        "200-not-the-bot-api",
        "description-with-the-token",
    ],
)
async def test_replies_are_classified_with_a_hint_and_no_token(make, tg, setup, kind, hint):
    ch = make()
    setup(tg)
    try:
        with pytest.raises(kind) as info:
            await ch.send(0, _alert(), [])
    finally:
        await ch.close()
    text = str(info.value)
    assert type(info.value) is kind and "\n" not in text
    assert hint is None or hint in (info.value.hint or "")
    _secret_free(text)
    if kind is ThrottledError:
        assert info.value.retry_after_s == 3.0
    if kind is ConfigurationError:
        ch.health.failed(info.value)
        assert ch.paused  # events stay queued; the deliverer fails over


async def test_a_blocked_bot_pauses_the_channel(make, tg):
    tg.blocked.add(str(USER))
    ch = make(chat_id=USER)
    try:
        with pytest.raises(ConfigurationError, match="blocked") as info:
            await ch.send(0, _alert(), [])
    finally:
        await ch.close()
    assert info.value.code == 403 and "Restart" in (info.value.hint or "")


async def test_a_wrong_topic_and_a_wrong_api_base_path_are_configuration(make, tg):
    tg.topics[str(CHAT)] = {1}
    topic = make(message_thread_id=99)
    wrong_path = make(api_base=tg.base_url + "/telegram")  # a proxy prefix that is not there
    try:
        with pytest.raises(ConfigurationError, match="thread not found"):
            await topic.send(0, _alert(), [])
        with pytest.raises(ConfigurationError) as info:
            await wrong_path.send(0, _alert(), [])
    finally:
        await topic.close()
        await wrong_path.close()
    assert info.value.code == 404 and "api_base" in (info.value.hint or "")


# ----------------------------------------------------------------------- connections
async def test_several_sends_share_one_kept_alive_connection(make, tg):
    ch = make()
    try:
        for i in range(4):
            await ch.send(0, _alert(subject=f"第 {i} 条"), [])
    finally:
        await ch.close()
    assert len(tg.messages) == 4 and tg.connections == 1


@pytest.mark.parametrize("fault", ["drop", "stall"])
async def test_a_dropped_or_stalled_connection_is_transient_and_the_channel_down(make, tg, fault):
    ch = make(timeout_s=0.3)
    if fault == "drop":
        tg.drop_next()
    else:
        tg.stall_next(1.0)
    try:
        with pytest.raises(TransientError) as info:
            await ch.send(0, _alert(), [])
        assert info.value.code is None
        _secret_free(str(info.value))
        ch.health.failed(info.value)
        assert ch.state == "down"
        await ch.send(0, _alert(), [])  # the next one goes through
    finally:
        await ch.close()
    assert len(tg.messages) == 1 and ch.health.succeeded() is False


# ------------------------------------------------------------------------------ probe
async def test_probe_asks_getme_and_getchat_and_sends_nothing(make, tg):
    ch = make()
    try:
        await ch.probe()
        assert [r.path.rsplit("/", 1)[1] for r in tg.requests] == ["getMe", "getChat"]
        tg.chats.discard(str(CHAT))
        with pytest.raises(ConfigurationError, match="chat not found"):
            await ch.probe()
        tg.revoked = True
        with pytest.raises(ConfigurationError) as info:
            await ch.probe()
    finally:
        await ch.close()
    assert info.value.code == 401 and tg.messages == []
    _secret_free(str(info.value))


# --------------------------------------------------------------------------- settings
def _settings(**fields) -> TelegramSettings:
    base = {"name": "desk", "type": "telegram", "chat_id": CHAT, "token": TOKEN}
    return TelegramSettings(**{**base, **fields})


def test_defaults_rate_and_no_secret_in_repr_dump_or_describe():
    s = _settings()
    ch = TelegramChannel(s, priority=0)
    assert s.api_base == "https://api.telegram.org" and s.host == "api.telegram.org"
    assert ch.per_minute == 20 and ch.kind == "telegram" and ch.service == "Telegram"
    assert TelegramChannel(_settings(rate_per_minute=5), priority=0).per_minute == 5
    for shown in (repr(s), str(s.model_dump()), json.dumps(ch.describe()), repr(ch)):
        _secret_free(shown)
    assert ch.describe()["host"] == "api.telegram.org"
    assert ch.request(_alert(), []).url == f"https://api.telegram.org/bot{TOKEN}/sendMessage"


def test_token_from_a_file_a_credential_or_with_the_bot_prefix(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert _settings(token=None, token_file=token_file).token.get_secret_value() == TOKEN
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "telegram_desk_token").write_text(TOKEN)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert _settings(token=None).token.get_secret_value() == TOKEN
    assert _settings(token=f"bot{TOKEN}").token.get_secret_value() == TOKEN
    assert _settings(chat_id=" -100123 ").chat_id == "-100123"


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        ({"token": None}, "", "token: missing"),
        ({"token": "12345"}, "", "not a bot token"),
        ({"token": f"https://api.telegram.org/bot{TOKEN}/sendMessage"}, "", "not a URL"),
        ({"token": None, "token_file": "/nonexistent/token"}, "", "token_file: "),
        ({"chat_id": "desk_alerts"}, "chat_id", "'@desk_alerts'"),
        ({"chat_id": "https://t.me/+abc"}, "chat_id", "not a chat id"),
        ({"chat_id": True}, "chat_id", "not a chat id"),
        ({"api_base": "http://api.telegram.org"}, "api_base", "loopback"),
        ({"api_base": f"https://api.telegram.org/bot{TOKEN}"}, "api_base", "without /bot"),
        ({"url": f"https://api.telegram.org/bot{TOKEN}/sendMessage"}, "url", "token"),
        ({"secret": "x"}, "secret", "not used by a telegram channel"),
        ({"type": "dingtalk"}, "type", "telegram"),
        ({"message_thread_id": 0}, "message_thread_id", "greater than"),
        ({"chat": CHAT}, "chat", "Extra inputs"),
    ],
)
def test_each_settings_mistake_is_one_line_naming_the_key(fields, where, says):
    with pytest.raises(ValidationError) as info:
        _settings(**fields)
    at, message, _raw = first_error(info.value)
    assert at == where and says in message and "\n" not in message
    _secret_free(message)
    _secret_free(str(info.value))


async def test_a_channels_file_table_builds_the_telegram_channel(tmp_path):
    token_file = tmp_path / "tg_token"
    token_file.write_text(TOKEN + "\n")
    path = tmp_path / "channels.toml"
    path.write_text(
        f"""
[[channel]]
name = "tg"
type = "telegram"
chat_id = {CHAT}
token_file = "{token_file}"
disable_notification = true
"""
    )
    [settings] = load_channels(path)
    ch = build_channel(settings, priority=0)
    try:
        assert isinstance(ch, TelegramChannel) and ch.per_minute == 20
        assert ch.request(_alert(), []).json["chat_id"] == CHAT
    finally:
        await ch.close()
    path.write_text('[[channel]]\nname = "tg"\ntype = "telegram"\nchat_id = 42\n')
    with pytest.raises(ValueError) as info:
        load_channels(path)
    assert str(info.value) == (
        f"NOTIFIER_CHANNELS_FILE={path}: channel 'tg': token: missing; give token, token_file "
        "or the systemd credential telegram_tg_token (the bot's token from @BotFather)"
    )
