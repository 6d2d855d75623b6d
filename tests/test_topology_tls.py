"""``rediss+sentinel://`` end to end: a Sentinel set where every server speaks TLS only.

A master, a replica and three sentinels (worker/devtools/redis_topology.py,
``SentinelSet(tls=...)``), each with ``port 0`` and a ``tls-port``, replication and the
sentinels' own links over TLS too, certificates for 127.0.0.1 from the session's trustme CA
(``tls_ca``). Through the URL the issue names, ``rediss+sentinel://:pw@s1,s2,s3/mymaster/0
?sentinel_password=...&ssl_ca_certs=<ca.pem>``: the sync and asyncio clients write and read
through the master, a producer sends, and ``notifier check`` shows the topology. A plain
``redis+sentinel://`` URL to the same sentinels, and the right URL with another CA's file,
fail fast with one line that shows no password.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import trustme
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import SentinelManagedSSLConnection

from producer import Notifier, NotifierUnavailable
from producer.topology import REDIS_ERRORS, async_client, sync_client
from tests.support.tls import TLSAuthority
from worker.devtools.redis_topology import SentinelSet, TLSFiles
from worker.devtools.smtp_server import SMTPTestServer

PASSWORD = "pw-TlsMaster-4b1e"
SENTINEL_PASSWORD = "pw-TlsSentinel-c07d"
SECRETS = (PASSWORD, SENTINEL_PASSWORD)
REPO_ROOT = Path(__file__).resolve().parent.parent


def fast() -> dict[str, Any]:
    """The producer's connection options: 0.5 s socket timeouts, no retries."""
    return {"socket_timeout": 0.5, "socket_connect_timeout": 0.5, "retry": Retry(NoBackoff(), 0)}


def assert_one_clean_line(text: str) -> None:
    assert text.strip() and "\n" not in text.strip(), text
    assert "Traceback" not in text, text
    for secret in SECRETS:
        assert secret not in text, f"a password shows in {text!r}"


@pytest.fixture(scope="module")
def tls_set(
    tls_ca: TLSAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SentinelSet]:
    directory = tmp_path_factory.mktemp("tls-sentinel-set")
    files = TLSFiles(cert=directory / "cert.pem", key=directory / "key.pem", ca=tls_ca.ca_file)
    tls_ca.server_cert.cert_chain_pems[0].write_to_path(str(files.cert))
    tls_ca.server_cert.private_key_pem.write_to_path(str(files.key))
    with SentinelSet(
        directory / "set", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD, tls=files
    ) as servers:
        yield servers


@pytest.fixture(scope="module")
def other_ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA file of another trustme CA: it did not sign the servers' certificates."""
    path = tmp_path_factory.mktemp("other-ca") / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def test_the_set_speaks_tls_only(tls_set: SentinelSet) -> None:
    assert tls_set.url.startswith(f"rediss+sentinel://:{PASSWORD}@127.0.0.1:")
    host, port = tls_set.master_address()
    plain = redis.Redis(host=host, port=port, password=PASSWORD, **fast())
    with plain, pytest.raises(redis.ConnectionError):
        plain.ping()  # a TLS port: a plain client gets no answer


def test_sync_and_async_clients_write_and_read_through_the_master(tls_set: SentinelSet) -> None:
    client = sync_client(tls_set.url, **fast())
    assert isinstance(client, redis.Redis)
    try:
        assert client.set("tls:sync", "over TLS") and client.wait(1, 2000) == 1  # replicated
        manager = client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
        classes = {s.connection_pool.connection_class for s in manager.sentinels}
        classes.add(client.connection_pool.connection_class)
    finally:
        client.close()
    assert classes == {redis.SSLConnection, SentinelManagedSSLConnection}, classes

    async def main() -> list[Any]:
        aclient = async_client(tls_set.url, **fast())
        try:
            await aclient.rpush("tls:async", "x")
            return [await aclient.get("tls:sync"), await aclient.lpop("tls:async")]
        finally:
            await aclient.aclose()

    assert asyncio.run(main()) == [b"over TLS", b"x"]


def test_producer_sends_and_check_shows_the_topology(
    tls_set: SentinelSet,
    smtp_server: SMTPTestServer,
    worker_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    with Notifier(tls_set.url, key_prefix="tlsq") as notifier:
        event_id = notifier.send("over TLS", id="tls-1")
        queue = notifier.keys.queue
    assert event_id == "tls-1"
    with sync_client(tls_set.url, **fast()) as client:
        (raw,) = client.lrange(queue, 0, -1)
    assert b'"tls-1"' in raw

    env = worker_env(tls_set.url, smtp_server, key_prefix="tlsq")
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "check"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = [x.removeprefix("redis").strip() for x in out.splitlines() if x.startswith("redis ")]
    assert lines[0].startswith("ok: queue tlsq:queue on rediss+sentinel://:***@127.0.0.1:"), out
    assert "sentinel_password=***&" in lines[0] and ": 1 waiting," in lines[0], out
    master = "{}:{}".format(*tls_set.master_address())
    replica = f"127.0.0.1:{tls_set.data[1].port}"
    assert lines[1] == "topology sentinel: service 'mymaster', 3/3 sentinel(s) answer, quorum 2"
    assert lines[2] == f"master {master}: AOF off, no RDB save"
    assert lines[3].startswith(f"replica {replica}: online, "), out
    assert "Traceback" not in out
    for secret in SECRETS:
        assert secret not in out


def _send_fails(url: str) -> tuple[float, str]:
    """Seconds until a producer's send gives up, and its message."""
    started = time.monotonic()
    with Notifier(url, key_prefix="tlsq") as notifier, pytest.raises(NotifierUnavailable) as info:
        notifier.send("never queued")
    return time.monotonic() - started, str(info.value)


def test_a_plain_url_to_tls_sentinels_fails_fast_in_one_line(tls_set: SentinelSet) -> None:
    plain = tls_set.url.replace("rediss+sentinel://", "redis+sentinel://").partition("&")[0]
    assert plain.startswith("redis+sentinel://") and "ssl_ca_certs" not in plain
    took, message = _send_fails(plain)
    print(f"plain URL to TLS sentinels: {took:.3f} s: {message}")
    assert took < 2.0, took
    assert_one_clean_line(message)
    assert "no master for service 'mymaster'" in message, message


def test_another_ca_fails_certificate_verification_in_one_line(
    tls_set: SentinelSet, other_ca_file: Path
) -> None:
    url = tls_set.url.partition("&")[0] + f"&ssl_ca_certs={quote(str(other_ca_file))}"
    took, message = _send_fails(url)
    print(f"another CA: {took:.3f} s: {message}")
    assert took < 2.0, took
    assert_one_clean_line(message)
    assert "has a TLS certificate that ssl_ca_certs does not trust" in message, message

    async def ping() -> str:  # the asyncio lookup says it of each sentinel too
        aclient = async_client(url, **fast())
        try:
            await aclient.ping()
        except REDIS_ERRORS as exc:
            return str(exc)
        finally:
            await aclient.aclose()
        return "no error"

    assert asyncio.run(ping()).count("certificate that ssl_ca_certs does not trust") == 3
