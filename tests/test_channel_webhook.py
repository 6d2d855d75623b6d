"""The generic webhook channel (worker/channels/webhook.py) against a local HTTPS receiver
(worker/devtools/emulators/webhook.py): the documented version-1 payload, both signature
schemes (verified as the README's receiver does), custom headers kept secret, the size limit
with Chinese text, every reply class, keep-alive, a drop and a stall."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from producer.event import Event
from worker.channels.webhook import (
    WebhookChannel,
    WebhookSettings,
    notifier_signature,
    standard_signature,
)
from worker.content import TRUNCATED, Alert, Digest, as_text, build_alert, build_digest
from worker.devtools.emulators.webhook import WebhookEmulator
from worker.errors import ConfigurationError, PermanentError, ThrottledError, TransientError

NOW = 1_796_100_000  # the signature's fixed wall clock
TOKEN = "tok-5ecr3t-b34r3r-0000"
SECRET = "s1gn1ng-s3cr3t-of-the-desk"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
PATH_KEY = "p4th-k3y-9f8e7d6c"


def _event(**fields: Any) -> Event:
    base: dict[str, Any] = {
        "id": "wh-1",
        "ts": NOW - 2,
        "strategy": "ma_cross",
        "kind": "fill",
        "severity": "warning",
        "subject": "成交 600519 贵州茅台",
        "body": "价格跌破止损线\n第二行 *不是* markdown",
        "data": {"symbol": "600519.SH", "side": "buy", "price": 1700.505, "qty": 100},
    }
    return Event.model_validate({**base, **fields})


def _alert(**fields: Any) -> Alert:
    ev = _event(**fields)
    return build_alert(ev, event_id=ev.id or "wh-1", notes=("repeated 3× in 5 min",))


def _digest(n: int) -> Digest:
    items = [
        (f"d-{i}", _event(id=f"d-{i}", ts=NOW - 1000 + i, subject=f"信号 {i} 号", kind="signal"))
        for i in range(n)
    ]
    return build_digest(items, reason="desk: rate limit 20/min reached")


@pytest.fixture(scope="module")
def shared_receiver(tls_ca):
    # one server for the module: stopping one costs 0.5 s (serve_forever's poll)
    server = WebhookEmulator(ssl_context=tls_ca.server_context()).start()
    yield server
    server.stop()


@pytest.fixture
def receiver_factory(shared_receiver):
    """The module's receiver, configured afresh (a new test sees no earlier request)."""

    def make(
        *,
        secret: str | None = None,
        scheme: str = "notifier",
        headers: dict[str, str] | None = None,
        max_body: int | None = None,
        clock: Any = time.time,
    ) -> WebhookEmulator:
        server = shared_receiver
        server.clear_faults()
        with server._lock:
            server.requests.clear()
            server.received.clear()
            server.connections = 0
        server.secret, server.scheme, server.max_body, server.clock = (
            secret,
            scheme,
            max_body,
            clock,
        )
        server.required = {k.lower(): v for k, v in (headers or {}).items()}
        return server

    return make


@pytest.fixture
def receiver(receiver_factory) -> WebhookEmulator:
    return receiver_factory(clock=lambda: NOW)


@pytest.fixture
async def channels():
    made: list[WebhookChannel] = []
    yield made
    for ch in made:
        await ch.close()


def _settings(server: WebhookEmulator, tls_ca, **extra: Any) -> WebhookSettings:
    fields: dict[str, Any] = {
        "name": "desk",
        "url": server.url,
        "ca_file": tls_ca.ca_file,
        "timeout_s": 1.0,
        **extra,
    }
    return WebhookSettings.model_validate(fields)


def _channel(server: WebhookEmulator, tls_ca, channels, **extra: Any) -> WebhookChannel:
    ch = WebhookChannel(
        _settings(server, tls_ca, **extra), priority=0, wall_clock=lambda: NOW + 0.9
    )
    channels.append(ch)
    return ch


