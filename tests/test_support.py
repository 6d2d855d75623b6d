"""The shared fixtures work: private Redis, the SMTP test server, TLS, worker processes."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import redis
import redis.asyncio

from tests.support.helpers import wait_for_log
from worker.devtools import free_port
from worker.devtools.redis_server import RedisServer, RedisServerError
from worker.devtools.smtp_server import SMTPTestServer

CLIENT_NAME = "client.test"  # aiosmtplib would otherwise ask socket.getfqdn()
USER, PASSWORD = "trader@example.com", "app-password-授权码"


def make_message(
    subject: str = "止损触发 ma_cross", to: tuple[str, ...] = ("a@example.com",)
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "量化提醒 <alerts@example.com>"
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    message.set_content("价格 3012.5\n")
    return message


async def send(
    server: SMTPTestServer, message: EmailMessage | None = None, **kwargs: Any
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    return await aiosmtplib.send(
        message or make_message(),
        hostname=server.host,
        port=server.port,
        local_hostname=CLIENT_NAME,
        timeout=5,
        **kwargs,
    )


# -- Redis -------------------------------------------------------------------------------


async def test_private_redis_answers_and_is_not_6379(redis_server, redis_url):
    assert redis_server.running
    assert redis_server.port != 6379
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.ping()
        await client.set("notifier:test", "值")
        assert await client.get("notifier:test") == "值".encode()
        await client.set("leftover", "1")  # the next test's redis_url must flush it
    finally:
        await client.aclose()


def test_redis_url_is_flushed(redis_url):
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


def test_appendonly_restart_keeps_data_even_after_sigkill(redis_factory):
    server = redis_factory(appendonly=True)
    port = server.port
    client = redis.Redis.from_url(server.url)
    client.rpush("notifier:queue", "e1", "e2")
    client.close()
    server.kill()
    assert not server.running
    server.restart()
    assert server.port == port
    client = redis.Redis.from_url(server.url)
    try:
        assert client.lrange("notifier:queue", 0, -1) == [b"e1", b"e2"]
    finally:
        client.close()


def test_without_appendonly_restart_forgets(redis_factory):
    server = redis_factory()
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    client.close()
    server.restart()
    client = redis.Redis.from_url(server.url)
    try:
        assert client.get("k") is None
    finally:
        client.close()


def test_redis_start_failure_reports_the_log(tmp_path):
    server = RedisServer(dir=tmp_path / "bad", extra_args=("--no-such-option", "1"))
    with pytest.raises(RedisServerError, match="no-such-option"):
        server.start()
    assert not server.running


def test_free_port_is_bindable():
    port = free_port()
    assert 1024 <= port <= 65535 and port != 6379


# -- SMTP: plain -------------------------------------------------------------------------


async def test_plain_send_is_recorded(smtp_server):
    message = make_message(to=("a@example.com", "b@example.com"))
    errors, _ = await send(smtp_server, message)
    assert errors == {}
    (received,) = smtp_server.wait_for(1, timeout=2)
    assert received.mail_from == "alerts@example.com"
    assert received.rcpt_tos == ["a@example.com", "b@example.com"]
    assert received.message["Subject"] == "止损触发 ma_cross"
    assert received.message.get_content() == "价格 3012.5\n"
    assert b"\r\nSubject: " in received.data  # data: the bytes as sent, CRLF and all
    assert abs(received.received_at - time.time()) < 5
    assert (smtp_server.connections, smtp_server.transactions) == (1, 1)
    assert (smtp_server.failed, smtp_server.dropped, smtp_server.logins) == (0, 0, 0)
    smtp_server.clear()
    assert smtp_server.messages == []


async def test_wait_for_reports_how_many_arrived(smtp_server):
    await send(smtp_server)
    with pytest.raises(AssertionError, match=r"at least 3 .* 1 arrived"):
        smtp_server.wait_for(3, timeout=0.05)
    with pytest.raises(AssertionError, match="1 arrived"):
        await smtp_server.wait_for_async(2, timeout=0.05)
    assert len(await smtp_server.wait_for_async(1, timeout=1)) == 1


async def test_pipelining_advertised_only_when_asked(smtp_factory):
    for pipelining in (False, True):
        server = smtp_factory(pipelining=pipelining)
        async with aiosmtplib.SMTP(
            hostname=server.host, port=server.port, local_hostname=CLIENT_NAME, timeout=5
        ) as client:
            assert client.supports_extension("pipelining") is pipelining
            assert client.supports_extension("8bitmime")


async def test_pipelined_commands_are_answered_in_order(smtp_factory):
    server = smtp_factory(pipelining=True)
    server.fail_next("RCPT", 550, "5.1.1 no such user")
    reader, writer = await asyncio.open_connection(server.host, server.port)

    async def replies(n: int) -> list[bytes]:
        return [(await reader.readline())[:3] for _ in range(n)]

    try:
        assert await replies(1) == [b"220"]
        writer.write(b"EHLO client.test\r\n")
        while not (line := await reader.readline()).startswith(b"250 "):
            assert line.startswith(b"250-")
        # RFC 2920: MAIL, RCPT and DATA in one write; the content only after the 354.
        group = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
        writer.write(group)
        assert await replies(3) == [b"250", b"550", b"503"]
        writer.write(b"RSET\r\n" + group)
        assert await replies(4) == [b"250", b"250", b"250", b"354"]
        writer.write(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert await replies(2) == [b"250", b"221"]
    finally:
        writer.close()
        await writer.wait_closed()
    (received,) = server.wait_for(1, timeout=2)
    assert received.rcpt_tos == ["b@example.com"] and received.message["Subject"] == "x"


# -- SMTP: TLS and AUTH ------------------------------------------------------------------


async def test_implicit_tls_with_auth_plain_and_login(smtp_factory, tls_ca):
    server = smtp_factory(tls="ssl", auth={USER: PASSWORD})
    for method in ("auth_plain", "auth_login"):
        async with aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            use_tls=True,
            tls_context=tls_ca.client_context(),  # validates the certificate and name
            local_hostname=CLIENT_NAME,
            timeout=5,
        ) as client:
            await client.ehlo()
            assert client.supports_extension("auth")
            assert {"plain", "login"} <= set(client.server_auth_methods)
            response = await getattr(client, method)(USER, PASSWORD)
            assert response.code == 235
            await client.send_message(make_message(subject=method))
    received = server.wait_for(2, timeout=2)
    assert [r.message["Subject"] for r in received] == ["auth_plain", "auth_login"]
    assert server.logins == 2 and server.connections == 2


async def test_implicit_tls_rejects_a_client_that_does_not_trust_the_ca(smtp_factory):
    server = smtp_factory(tls="ssl")
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await send(server, use_tls=True)  # system CAs only: the trustme CA is unknown


async def test_auth_is_required(smtp_factory, tls_ca):
    server = smtp_factory(tls="ssl", auth={USER: PASSWORD})
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(server, use_tls=True, tls_context=tls_ca.client_context())
    assert refused.value.code == 530


async def test_starttls_with_auth(smtp_factory, tls_ca):
    server = smtp_factory(tls="starttls", auth={USER: PASSWORD})
    async with aiosmtplib.SMTP(
        hostname=server.host,
        port=server.port,
        start_tls=False,
        local_hostname=CLIENT_NAME,
        timeout=5,
    ) as client:
        await client.ehlo()
        assert client.supports_extension("starttls")
        assert not client.supports_extension("auth")  # only after STARTTLS
        await client.starttls(tls_context=tls_ca.client_context())
        await client.ehlo()
        assert client.supports_extension("auth")
        await client.login(USER, PASSWORD)
        await client.send_message(make_message())
    await send(
        server,
        start_tls=True,
        tls_context=tls_ca.client_context(),
        username=USER,
        password=PASSWORD,
    )
    assert len(server.wait_for(2, timeout=2)) == 2
    assert server.logins == 2


async def test_starttls_is_required(smtp_factory):
    server = smtp_factory(tls="starttls")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await send(server, start_tls=False)
    assert refused.value.code == 530


async def test_wrong_password_and_auth_fail(smtp_factory, tls_ca):
    server = smtp_factory(tls="ssl", auth={USER: PASSWORD})
    tls = {"use_tls": True, "tls_context": tls_ca.client_context()}
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as wrong:
        await send(server, username=USER, password="wrong", **tls)
    assert wrong.value.code == 535
    server.auth_fail(535, "5.7.8 Error: authentication failed")
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as rejected:
        await send(server, username=USER, password=PASSWORD, **tls)
    assert rejected.value.code == 535
    assert "authentication failed" in rejected.value.message
    server.auth_fail(None)
    await send(server, username=USER, password=PASSWORD, **tls)
    assert server.logins == 1 and len(server.messages) == 1


# -- SMTP: fault injection ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "code", "error"),
    [
        ("MAIL", 451, aiosmtplib.SMTPSenderRefused),
        ("RCPT", 550, aiosmtplib.SMTPRecipientsRefused),
        ("DATA", 554, aiosmtplib.SMTPDataError),
    ],
)
async def test_fail_next(smtp_server, stage, code, error):
    smtp_server.fail_next(stage, code, "4.7.1 injected", count=2)
    message = make_message(to=("a@example.com", "b@example.com"))
    for _ in range(2):
        with pytest.raises(error) as failed:
            await send(smtp_server, message)
        if stage == "RCPT":
            assert [e.code for e in failed.value.recipients] == [code, code]
        else:
            assert failed.value.code == code
            assert "injected" in failed.value.message
    await send(smtp_server, message)
    assert len(smtp_server.messages) == 1
    assert smtp_server.failed == 2 and smtp_server.transactions == 3


async def test_drop_next(smtp_server):
    smtp_server.drop_next()
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(smtp_server)
    assert smtp_server.dropped == 1 and smtp_server.messages == []
    await send(smtp_server)
    assert len(smtp_server.messages) == 1


async def test_drop_next_over_starttls(smtp_factory, tls_ca):
    server = smtp_factory(tls="starttls", auth={USER: PASSWORD})
    server.drop_next()
    kwargs = {"tls_context": tls_ca.client_context(), "username": USER, "password": PASSWORD}
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(server, **kwargs)
    await send(server, **kwargs)
    assert server.dropped == 1 and len(server.messages) == 1


async def test_random_faults_at_rate_one(smtp_server):
    smtp_server.set_random_faults(1.0, code=421, text="4.3.2 busy", seed=7)
    for _ in range(3):
        with pytest.raises(aiosmtplib.SMTPDataError) as failed:
            await send(smtp_server)
        assert failed.value.code == 421
    smtp_server.set_random_faults(0.0, drop_rate=1.0)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(smtp_server)
    smtp_server.set_random_faults(0.0)
    await send(smtp_server)
    assert (smtp_server.failed, smtp_server.dropped, len(smtp_server.messages)) == (3, 1, 1)


async def test_random_faults_are_reproducible_with_a_seed(smtp_server):
    outcomes = []
    for _ in range(2):
        smtp_server.set_random_faults(0.5, seed=42)
        run = []
        for _ in range(8):
            try:
                await send(smtp_server)
                run.append("ok")
            except aiosmtplib.SMTPDataError:
                run.append("fail")
        outcomes.append(run)
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {"ok", "fail"}


async def test_stop_and_start_on_the_same_port(smtp_server):
    port = smtp_server.port
    async with aiosmtplib.SMTP(
        hostname=smtp_server.host, port=port, local_hostname=CLIENT_NAME, timeout=5
    ) as warm:
        await warm.noop()
        smtp_server.stop()
        assert not smtp_server.running
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await warm.noop()  # the open connection was aborted
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await send(smtp_server)
    smtp_server.start()
    smtp_server.start()  # idempotent
    assert smtp_server.port == port
    await send(smtp_server)
    assert len(smtp_server.messages) == 1
    assert smtp_server.connections == 2  # the warm one and the last send


def test_context_manager_and_bad_arguments(tls_ca):
    with SMTPTestServer(tls="ssl", ssl_context=tls_ca.server_context()) as server:
        assert server.running and server.port > 0
    assert not server.running
    with pytest.raises(ValueError, match="ssl_context"):
        SMTPTestServer(tls="starttls")
    with pytest.raises(ValueError, match="stage"):
        server.fail_next("QUIT", 500, "x")  # type: ignore[arg-type,unused-ignore]


# -- worker environment and processes ----------------------------------------------------


def test_worker_env(worker_env, smtp_factory, redis_url, tls_ca):
    plain = worker_env(redis_url, smtp_factory())
    assert plain["NOTIFIER_REDIS_URL"] == redis_url
    assert plain["NOTIFIER_SMTP_TLS"] == "none"
    assert "NOTIFIER_SMTP_USERNAME" not in plain and "NOTIFIER_SMTP_CA_FILE" not in plain
    assert plain["NOTIFIER_MAIL_FROM"] == "量化提醒 <alerts@example.com>"
    assert plain["NOTIFIER_MAIL_TO"] == "trader@example.com"
    assert plain["NOTIFIER_METRICS_PORT"] == "0"
    assert "PATH" in plain
    server = smtp_factory(tls="starttls", auth={USER: PASSWORD})
    env = worker_env(redis_url, server, concurrency=4, NOTIFIER_MAIL_TO=None)
    assert env["NOTIFIER_SMTP_HOST"] == "127.0.0.1"
    assert env["NOTIFIER_SMTP_PORT"] == str(server.port)
    assert env["NOTIFIER_SMTP_TLS"] == "starttls"
    assert (env["NOTIFIER_SMTP_USERNAME"], env["NOTIFIER_SMTP_PASSWORD"]) == (USER, PASSWORD)
    assert Path(env["NOTIFIER_SMTP_CA_FILE"]) == tls_ca.ca_file
    assert tls_ca.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert env["NOTIFIER_CONCURRENCY"] == "4" and "NOTIFIER_MAIL_TO" not in env


FAKE_WORKER_MAIN = textwrap.dedent(
    """
    import os, signal, sys, time
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("argv", sys.argv[1:], "cwd", os.getcwd())
    print("port", os.environ["NOTIFIER_SMTP_PORT"])
    print("ready")
    time.sleep(60)
    """
)


def test_worker_proc_with_a_stand_in_worker(
    worker_proc, worker_env, smtp_server, redis_url, tmp_path
):
    fake = tmp_path / "fake-site" / "worker"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(FAKE_WORKER_MAIN)
    env = worker_env(redis_url, smtp_server) | {"PYTHONPATH": str(fake.parent)}

    polite = worker_proc(env, "--burst")
    stubborn = worker_proc(env, "--ignore-term")
    log = wait_for_log(polite, "ready", 5)
    assert "argv ['run', '--burst']" in log and f"port {smtp_server.port}" in log
    assert str(tmp_path) in log and "fake-site" not in log.split("cwd")[1]
    wait_for_log(stubborn, "ready", 5)

    worker_proc.grace_s = 0.5
    started = time.monotonic()
    worker_proc.stop_all()
    assert time.monotonic() - started < 5
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert polite.log_path.parent == tmp_path


def test_worker_proc_spawn_runs_any_command(worker_proc):
    proc = worker_proc.spawn([sys.executable, "-c", "print('hello')"], {"PATH": "/usr/bin"})
    assert proc.wait(timeout=10) == 0
    assert proc.log_path.read_text() == "hello\n"
