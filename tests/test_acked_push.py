"""Acknowledged pushes (``replicas=N``): LPUSH and WAIT in one round trip, against real servers.

A Sentinel set shared by the module (worker/devtools/redis_topology.py: a master, one replica
and three sentinels, both passwords set): the producers connect through the sentinels, and the
tests read the master and the replica directly. "Replica paused" is the replica's process
stopped with SIGSTOP (its link stays up, it acknowledges nothing), resumed (SIGCONT) in a
``finally`` before the next test. Every test uses a key prefix of its own.

Measured here (asserted with margins): a push whose replica is paused raises after
``replica_timeout_ms`` plus up to one tick of Redis's timer (0.1 s at ``hz 10``), well within
the call's limit; a heartbeat never waits for a replica.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import AsyncNotifier, Notifier, NotifierNotReplicated
from producer.client import NotifierUnavailable
from producer.keys import Keys
from tests.support.helpers import Rig, delivered, settings_for
from worker.devtools.redis_server import RedisServer
from worker.devtools.redis_topology import SentinelSet
from worker.devtools.smtp_server import SMTPTestServer
from worker.queue import connect

# Distinctive, so that a leak anywhere is found by a substring search.
PASSWORD = "pw-Acked-Master-3c1e"
SENTINEL_PASSWORD = "pw-Acked-Sentinel-8b2d"
NOT_REPLICATED = "queued on the master, not confirmed on a replica"
REPLICAS_VARIABLE = "NOTIFIER_PRODUCER_REPLICAS"
TIMEOUT_VARIABLE = "NOTIFIER_PRODUCER_REPLICA_TIMEOUT_MS"
TICK_S = 0.1  # Redis ends a timed-out WAIT on a tick of its timer (hz 10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """Shared by the module; its master is never stopped (a frozen master would be failed
    over after the sentinels' down-after-milliseconds)."""
    with SentinelSet(
        tmp_path_factory.mktemp("acked"), password=PASSWORD, sentinel_password=SENTINEL_PASSWORD
    ) as sentinel_set:
        yield sentinel_set


@pytest.fixture(autouse=True)
def no_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The producer's settings come from each test only."""
    for name in list(os.environ):
        if name.startswith("NOTIFIER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def keys() -> Keys:
    return Keys(f"acked-{uuid.uuid4().hex[:8]}")


def direct(server: RedisServer) -> redis.Redis:
    """A plain connection to one server of the set (master or replica), not through the
    sentinels."""
    return redis.Redis(port=server.port, password=PASSWORD, socket_timeout=2.0)


def queued_ids(server: RedisServer, keys: Keys) -> list[str]:
    """The ids of the events in the queue on ``server``, oldest first."""
    with direct(server) as r:
        raw: list[bytes] = r.lrange(keys.queue, 0, -1)
    return [json.loads(x)["id"] for x in reversed(raw)]


@contextmanager
def paused(servers: SentinelSet) -> Iterator[RedisServer]:
    """The replica stopped (SIGSTOP) for the block, then resumed and caught up again: a write
    on the master is acknowledged by it before the next test starts."""
    replica = servers.data[1]
    assert replica.pid is not None
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        yield replica
    finally:
        os.kill(replica.pid, signal.SIGCONT)
        with direct(servers.data[0]) as master:
            deadline = time.monotonic() + 5
            while True:
                master.set("acked-test:caught-up", 1)
                if int(master.wait(1, 100)) >= 1 or time.monotonic() > deadline:
                    break


def assert_one_line_without_secrets(text: str) -> None:
    assert "\n" not in text, text
    for secret in (PASSWORD, SENTINEL_PASSWORD):
        assert secret not in text, f"a password shows in {text!r}"


def check_not_replicated(
    exc: NotifierNotReplicated, event_id: str, confirmed: int, of: int
) -> None:
    text = str(exc)
    assert NOT_REPLICATED in text
    assert f"event {event_id} was queued" in text
    assert f"({confirmed} of {of} replica(s) within" in text
    assert "sending it again with the same id is safe" in text
    assert exc.queued is True and exc.replicas == confirmed
    assert isinstance(exc, NotifierUnavailable)
    assert exc.event is not None and exc.event.id == exc.event_id == event_id
    assert_one_line_without_secrets(text)
    assert_one_line_without_secrets(repr(exc))


# -- confirmed --------------------------------------------------------------------------------


def test_acked_send_returns_once_the_event_is_on_the_replica(
    servers: SentinelSet, keys: Keys
) -> None:
    with Notifier(servers.url, key_prefix=keys.prefix, replicas=1) as notifier:
        assert (notifier.replicas, notifier.replica_timeout_ms) == (1, 100)
        ids = [notifier.send(f"acked {i}", strategy="acked") for i in range(5)]
    # Read at once, with no wait: WAIT 1 answered only once the replica had them.
    assert queued_ids(servers.data[1], keys) == ids
    assert queued_ids(servers.data[0], keys) == ids


async def test_async_acked_send_returns_once_the_event_is_on_the_replica(
    servers: SentinelSet, keys: Keys
) -> None:
    async with AsyncNotifier(servers.url, key_prefix=keys.prefix, replicas=1) as notifier:
        ids = [await notifier.send(f"acked {i}", strategy="acked") for i in range(5)]
    assert queued_ids(servers.data[1], keys) == ids


# -- not confirmed ----------------------------------------------------------------------------


def test_paused_replica_raises_not_replicated_with_the_event_queued_on_the_master(
    servers: SentinelSet, keys: Keys
) -> None:
    with Notifier(servers.url, key_prefix=keys.prefix, replicas=1) as notifier:
        notifier.send("warm", strategy="acked")  # connected: the timing below is WAIT's alone
        limit_s = notifier.timeout + notifier.replica_timeout_ms / 1000
        with paused(servers):
            started = time.monotonic()
            with pytest.raises(NotifierNotReplicated) as caught:
                notifier.send("not confirmed", strategy="acked", id="acked-paused-1")
            took = time.monotonic() - started
            check_not_replicated(caught.value, "acked-paused-1", 0, 1)
            assert "within 100 ms" in str(caught.value)
            assert queued_ids(servers.data[0], keys)[-1] == "acked-paused-1"
    # WAIT waited its 100 ms (and at most one tick of Redis's timer more), far below the
    # call's limit (timeout + replica_timeout_ms).
    assert 0.1 <= took <= 0.1 + TICK_S + 0.1 < limit_s, took


async def test_async_paused_replica_raises_not_replicated_with_the_event_queued(
    servers: SentinelSet, keys: Keys
) -> None:
    async with AsyncNotifier(servers.url, key_prefix=keys.prefix, replicas=1) as notifier:
        await notifier.send("warm", strategy="acked")
        with paused(servers):
            started = time.monotonic()
            with pytest.raises(NotifierNotReplicated) as caught:
                await notifier.send("not confirmed", strategy="acked", id="acked-paused-2")
            took = time.monotonic() - started
            check_not_replicated(caught.value, "acked-paused-2", 0, 1)
            assert queued_ids(servers.data[0], keys)[-1] == "acked-paused-2"
    assert 0.1 <= took <= 0.1 + TICK_S + 0.1, took


def test_not_replicated_even_when_the_timeout_is_shorter_than_redis_s_timer_tick(
    servers: SentinelSet, keys: Keys
) -> None:
    """A timed-out WAIT answers on Redis's next timer tick (up to 0.1 s late): the reply is
    awaited that long, so a short ``timeout`` still says "not confirmed on a replica", not
    "may or may not have been queued" (and keeps its connection)."""
    with Notifier(
        servers.url, key_prefix=keys.prefix, replicas=1, replica_timeout_ms=1, timeout=0.02
    ) as notifier:
        notifier.send("warm", strategy="acked", retry_s=2.0)
        with paused(servers):
            for i in range(4):
                with pytest.raises(NotifierNotReplicated) as caught:
                    notifier.send("short", strategy="acked", id=f"acked-short-{i}")
                check_not_replicated(caught.value, f"acked-short-{i}", 0, 1)
            assert queued_ids(servers.data[0], keys)[-4:] == [f"acked-short-{i}" for i in range(4)]


def test_more_replicas_than_the_master_has_is_not_replicated(
    servers: SentinelSet, keys: Keys
) -> None:
    with (
        Notifier(servers.url, key_prefix=keys.prefix, replicas=2) as notifier,
        pytest.raises(NotifierNotReplicated) as caught,
    ):
        notifier.send("two asked", strategy="acked", id="acked-two")
    check_not_replicated(caught.value, "acked-two", 1, 2)
    assert queued_ids(servers.data[1], keys) == ["acked-two"]  # the one replica has it


async def test_resending_a_not_replicated_event_delivers_it_once(
    servers: SentinelSet, keys: Keys, smtp_server: SMTPTestServer
) -> None:
    """What the error says a strategy may do: send the same event again. Two copies stay on
    the master while the replica is paused, a third once it is back is confirmed; the worker
    sends one mail (its ``sent:<id>`` mark drops the other copies)."""
    async with AsyncNotifier(servers.url, key_prefix=keys.prefix, replicas=1) as notifier:
        with paused(servers):
            with pytest.raises(NotifierNotReplicated) as first:
                await notifier.send("resend me", strategy="acked", id="acked-again")
            assert first.value.event is not None
            with pytest.raises(NotifierNotReplicated) as second:
                await notifier.send_event(first.value.event)
            check_not_replicated(second.value, "acked-again", 0, 1)
        assert await notifier.send_event(first.value.event) == "acked-again"
    assert queued_ids(servers.data[1], keys) == ["acked-again"] * 3

    settings = settings_for(servers.url, smtp_server, key_prefix=keys.prefix)
    client = connect(servers.url)
    rig = Rig(settings, client, None)
    try:
        assert await rig.run_queue() == 3
    finally:
        await rig.close()
        await client.aclose()
    assert delivered(smtp_server) == {"acked-again": 1}
    with direct(servers.data[0]) as master:
        counters = {k.decode(): int(v) for k, v in master.hgetall(keys.counters).items()}
        assert master.llen(keys.queue) == 0
    assert counters["delivered"] == 1 and counters["duplicates_skipped"] == 2


# -- heartbeats never wait ------------------------------------------------------------------


async def test_heartbeats_do_not_wait_for_the_paused_replica(
    servers: SentinelSet, keys: Keys
) -> None:
    options: dict[str, Any] = {"key_prefix": keys.prefix, "replicas": 1, "replica_timeout_ms": 1000}
    with Notifier(servers.url, **options) as notifier:
        async with AsyncNotifier(servers.url, **options) as anotifier:
            notifier.heartbeat("warm")
            await anotifier.heartbeat("warm")
            with paused(servers):
                started = time.monotonic()
                notifier.heartbeat("sync-beat")
                await anotifier.heartbeat("async-beat")
                took = time.monotonic() - started
                with direct(servers.data[0]) as master:
                    assert master.zscore(keys.seen, "sync-beat") is not None
                    assert master.zscore(keys.seen, "async-beat") is not None
    assert took < 0.5, took  # two WAITs would take 2 s


def test_keepalive_stop_is_not_held_by_the_replica_timeout(tmp_path: Path) -> None:
    """A keep-alive's heartbeats keep the plain ``timeout``: ``stop()`` waits about that
    long for a heartbeat hung on a frozen Redis, and the thread has ended when it returns
    (with ``replica_timeout_ms`` added to its reads, it would hang 2 s more)."""
    server = RedisServer(dir=tmp_path / "redis").start()
    try:
        notifier = Notifier(
            server.url, key_prefix="acked-ka", replicas=1, replica_timeout_ms=2000, timeout=0.3
        )
        keepalive = notifier.keepalive("acked-ka", every_s=0.05)
        deadline = time.monotonic() + 5
        while keepalive.beats < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert keepalive.beats >= 1
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            time.sleep(0.1)  # a heartbeat is under way, unanswered
            started = time.monotonic()
            keepalive.stop()
            took = time.monotonic() - started
            assert not keepalive.running, f"still beating {took:.2f} s after stop()"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        notifier.close()
    finally:
        server.stop()
    assert took <= 0.3 + 0.1 + 0.05, took


# -- settings ---------------------------------------------------------------------------------


def test_replicas_from_the_environment_when_the_code_does_not_pass_them(
    servers: SentinelSet, keys: Keys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(REPLICAS_VARIABLE, "2")
    monkeypatch.setenv(TIMEOUT_VARIABLE, "50")
    with Notifier(servers.url, key_prefix=keys.prefix) as notifier:
        assert (notifier.replicas, notifier.replica_timeout_ms) == (2, 50)
        with pytest.raises(NotifierNotReplicated) as caught:
            notifier.send("env", strategy="acked", id="acked-env")
    check_not_replicated(caught.value, "acked-env", 1, 2)
    assert "within 50 ms" in str(caught.value)
    # The argument wins over the environment: one replica is enough...
    with Notifier(servers.url, key_prefix=keys.prefix, replicas=1) as notifier:
        assert (notifier.replicas, notifier.replica_timeout_ms) == (1, 50)
        notifier.send("argument", strategy="acked", id="acked-arg")
    # ... and replicas=0 does not wait at all, even with the replica paused.
    with Notifier(servers.url, key_prefix=keys.prefix, replicas=0) as notifier, paused(servers):
        notifier.send("plain", strategy="acked", id="acked-plain")
    # The env file, when the environment does not say.
    monkeypatch.delenv(REPLICAS_VARIABLE)
    monkeypatch.delenv(TIMEOUT_VARIABLE)
    env_file = tmp_path / ".env"
    env_file.write_text(f"{REPLICAS_VARIABLE}=2\n{TIMEOUT_VARIABLE}=30\n", encoding="utf-8")
    with Notifier(servers.url, key_prefix=keys.prefix, env_file=env_file) as notifier:
        assert (notifier.replicas, notifier.replica_timeout_ms) == (2, 30)
        with pytest.raises(NotifierNotReplicated, match="within 30 ms"):
            notifier.send("env file", strategy="acked")
    assert queued_ids(servers.data[0], keys)[:3] == ["acked-env", "acked-arg", "acked-plain"]


@pytest.mark.parametrize(
    ("name", "value", "need"),
    [
        (REPLICAS_VARIABLE, "two", "0 or more"),
        (REPLICAS_VARIABLE, "-1", "0 or more"),
        (REPLICAS_VARIABLE, "1.5", "0 or more"),
        (TIMEOUT_VARIABLE, "0", "above 0"),  # WAIT n 0 would block for ever
        (TIMEOUT_VARIABLE, "100ms", "above 0"),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, need: str
) -> None:
    monkeypatch.setenv(name, value)
    url = f"redis://:{PASSWORD}@127.0.0.1:1/0"
    for make in (Notifier, AsyncNotifier):
        with pytest.raises(ValueError) as caught:
            make(url)
        text = str(caught.value)
        assert text == f"{name}={value}: give a whole number, {need}"
        assert_one_line_without_secrets(text)


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"replicas": -1}, "replicas=-1"),
        ({"replicas": 1, "replica_timeout_ms": 0}, "replica_timeout_ms=0"),
    ],
)
def test_a_bad_argument_is_one_line_naming_it(options: dict[str, Any], shown: str) -> None:
    with pytest.raises(ValueError, match=f"^{shown}: give a whole number"):
        Notifier("redis://127.0.0.1:1/0", **options)