# ---------------------------------------------------------------------- the payload
async def test_an_alert_is_the_documented_payload_on_one_kept_alive_connection(
    receiver, tls_ca, channels
):
    ch = _channel(receiver, tls_ca, channels)
    alert = _alert()
    for _ in range(3):
        receipt = await ch.send(0, alert, ["ignored@example.com"])
    assert receipt.channel == "desk" and receipt.subject == "成交 600519 贵州茅台"
    assert receiver.connections == 1 and len(receiver.received) == 3
    req = receiver.requests[0]
    assert req.method == "POST" and req.path == "/hooks/notifier"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"].startswith("notifier/")
    assert "x-notifier-signature" not in req.headers  # no secret: not signed
    assert "贵州茅台".encode() in req.body  # UTF-8 as is, never \\uXXXX
    payload = receiver.received[0]
    assert set(payload) == {
        "v",
        "type",
        "id",
        "subject",
        "severity",
        "strategy",
        "kind",
        "text",
        "markdown",
        "data",
        "notes",
        "ts",
        "produced",
        "truncated",
        "digest",
    }
    assert payload["v"] == 1 and payload["type"] == "alert" and payload["id"] == "wh-1"
    assert payload["subject"] == "成交 600519 贵州茅台"
    assert (payload["severity"], payload["strategy"], payload["kind"]) == (
        "warning",
        "ma_cross",
        "fill",
    )
    assert payload["text"] == as_text(alert)
    assert "第二行 \\*不是\\* markdown" in payload["markdown"]
    # data as the strategy sent it: numbers stay numbers, no rounding
    assert payload["data"] == {"symbol": "600519.SH", "side": "buy", "price": 1700.505, "qty": 100}
    assert payload["notes"] == ["repeated 3× in 5 min"]
    assert payload["ts"] == NOW - 2 and payload["produced"]
    assert payload["truncated"] is False and payload["digest"] is None


async def test_a_digest_carries_its_rows_and_counts(receiver, tls_ca, channels):
    ch = _channel(receiver, tls_ca, channels)
    digest = _digest(3)
    await ch.send(0, digest, [])
    payload = receiver.received[0]
    assert payload["type"] == "digest" and payload["kind"] == "digest"
    assert payload["id"].startswith("digest-") and payload["subject"] == digest.subject
    assert payload["severity"] == "warning" and payload["strategy"] == "ma_cross"
    assert payload["notes"] == ["desk: rate limit 20/min reached"]
    d = payload["digest"]
    assert d["count"] == 3 and d["omitted"] == 0 and d["kinds"] == {"signal": 3}
    assert [r["id"] for r in d["rows"]] == ["d-0", "d-1", "d-2"]
    assert d["rows"][0]["subject"] == "信号 0 号" and d["rows"][0]["data"]["price"] == "1700.51"
    # the same events make the same id (a receiver can drop a repeated digest)
    assert WebhookChannel.body(ch, _digest(3)) == WebhookChannel.body(ch, digest)


# ---------------------------------------------------------------------- signing
def test_the_notifier_signature_is_hmac_sha256_of_timestamp_dot_body():
    body = b'{"v":1}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert notifier_signature("k", 1700000000, body) == "sha256=" + expected


