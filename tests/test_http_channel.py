"""The HTTP channel base (worker/channels/http.py) against a local HTTPS emulator: one
keep-alive client, its own CA, statuses and transport faults classified the same for every
service, Retry-After honoured, no URL (which holds the key) in any message."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from producer.event import parse_event
from worker.channels.http import HttpChannel, HttpChannelSettings, HttpRequest
from worker.content import Alert, Digest, build_alert
from worker.devtools.http_server import HttpEmulator
from worker.errors import ConfigurationError, PermanentError, ThrottledError, TransientError

KEY = "k3y-0f-th3-r0b0t"


class EchoChannel(HttpChannel):
    kind = "echo"
    service = "Echo"

    def request(self, content: Alert | Digest, recipients: Sequence[str]) -> HttpRequest:
        assert self.settings.url is not None
        url = self.settings.url.get_secret_value()
        return HttpRequest(url, json={"text": content.subject}, params={"sign": "s1"})


@pytest.fixture
def emulator(tls_ca):
    server = HttpEmulator(ssl_context=tls_ca.server_context()).start()
    yield server
    server.stop()


def _channel(emulator, tls_ca, **extra) -> EchoChannel:
    settings = HttpChannelSettings(
        name="desk",
        type="echo",
        url=f"{emulator.base_url}/send?key={KEY}",
        ca_file=tls_ca.ca_file,
        timeout_s=1.0,
        **extra,
    )
    return EchoChannel(settings, priority=1)


def _alert() -> Alert:
    event = parse_event('{"id": "h1", "subject": "止损 600519", "ts": 1796100000}')
    return build_alert(event, event_id="h1")


async def test_sends_on_one_kept_alive_connection_over_tls_with_its_own_ca(emulator, tls_ca):
    ch = _channel(emulator, tls_ca)
    try:
        for _ in range(3):
            receipt = await ch.send(0, _alert(), ["x"])
        assert receipt.channel == "desk" and receipt.mode.startswith("http/")
        assert [r.json for r in emulator.requests] == [{"text": "止损 600519"}] * 3
        assert emulator.requests[0].query == {"key": KEY, "sign": "s1"}  # both kept
        assert emulator.connections == 1
    finally:
        await ch.close()


@pytest.mark.parametrize(
    ("status", "headers", "kind"),
    [
        (429, {"Retry-After": "7"}, ThrottledError),
        (500, {}, TransientError),
        (503, {}, TransientError),
        (408, {}, TransientError),
        (404, {}, ConfigurationError),
        (401, {}, ConfigurationError),
        (400, {}, PermanentError),
    ],
)
async def test_statuses_are_classified(emulator, tls_ca, status, headers, kind):
    ch = _channel(emulator, tls_ca)
    emulator.fail_next(status, {"error": "x"}, headers=headers)
    try:
        with pytest.raises(kind) as info:
            await ch.send(0, _alert(), ["x"])
        assert KEY not in str(info.value) and "/send" not in str(info.value)
        if status == 429:
            assert info.value.retry_after_s == 7.0
            ch.health.failed(info.value)
            assert 6.9 < ch.retry_at() - time.monotonic() <= 7.0
    finally:
        await ch.close()


@pytest.mark.parametrize("fault", ["drop", "stall", "refused"])
async def test_transport_faults_are_transient_and_name_no_url(emulator, tls_ca, fault):
    ch = _channel(emulator, tls_ca)
    if fault == "drop":
        emulator.drop_next()
    elif fault == "stall":
        emulator.stall_next(2.0)
    else:
        emulator.stop()
    try:
        with pytest.raises(TransientError) as info:
            await ch.send(0, _alert(), ["x"])
        assert info.value.code is None  # no reply at all: the channel is down
        assert KEY not in str(info.value)
        ch.health.failed(info.value)
        assert ch.state == "down"
    finally:
        await ch.close()


async def test_a_certificate_it_does_not_trust_is_a_configuration_error(emulator, tls_ca):
    settings = HttpChannelSettings(name="desk", type="echo", url=f"{emulator.base_url}/s?key={KEY}")
    ch = EchoChannel(settings, priority=0)
    try:
        with pytest.raises(ConfigurationError) as info:
            await ch.send(0, _alert(), ["x"])
        assert "ca_file" in str(info.value) and KEY not in str(info.value)
    finally:
        await ch.close()


def test_plain_http_only_to_loopback_and_secrets_from_files(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        HttpChannelSettings(name="d", type="echo", url="http://oapi.dingtalk.com/robot?x=1")
    url_file = tmp_path / "url"
    url_file.write_text(f"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={KEY}\n")
    s = HttpChannelSettings(name="d", type="echo", url_file=url_file)
    assert s.host == "qyapi.weixin.qq.com"
    assert KEY not in repr(s) and KEY not in str(s.model_dump())


async def test_warm_up_opens_the_connection_the_first_send_then_uses(emulator, tls_ca):
    ch = _channel(emulator, tls_ca)
    try:
        assert await ch.warm_up() == []
        assert emulator.warmups == 1 and emulator.requests == []  # HEAD /, nothing sent
        await ch.send(0, _alert(), ["x"])
        assert emulator.connections == 1  # the alert went on the warm connection
    finally:
        await ch.close()
    ch = _channel(emulator, tls_ca)
    emulator.stop()
    try:
        (err,) = await ch.warm_up()  # the service is down: said, not raised
        assert isinstance(err, TransientError) and KEY not in str(err)
    finally:
        await ch.close()