def test_replicas_on_a_cluster_url_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused before any connection (the URL's hosts do not even listen)."""
    url = f"redis+cluster://:{PASSWORD}@127.0.0.1:1,127.0.0.1:2/0"
    messages = []
    for make in (Notifier, AsyncNotifier):
        with pytest.raises(ValueError) as caught:
            make(url, replicas=1)
        messages.append(str(caught.value))
    monkeypatch.setenv(REPLICAS_VARIABLE, "1")
    with pytest.raises(ValueError) as caught:
        Notifier(url)
    messages.append(str(caught.value))
    for text in messages:
        assert text.startswith("replicas=1: acknowledged pushes need a standalone or Sentinel")
        assert REPLICAS_VARIABLE in text
        assert_one_line_without_secrets(text)
    monkeypatch.setenv(REPLICAS_VARIABLE, "0")
    # replicas=0: past the check. Constructing never connects (even redis-py's sync Cluster
    # client, which reads the slot map in its constructor); the first send says "not queued".
    with Notifier(url) as notifier, pytest.raises(NotifierUnavailable) as unavailable:
        notifier.send("x", id="cluster-down-1")
    assert unavailable.value.queued is False
    assert str(unavailable.value).startswith("event cluster-down-1 was not queued: ")
    assert_one_line_without_secrets(str(unavailable.value))