def test_the_standard_signature_matches_the_specs_test_vector():
    # libraries/python/tests/test_webhooks.py::test_sign_function, standard-webhooks repository
    sig = standard_signature(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


async def test_a_signed_alert_verifies_as_the_readme_receiver_does(
    receiver_factory, tls_ca, channels
):
    server = receiver_factory(secret=SECRET, clock=lambda: NOW)
    ch = _channel(server, tls_ca, channels, secret=SECRET)
    await ch.send(0, _alert(), [])
    assert len(server.received) == 1  # the emulator verified it
    req = server.requests[0]
    assert req.headers["x-notifier-timestamp"] == str(NOW)  # the injected wall clock
    # the README's five lines, as a receiver would write them
    ts = req.headers["x-notifier-timestamp"]
    mac = hmac.new(SECRET.encode(), ts.encode() + b"." + req.body, hashlib.sha256)
    assert hmac.compare_digest("sha256=" + mac.hexdigest(), req.headers["x-notifier-signature"])
    assert abs(NOW - int(ts)) <= 300


# the README's receiver, verbatim (headers: the request's, case-insensitive as in Flask)
README_RECEIVER = """
import hashlib, hmac, time

def verify(secret: bytes, headers, body: bytes) -> bool:
    ts = headers["X-Notifier-Timestamp"]
    mac = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(ts)) < 300  # older: a replay
    return fresh and hmac.compare_digest("sha256=" + mac, headers["X-Notifier-Signature"])
"""


async def test_the_readme_receiver_verifies_a_real_request(receiver, tls_ca, channels):
    settings = _settings(receiver, tls_ca, secret=SECRET)
    ch = WebhookChannel(settings, priority=0)  # the real wall clock
    channels.append(ch)
    receiver.clock = time.time
    await ch.send(0, _alert(), [])
    req = receiver.requests[0]
    scope: dict[str, Any] = {}
    exec(README_RECEIVER, scope)  # the documented snippet itself
    headers = httpx.Headers(req.headers)
    assert scope["verify"](SECRET.encode(), headers, req.body) is True
    assert (
        scope["verify"](SECRET.encode(), headers, req.body.replace(b"ma_cross", b"ma_crosz"))
        is False
    )
    assert scope["verify"](b"wrong", headers, req.body) is False


async def test_a_replayed_or_forged_request_is_refused_by_the_receiver(
    receiver_factory, tls_ca, channels
):
    server = receiver_factory(secret=SECRET, clock=lambda: NOW + 600)  # 10 min later
    ch = _channel(server, tls_ca, channels, secret=SECRET)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    assert "tolerance" in str(info.value) and "secret" in str(info.value)
    assert SECRET not in str(info.value)
    server.clock = lambda: NOW
    forged = _channel(server, tls_ca, channels, secret="an0ther-s3cr3t")
    with pytest.raises(ConfigurationError, match="bad signature"):
        await forged.send(0, _alert(), [])
    await ch.send(0, _alert(), [])  # the right secret, in time
    assert len(server.received) == 1


async def test_standard_webhooks_headers_verify_and_the_id_is_the_event_id(
    receiver_factory, tls_ca, channels
):
    server = receiver_factory(secret=STANDARD_SECRET, scheme="standard", clock=lambda: NOW)
    ch = _channel(server, tls_ca, channels, secret=STANDARD_SECRET, signature="standard")
    await ch.send(0, _alert(), [])
    await ch.send(0, _alert(), [])  # a retry: the same webhook-id
    assert len(server.received) == 2
    first, again = server.requests
    assert first.headers["webhook-id"] == again.headers["webhook-id"] == "wh-1"
    assert first.headers["webhook-timestamp"] == str(NOW)
    assert first.headers["webhook-signature"].startswith("v1,")
    assert "x-notifier-signature" not in first.headers


# ---------------------------------------------------------------------- custom headers
async def test_custom_headers_are_sent_and_their_values_never_shown(
    receiver_factory, tls_ca, channels
):
    server = receiver_factory(headers={"Authorization": f"Bearer {TOKEN}"})
    ch = _channel(server, tls_ca, channels, headers={"Authorization": f"Bearer {TOKEN}"})
    await ch.send(0, _alert(), [])
    assert server.requests[0].headers["authorization"] == f"Bearer {TOKEN}"
    for shown in (repr(ch.settings), str(ch.settings.model_dump()), str(ch.describe())):
        assert TOKEN not in shown
    assert ch.describe()["headers"] == ["Authorization"]


async def test_a_refused_token_pauses_the_channel_and_an_echo_of_it_is_masked(
    receiver, tls_ca, channels
):
    url = f"{receiver.base_url}/hooks/notifier?key={PATH_KEY}"
    ch = _channel(receiver, tls_ca, channels, url=url, headers={"X-Api-Key": TOKEN}, secret=SECRET)
    echo = {"error": f"bad key {TOKEN} for {url} with {SECRET} and {PATH_KEY}"}
    receiver.fail_next(401, echo)
    with pytest.raises(ConfigurationError) as info:
        await ch.send(0, _alert(), [])
    text = f"{info.value} {info.value!r} {info.value.hint}"
    for secret in (TOKEN, SECRET, PATH_KEY, url):
        assert secret not in text
    assert "bad key ***" in text and "Authorization" in text
    ch.health.failed(info.value)
    assert ch.paused


def test_headers_from_a_file_or_a_systemd_credential(tmp_path, monkeypatch):
    url = "https://hooks.example.com/in"
    f = tmp_path / "h"
    f.write_text(f"# the desk's gateway\nAuthorization: Bearer {TOKEN}\n\nX-Desk: 上海\n")
    with pytest.raises(ValueError, match=r"headers_file line 4: .*X-Desk.*printable ASCII") as e:
        WebhookSettings(name="d", url=url, headers_file=f)
    assert TOKEN not in str(e.value)
    f.write_text(f"# the desk's gateway\nAuthorization: Bearer {TOKEN}\n\nX-Desk: sh\n")
    s = WebhookSettings(name="d", url=url, headers_file=f, headers={"X-Team": "quant"})
    assert {k: v.get_secret_value() for k, v in s.headers.items()} == {
        "X-Team": "quant",
        "Authorization": f"Bearer {TOKEN}",
        "X-Desk": "sh",
    }
    assert TOKEN not in repr(s)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "webhook_d_headers").write_text(f"Authorization: Bearer {TOKEN}\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = WebhookSettings(name="d", url=url)
    assert s.headers["Authorization"].get_secret_value() == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("fields", "file_text", "message"),
    [
        ({}, f"Authorization Bearer {TOKEN}\n", r"headers_file line 1: expected 'Name: value'"),
        ({}, f"Authorization: a\nauthorization: {TOKEN}\n", r"line 2: authorization .*twice"),
        ({"headers": {"Authorization": TOKEN}}, "Authorization: x\n", r"also in headers"),
        ({"headers": {"Content-Type": "text/plain"}}, None, r"Content-Type is set by"),
        ({"headers": {"X-Notifier-Signature": TOKEN}}, None, r"set by the notifier"),
        ({"headers": {"Bad Name": TOKEN}}, None, r"not a valid HTTP header name"),
        ({"headers": {"X-K": f"{TOKEN}\r\nX-Injected: 1"}}, None, r"printable ASCII on one"),
        ({"headers": {"A": "1", "a": "2"}}, None, r"headers: a is given twice"),
        ({"url": None}, None, r"no url; set url, url_file or the systemd credential"),
        ({"signature": "standard"}, None, r'signature = "standard" needs a secret'),
        ({"signature": "standard", "secret": f"not base64 {TOKEN}"}, None, r"whsec_<base64>"),
        ({"secret": ""}, None, r"secret is empty"),
        ({"max_bytes": 1000}, None, r"greater than or equal to 4096"),
        ({"type": "wecom"}, None, r"'webhook'"),
        ({"url": f"http://hooks.example.com/{TOKEN}"}, None, r"loopback"),
    ],
)
def test_each_mistake_is_one_clear_error_without_the_secret(tmp_path, fields, file_text, message):
    extra: dict[str, Any] = {"url": "https://hooks.example.com/in", **fields}
    if extra["url"] is None:
        del extra["url"]
    if file_text is not None:
        f = tmp_path / "headers"
        f.write_text(file_text)
        extra["headers_file"] = f
    with pytest.raises(ValueError, match=message) as info:
        WebhookSettings(name="d", **extra)
    assert len(info.value.errors()) == 1  # type: ignore[attr-defined]
    assert TOKEN not in str(info.value).split("input_value")[0]
    first = info.value.errors()[0]  # type: ignore[attr-defined]
    assert TOKEN not in first["msg"]


