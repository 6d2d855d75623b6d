"""The SMTP connection's edges (worker/mailer.py, worker/smtp_fast.py, SMTP_HELO_NAME):
the name the worker gives in EHLO, and one line with the fix for each wrong connection
setting (refused port, unresolvable host, TLS mode that does not match the port), against
real local servers, quickly."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AiosmtpdServer
from aiosmtpd.smtp import Envelope, Session

from tests.support.helpers import clean_env, run_cli, settings_from, wait_for_log
from tests.support.tls import TLSAuthority
from worker import smtp_fast
from worker.devtools import free_port
from worker.errors import ConfigurationError, SendError, TransientError
from worker.mailer import Connection, tls_context
from worker.settings import Settings, SettingsError, load_settings

SENDER, RCPT = "alerts@quant-desk.cn", "trader@example.com"
MESSAGE = b"From: alerts@quant-desk.cn\r\nTo: trader@example.com\r\nSubject: t\r\n\r\nbody\r\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    clean_env(monkeypatch, tmp_path)


def settings(**fields: Any) -> Settings:
    base: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_tls": "none",
        "mail_from": f"量化提醒 <{SENDER}>",
        "mail_to": RCPT,
        "smtp_timeout_s": 3.0,
        "redis_url": "redis://127.0.0.1:1/0",  # never contacted
    }
    return settings_from(**(base | fields))


@pytest.fixture
async def conns() -> AsyncIterator[Callable[[Settings], Connection]]:
    made: list[Connection] = []

    def make(s: Settings) -> Connection:
        conn = Connection(s, tls_context(s) if s.smtp_tls != "none" else None, name="t")
        made.append(conn)
        return conn

    yield make
    for conn in made:
        await conn.close()


# -- SMTP_HELO_NAME ---------------------------------------------------------------------------


class EhloRecorder:
    """aiosmtpd handler that records the name of every EHLO/HELO."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def handle_EHLO(
        self,
        server: AiosmtpdServer,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        self.names.append(hostname)
        return responses

    async def handle_HELO(
        self, server: AiosmtpdServer, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        session.host_name = hostname
        self.names.append(hostname)
        return "250 ok"

    async def handle_DATA(
        self, server: AiosmtpdServer, session: Session, envelope: Envelope
    ) -> str:
        return "250 queued"


@pytest.fixture
def ehlo_server(tls_ca: TLSAuthority) -> Iterator[Callable[..., tuple[EhloRecorder, int]]]:
    controllers: list[Controller] = []

    def start(*, starttls: bool = False) -> tuple[EhloRecorder, int]:
        recorder = EhloRecorder()
        port = free_port()
        kwargs: dict[str, Any] = {"server_hostname": "smtp.test"}
        if starttls:
            kwargs |= {"tls_context": tls_ca.server_context(), "require_starttls": True}
        controller = Controller(recorder, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        recorder.names.clear()  # the controller's own start-up probe
        return recorder, port

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
def fqdn(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Pretend this host's socket.getfqdn() is the given name."""

    def set_to(name: str) -> None:
        monkeypatch.setattr(smtp_fast, "host_fqdn", lambda: name)

    return set_to


@pytest.mark.parametrize("host", ["localhost", "localhost.localdomain", "vm", "127.0.0.1", ""])
def test_helo_name_defaults_to_the_mail_domain_without_a_real_fqdn(fqdn, host: str) -> None:
    fqdn(host)
    assert settings().smtp_helo_name == "quant-desk.cn"


def test_helo_name_defaults_to_the_host_fqdn(fqdn) -> None:
    fqdn("trade-01.desk.example.net")
    assert settings().smtp_helo_name == "trade-01.desk.example.net"


def test_helo_name_setting_wins(fqdn, monkeypatch: pytest.MonkeyPatch) -> None:
    fqdn("trade-01.desk.example.net")
    monkeypatch.setenv("NOTIFIER_SMTP_HELO_NAME", "relay-client.quant-desk.cn")
    assert settings().smtp_helo_name == "relay-client.quant-desk.cn"
    assert settings(smtp_helo_name="[203.0.113.7]").smtp_helo_name == "[203.0.113.7]"


@pytest.mark.parametrize(
    "bad", ["localhost", "LOCALHOST.localdomain", "my host.cn", "vm", "[999.1.1.1]", "a..b.cn"]
)
def test_a_bad_helo_name_is_one_line_naming_the_setting(monkeypatch, bad: str) -> None:
    monkeypatch.setenv("NOTIFIER_SMTP_HELO_NAME", bad)
    with pytest.raises(SettingsError) as info:
        load_settings()  # the working directory is empty: no .env
    message = str(info.value)
    assert message.startswith("NOTIFIER_SMTP_HELO_NAME:") and "\n" not in message
    assert repr(bad) in message  # what was given
    assert "example.com" in message or "[203.0.113.7]" in message  # and what would do


@pytest.mark.parametrize("starttls", [False, True])
async def test_ehlo_sends_the_helo_name(ehlo_server, conns, tls_ca, fqdn, starttls: bool) -> None:
    fqdn("localhost")
    recorder, port = ehlo_server(starttls=starttls)
    tls = "starttls" if starttls else "none"
    conn = conns(settings(smtp_port=port, smtp_tls=tls, smtp_ca_file=tls_ca.ca_file))
    await conn.send(SENDER, [RCPT], MESSAGE)
    assert recorder.names and set(recorder.names) == {"quant-desk.cn"}
    assert len(recorder.names) == (2 if starttls else 1)  # EHLO again after STARTTLS


async def test_without_any_name_ehlo_uses_the_address_literal(ehlo_server, conns, fqdn) -> None:
    fqdn("localhost")
    recorder, port = ehlo_server()
    s = settings(smtp_port=port, mail_from=None)
    assert s.smtp_helo_name is None
    await conns(s).send(SENDER, [RCPT], MESSAGE)
    assert recorder.names == ["[127.0.0.1]"]


# -- a wrong connection setting: one line with the fix, quickly --------------------------------


async def failure(conn: Connection, within: float) -> SendError:
    t0 = time.monotonic()
    with pytest.raises(SendError) as info:
        await conn.open()
    took = time.monotonic() - t0
    assert took < within, f"took {took:.1f} s: {info.value}"
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text
    return info.value


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port held by a bound socket that does not listen: connects are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


async def test_refused_port_names_host_port_and_setting(conns, closed_port: int) -> None:
    err = await failure(conns(settings(smtp_port=closed_port)), within=1.0)
    assert f"connection refused on 127.0.0.1:{closed_port}" in str(err)
    assert "is the SMTP server running" in str(err) and "NOTIFIER_SMTP_PORT" in str(err)
    # nobody listening may be a restart: the account is down and retried, events kept
    assert type(err) is TransientError


async def test_unresolvable_host_names_the_setting(conns) -> None:
    # .invalid never resolves (RFC 6761); a hanging resolver is bounded by SMTP_TIMEOUT_S
    s = settings(smtp_host="smtp.nonexistent.invalid", smtp_port=465, smtp_timeout_s=2.0)
    err = await failure(conns(s), within=3.0)
    assert "cannot resolve NOTIFIER_SMTP_HOST=smtp.nonexistent.invalid" in str(err)
    if "no such host" in str(err):
        assert isinstance(err, ConfigurationError)
    else:  # the resolver did not answer (no network here): try again later
        assert type(err) is TransientError


@pytest.mark.parametrize("tls", ["starttls", "none"])
async def test_plain_client_on_an_implicit_tls_port(smtp_factory, conns, tls_ca, tls) -> None:
    server = smtp_factory(tls="ssl")
    s = settings(
        smtp_port=server.port, smtp_tls=tls, smtp_timeout_s=5.0, smtp_ca_file=tls_ca.ca_file
    )
    err = await failure(conns(s), within=3.0)  # not the 5 s greeting timeout
    assert isinstance(err, ConfigurationError)
    assert f"port {server.port} speaks implicit TLS" in str(err)
    assert "set NOTIFIER_SMTP_TLS=ssl" in str(err)


@pytest.mark.parametrize("server_tls", ["none", "starttls"])
async def test_tls_client_on_a_plain_port(smtp_factory, conns, tls_ca, server_tls) -> None:
    server = smtp_factory(tls=server_tls)
    s = settings(smtp_port=server.port, smtp_tls="ssl", smtp_ca_file=tls_ca.ca_file)
    err = await failure(conns(s), within=2.0)
    assert isinstance(err, ConfigurationError)
    assert f"port {server.port} speaks plain SMTP/STARTTLS" in str(err)
    assert "set NOTIFIER_SMTP_TLS=starttls" in str(err)


async def test_a_slow_greeting_on_a_plain_port_still_works(conns) -> None:
    """A plain server that greets only after the TLS probe started is not taken for a TLS
    port (the probe uses a connection of its own)."""
    connections = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await asyncio.sleep(1.5)
        writer.write(b"220 slow.test ESMTP\r\n")
        while line := await reader.readline():
            cmd = line[:4].upper()
            reply = {b"EHLO": b"250 slow.test\r\n", b"QUIT": b"221 bye\r\n"}.get(cmd, b"250 ok\r\n")
            writer.write(reply)
            if cmd == b"QUIT":
                break
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        conn = conns(settings(smtp_port=port, smtp_timeout_s=4.0))
        await conn.open()
        assert conn.is_open
        assert connections == 2  # the client's and the probe's
    finally:
        server.close()


def test_cli_and_worker_show_the_same_line(worker_proc, smtp_factory, tls_ca, redis_url) -> None:
    server = smtp_factory(tls="ssl")
    env = {
        "NOTIFIER_REDIS_URL": redis_url,
        "NOTIFIER_SMTP_HOST": "127.0.0.1",
        "NOTIFIER_SMTP_PORT": str(server.port),
        "NOTIFIER_SMTP_TLS": "starttls",
        "NOTIFIER_SMTP_CA_FILE": str(tls_ca.ca_file),
        "NOTIFIER_MAIL_FROM": SENDER,
        "NOTIFIER_MAIL_TO": RCPT,
        "NOTIFIER_SMTP_TIMEOUT_S": "5",
    }
    same = f"port {server.port} speaks implicit TLS (set NOTIFIER_SMTP_TLS=ssl, or "
    same += "NOTIFIER_SMTP_PORT=587 for starttls)"
    for command in (["check"], ["send-test", "--to", RCPT]):
        rc, out = run_cli(worker_proc, env, *command)
        assert rc == 1, out
        (line,) = [x for x in out.splitlines() if "implicit TLS" in x]
        assert "FAIL (configuration)" in line and same in line
    worker = worker_proc(env)
    log = wait_for_log(worker, "speaks implicit TLS", timeout=15)
    assert same in log and "Traceback" not in log