# ---------------------------------------------------------------------- size limits
def _fits(body: bytes, limit: int) -> dict[str, Any]:
    assert len(body) <= limit
    return json.loads(body.decode("utf-8"))  # never a broken UTF-8 sequence


async def test_a_long_chinese_alert_is_cut_to_max_bytes_with_a_marker(
    receiver_factory, tls_ca, channels
):
    server = receiver_factory(max_body=4096)
    ch = _channel(server, tls_ca, channels, max_bytes=4096)
    body_text = "价格跌破止损线，立即减仓。" * 400  # ~15 KB of Chinese
    alert = _alert(body=body_text)
    await ch.send(0, alert, [])
    assert len(server.requests[0].body) <= 4096
    payload = server.received[0]
    assert payload["truncated"] is True
    assert payload["subject"] == "成交 600519 贵州茅台" and payload["data"]["price"] == 1700.505
    for key in ("text", "markdown"):
        assert TRUNCATED in payload[key]
        kept = payload[key].split(TRUNCATED)[0].rsplit("\n\n", 1)[-1]
        assert body_text.startswith(kept) and len(kept) > 300  # Chinese exact, whole chars
    assert "event wh-1" in payload["text"]  # the footer survives the cut
    # a small alert is untouched by the same limit
    assert _fits(ch.body(_alert()), 4096)["truncated"] is False


def test_a_data_table_larger_than_the_limit_is_left_to_the_text():
    s = WebhookSettings(name="d", url="https://hooks.example.com/in", max_bytes=4096)
    ch = WebhookChannel(s, priority=0)
    data = {f"字段{i}": "值" * 100 for i in range(60)}  # ~18 KB of data
    payload = _fits(ch.body(_alert(data=data, body="短")), 4096)
    assert payload["data"] == {} and payload["truncated"] is True
    assert payload["subject"] == "成交 600519 贵州茅台" and "字段0" in payload["text"]


def test_a_large_digest_keeps_its_oldest_rows_within_the_limit():
    s = WebhookSettings(name="d", url="https://hooks.example.com/in", max_bytes=8192)
    ch = WebhookChannel(s, priority=0)
    started = time.perf_counter()
    payload = _fits(ch.body(_digest(300)), 8192)
    assert time.perf_counter() - started < 2.0
    d = payload["digest"]
    assert d["count"] == 300 and 0 < len(d["rows"]) < 300
    assert d["omitted"] == 300 - len(d["rows"])
    assert [r["id"] for r in d["rows"]] == [f"d-{i}" for i in range(len(d["rows"]))]
    assert payload["truncated"] is True and "300 alerts" in payload["text"]
    assert "more" in payload["text"]


# ---------------------------------------------------------------------- replies
@pytest.mark.parametrize(
    ("status", "headers", "kind", "words"),
    [
        (429, {"Retry-After": "7"}, ThrottledError, "Too Many Requests"),
        (500, {}, TransientError, "Internal Server Error"),
        (502, {}, TransientError, "Bad Gateway"),
        (503, {"Retry-After": "2"}, TransientError, "Service Unavailable"),
        (408, {}, TransientError, "Request Timeout"),
        (401, {}, ConfigurationError, "Authorization"),
        (403, {}, ConfigurationError, "Authorization"),
        (404, {}, ConfigurationError, "check the channel's url"),
        (410, {}, ConfigurationError, "check the channel's url"),
        (301, {"Location": "https://elsewhere.example.com/"}, ConfigurationError, "redirect"),
        (307, {"Location": "/other"}, ConfigurationError, "redirect"),
        (400, {}, PermanentError, 'Bad Request: {"error": "nope"}'),
        (422, {}, PermanentError, "Unprocessable"),
        (413, {}, PermanentError, "lower max_bytes"),
    ],
)
async def test_each_reply_class(receiver, tls_ca, channels, status, headers, kind, words):
    url = f"{receiver.base_url}/hooks/notifier?key={PATH_KEY}"
    ch = _channel(receiver, tls_ca, channels, url=url)
    receiver.fail_next(status, {"error": "nope"}, headers=headers)
    with pytest.raises(kind) as info:
        await ch.send(0, _alert(), [])
    err = info.value
    assert err.code == status and words in str(err)
    assert PATH_KEY not in str(err) and "/hooks" not in str(err)
    assert len(receiver.requests) == 1  # a redirect is not followed
    if "Retry-After" in headers:
        assert err.retry_after_s == float(headers["Retry-After"])
    if status == 429:
        ch.health.failed(err)
        assert ch.state == "throttled"
        assert 6.9 < ch.retry_at() - time.monotonic() <= 7.0


@pytest.mark.parametrize("status", [200, 201, 202])
async def test_any_2xx_is_sent(receiver, tls_ca, channels, status):
    ch = _channel(receiver, tls_ca, channels)
    receiver.fail_next(status, {"queued": True})
    receipt = await ch.send(0, _alert(), [])
    assert receipt.channel == "desk"


@pytest.mark.parametrize("fault", ["drop", "stall"])
async def test_a_drop_or_a_stall_is_transient_and_the_next_send_works(
    receiver, tls_ca, channels, fault
):
    url = f"{receiver.base_url}/hooks/notifier?key={PATH_KEY}"
    ch = _channel(receiver, tls_ca, channels, url=url, timeout_s=0.5)
    if fault == "drop":
        receiver.drop_next()
    else:
        receiver.stall_next(1.0)
    with pytest.raises(TransientError) as info:
        await ch.send(0, _alert(), [])
    assert info.value.code is None and PATH_KEY not in str(info.value)
    assert "127.0.0.1" in str(info.value)
    ch.health.failed(info.value)
    assert ch.state == "down"
    await ch.send(0, _alert(), [])
    assert len(receiver.received) == 1


def test_no_rate_limit_by_default_and_one_when_set():
    url = "https://hooks.example.com/in"
    assert WebhookChannel(WebhookSettings(name="d", url=url), priority=0).per_minute == 0
    s = WebhookSettings(name="d", url=url, rate_per_minute=30)
    assert WebhookChannel(s, priority=0).per_minute == 30


def test_the_url_and_secrets_never_show_in_repr_or_describe(tmp_path: Path):
    url_file = tmp_path / "url"
    url_file.write_text(f"https://hooks.example.com/in/{PATH_KEY}\n")
    s = WebhookSettings(
        name="d", url_file=url_file, secret=SECRET, headers={"Authorization": TOKEN}
    )
    ch = WebhookChannel(s, priority=0)
    shown = f"{s!r} {s.model_dump()} {ch.describe()}"
    for secret in (PATH_KEY, SECRET, TOKEN):
        assert secret not in shown
    assert ch.describe()["host"] == "hooks.example.com" and ch.describe()["signed"] == "notifier"
