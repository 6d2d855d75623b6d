"""Redis refusing or failing, against real redis-server processes these tests start:
the one-line explanations (producer/redis_errors.py) and what the producer raises.

Each refusal is produced for real: ``maxmemory`` with ``noeviction`` (OOM), ``REPLICAOF``
(READONLY), a failed background save with ``stop-writes-on-bgsave-error`` (MISCONF),
``requirepass`` (NOAUTH/WRONGPASS).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.retry import Retry

from producer import (
    AsyncNotifier,
    Notifier,
    NotifierRefused,
    NotifierTimeout,
    NotifierUnavailable,
)
from producer.redis_errors import (
    RedisProblem,
    classify_redis_error,
    command_not_run,
    explain_redis_error,
    is_write_refused,
    redacted_url,
)
from tests.support.helpers import wait_until
from worker.devtools.redis_server import RedisServer

PASSWORD = "hunter2-授权码xyz"  # must never be echoed
QUICK = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5, "retry": Retry(NoBackoff(), 0)}


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, **QUICK)


def error_of(call: Callable[[], object]) -> RedisError:
    with pytest.raises(RedisError) as info:
        call()
    return info.value


# -- making a real Redis refuse ----------------------------------------------------------------


def make_full(r: redis.Redis) -> None:
    """OOM: every write refused, reads still answered."""
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1")


def make_persistence_fail(server: RedisServer, r: redis.Redis) -> None:
    """MISCONF: a save point, a background save that cannot write its file (its working
    directory is gone, which fails even as root), and stop-writes-on-bgsave-error."""
    r.config_set("stop-writes-on-bgsave-error", "yes")
    r.config_set("save", "3600 1")
    shutil.rmtree(server.dir)
    r.bgsave()
    wait_until(
        lambda: r.info("persistence")["rdb_last_bgsave_status"] == "err",
        timeout=5,
        what="the background save to fail",
    )


def undo_persistence_fail(server: RedisServer, r: redis.Redis) -> None:
    """No save point left, so the server stops at once (a failing final save would keep it
    running)."""
    r.config_set("save", "")
    server.dir.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    r = client(server.url)
    yield r
    r.close()


@pytest.fixture
def full(server: RedisServer, admin: redis.Redis) -> str:
    make_full(admin)
    return server.url


@pytest.fixture
def readonly(server: RedisServer, admin: redis.Redis, redis_factory) -> str:
    master = redis_factory()
    admin.replicaof("127.0.0.1", master.port)
    return server.url


@pytest.fixture
def misconf(server: RedisServer, admin: redis.Redis) -> Iterator[str]:
    make_persistence_fail(server, admin)
    yield server.url
    undo_persistence_fail(server, admin)


@pytest.fixture
def with_password(server: RedisServer, admin: redis.Redis) -> Iterator[int]:
    admin.config_set("requirepass", PASSWORD)
    yield server.port
    with client(f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0") as r:
        r.config_set("requirepass", "")


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A listening socket nobody accepts from: the kernel completes the handshake, nothing
    ever answers (a frozen or firewalled Redis)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    sock.close()


# -- explain_redis_error / is_write_refused ----------------------------------------------------


def test_full_redis_is_explained_and_refuses_writes(full):
    r = client(full)
    assert r.llen("q") == 0  # reads still work: Redis is up
    for call in (
        lambda: r.lpush("q", "x"),
        lambda: r.pipeline(transaction=True).lpush("q", "x").incr("n").execute(),
        lambda: r.eval("return redis.call('LPUSH', KEYS[1], 'x')", 1, "q"),
    ):
        exc = error_of(call)
        assert classify_redis_error(exc) is RedisProblem.FULL
        assert is_write_refused(exc) and command_not_run(exc)
        assert explain_redis_error(exc) == (
            "Redis is full (OOM: maxmemory reached, policy noeviction): raise maxmemory or "
            "drain the queue (notifier stats / dead purge)"
        )
    assert explain_redis_error(exc, full).startswith(f"Redis at {full} is full (OOM")
    r.close()


async def test_full_redis_from_the_asyncio_client(full):
    r = aredis.Redis.from_url(full, **QUICK)
    with pytest.raises(RedisError) as info:
        await r.lpush("q", "x")
    await r.aclose()
    assert is_write_refused(info.value)
    assert "is full (OOM" in explain_redis_error(info.value, full)


def test_failing_persistence_is_explained_and_refuses_writes(misconf):
    exc = error_of(lambda: client(misconf).lpush("q", "x"))
    assert classify_redis_error(exc) is RedisProblem.PERSISTENCE
    assert is_write_refused(exc) and command_not_run(exc)
    assert explain_redis_error(exc, misconf) == (
        f"Redis at {misconf} refuses writes because persistence is failing (MISCONF): check "
        "its disk and the RDB/AOF settings (its log says why)"
    )
    # the same inside a transaction (redis-py annotates the text with the command)
    pipe = client(misconf).pipeline(transaction=True).lpush("q", "x")
    assert is_write_refused(error_of(pipe.execute))


def test_replica_is_explained_and_refuses_writes(readonly):
    exc = error_of(lambda: client(readonly).lpush("q", "x"))
    assert classify_redis_error(exc) is RedisProblem.READONLY
    assert is_write_refused(exc) and command_not_run(exc)
    assert explain_redis_error(exc) == (
        "Redis is a read-only replica (READONLY): point NOTIFIER_REDIS_URL at the master"
    )


@pytest.mark.parametrize(
    ("url_of", "why"),
    [
        (lambda port: f"redis://127.0.0.1:{port}/0", "it requires a password and none was given"),
        (lambda port: f"redis://:wrong-{PASSWORD}@127.0.0.1:{port}/0", "wrong user or password"),
        (lambda port: f"redis://bob:{PASSWORD}@127.0.0.1:{port}/0", "wrong user or password"),
    ],
)
def test_refused_password_is_explained_without_echoing_it(with_password, url_of, why):
    url = url_of(with_password)
    exc = error_of(lambda: client(url).lpush("q", "x"))
    assert classify_redis_error(exc) is RedisProblem.AUTH
    assert not is_write_refused(exc) and command_not_run(exc)
    line = explain_redis_error(exc, url)
    assert line == (
        f"Redis at {redacted_url(url)} refused the password ({why}): set it in "
        "NOTIFIER_REDIS_URL (redis://:PASSWORD@host:port/db)"
    )
    assert PASSWORD not in line and "hunter2" not in line


def test_refused_connection_is_unreachable(refused_redis_url):
    exc = error_of(lambda: client(refused_redis_url).lpush("q", "x"))
    assert classify_redis_error(exc) is RedisProblem.UNREACHABLE
    assert not is_write_refused(exc) and command_not_run(exc)  # refused at connect
    line = explain_redis_error(exc, refused_redis_url)
    assert line.startswith(f"Redis at {refused_redis_url} unreachable (Error 111 connecting")
    assert line.endswith("): start it or set NOTIFIER_REDIS_URL")
    assert "\n" not in line


def test_unknown_host_names_the_host():
    url = "redis://no-such-host.invalid:6390/0"
    exc = error_of(lambda: client(url).lpush("q", "x"))
    assert classify_redis_error(exc) is RedisProblem.HOST_NOT_FOUND
    assert command_not_run(exc)
    line = explain_redis_error(exc, url)
    assert line.startswith("Redis host 'no-such-host.invalid' not found (")
    assert line.endswith("): fix the host in NOTIFIER_REDIS_URL")


def test_silent_server_is_a_timeout(silent_url):
    exc = error_of(lambda: client(silent_url).lpush("q", "x"))
    assert classify_redis_error(exc) is RedisProblem.TIMEOUT
    assert not is_write_refused(exc) and not command_not_run(exc)  # it may have run
    line = explain_redis_error(exc, silent_url)
    assert line.startswith(f"Redis at {silent_url} did not answer in time (")
    assert classify_redis_error(TimeoutError()) is RedisProblem.TIMEOUT  # asyncio.wait_for


def test_loading_is_not_a_write_refusal():
    exc = BusyLoadingError("Redis is loading the dataset in memory")
    assert classify_redis_error(exc) is RedisProblem.LOADING
    assert not is_write_refused(exc)
    assert "still loading its data set" in explain_redis_error(exc)


def test_a_wrapper_is_explained_by_what_it_wraps(full):
    """An exception raised ``from`` a Redis error (the producer's NotifierUnavailable is a
    ConnectionError, hence an OSError) is explained by the Redis error, not by itself."""
    try:
        try:
            client(full).lpush("q", "x")
        except RedisError as exc:
            raise ConnectionError("wrapped") from exc
    except ConnectionError as wrapper:
        assert is_write_refused(wrapper)
        assert "wrapped" not in explain_redis_error(wrapper)


def test_no_password_reaches_the_line_even_if_the_error_repeats_the_url():
    url = f"redis://user:{PASSWORD}@127.0.0.1:6390/0"
    exc = RedisError(f"cannot use {url}: something odd")
    line = explain_redis_error(exc, url)
    assert PASSWORD not in line
    assert line == (
        "Redis at redis://user:***@127.0.0.1:6390/0 answered with an error: cannot use "
        "redis://user:***@127.0.0.1:6390/0: something odd"
    )
    other = RedisError("see rediss://:s3cret@elsewhere:6380/1")
    assert "s3cret" not in explain_redis_error(other)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6390/0", "redis://127.0.0.1:6390/0"),
        ("redis://:pw@127.0.0.1:6390/0", "redis://:***@127.0.0.1:6390/0"),
        ("rediss://u:pw@cache.example.com/2", "rediss://u:***@cache.example.com/2"),
        ("redis://:pw@[::1]:6390/0", "redis://:***@[::1]:6390/0"),
    ],
)
def test_redacted_url(url, shown):
    assert redacted_url(url) == shown


def test_a_long_error_stays_one_short_line():
    line = explain_redis_error(RedisError("x\n" * 500))
    assert "\n" not in line and len(line) < 300


# -- what the producer raises: refused (not queued) or timed out (may be queued) ----------------


@pytest.fixture
def frozen(server: RedisServer) -> Iterator[RedisServer]:
    """``frozen.freeze()`` stops the server process (SIGSTOP): connections still open, nothing
    answers. It is always resumed (SIGCONT) at teardown."""
    stopped = []

    def freeze() -> None:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        stopped.append(server.pid)

    def thaw() -> None:
        while stopped:
            with contextlib.suppress(ProcessLookupError):  # killed while frozen
                os.kill(stopped.pop(), signal.SIGCONT)

    server.freeze = freeze  # type: ignore[attr-defined]
    server.thaw = thaw  # type: ignore[attr-defined]
    yield server
    thaw()


@pytest.mark.parametrize("where", ["refused_redis_url", "full", "readonly", "misconf"])
def test_refused_means_not_queued(request, where):
    url = request.getfixturevalue(where)
    with Notifier(url) as n, pytest.raises(NotifierRefused) as info:
        n.send("止损", id="evt-1")
    exc = info.value
    assert isinstance(exc, NotifierUnavailable) and isinstance(exc, ConnectionError)
    assert exc.queued is False
    assert exc.event_id == "evt-1" and exc.event.id == "evt-1"
    assert str(exc).startswith("event evt-1 was not queued: Redis at ")
    line = explain_redis_error(exc.__cause__, url)
    assert str(exc).removeprefix("event evt-1 was not queued: ") == line
    assert explain_redis_error(exc, url) == line  # the helpers accept the producer's error
    assert is_write_refused(exc) is (where != "refused_redis_url")
    with client(url) as r:
        if where != "refused_redis_url":
            assert r.llen("notifier:queue") == 0


def test_refused_password_is_not_echoed(with_password):
    url = f"redis://:wrong-{PASSWORD}@127.0.0.1:{with_password}/0"
    with Notifier(url) as n, pytest.raises(NotifierRefused) as info:
        n.send("s")
    assert "refused the password" in str(info.value)
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value.args)


def test_a_frozen_redis_may_have_queued_the_event(frozen):
    """SIGSTOP while the producer is connected: LPUSH is written, no answer comes. The event
    may well be queued (here it is, once the server resumes), so the error must not say it
    was not; sending it again with the same id is safe."""
    with Notifier(frozen.url, timeout=0.3) as n:
        n.send("warm the connection")
        frozen.freeze()
        t0 = time.monotonic()
        with pytest.raises(NotifierTimeout) as info:
            n.send("止损触发", id="maybe-1")
        assert time.monotonic() - t0 < 1.0
        exc = info.value
        assert isinstance(exc, NotifierUnavailable) and isinstance(exc, TimeoutError)
        assert exc.queued is None and exc.event_id == "maybe-1"
        assert "not queued" not in str(exc)
        assert str(exc).startswith("event maybe-1 may or may not have been queued: Redis at ")
        assert "sending it again with the same id is safe" in str(exc)
        frozen.thaw()
        with client(frozen.url) as r:
            wait_until(lambda: r.llen("notifier:queue") == 2, 5, "the event to arrive")
            assert n.send_event(exc.event) == "maybe-1"  # the documented resend
            assert [json.loads(x)["id"] for x in r.lrange("notifier:queue", 0, 1)] == [
                "maybe-1",
                "maybe-1",
            ]


async def test_a_frozen_redis_may_have_queued_the_event_async(frozen):
    async with AsyncNotifier(frozen.url, timeout=0.3) as n:
        await n.send("warm the connection")
        frozen.freeze()
        with pytest.raises(NotifierTimeout) as info:
            await n.send("s", id="maybe-2")
        assert info.value.queued is None and info.value.event_id == "maybe-2"
        frozen.thaw()
    with client(frozen.url) as r:
        wait_until(lambda: r.llen("notifier:queue") == 2, 5, "the event to arrive")


async def test_async_refused_means_not_queued(full):
    async with AsyncNotifier(full) as n:
        with pytest.raises(
            NotifierRefused, match=r"^event \S+ was not queued: Redis at .* is full"
        ):
            await n.signal("ma", "600519.SH", "BUY", 1.0, 1)


def test_retry_s_rides_out_a_short_freeze(frozen):
    with Notifier(frozen.url, timeout=0.3) as n:
        n.send("warm")
        frozen.freeze()
        threading.Timer(0.5, frozen.thaw).start()
        t0 = time.monotonic()
        event_id = n.send("after the freeze", retry_s=3.0)
        assert time.monotonic() - t0 < 2.0
    with client(frozen.url) as r:
        ids = [json.loads(x)["id"] for x in r.lrange("notifier:queue", 0, -1)]
    assert event_id in ids  # maybe twice (the first attempt's copy): the worker sends one


@pytest.mark.parametrize("budget", [0.0, 0.7, 1.5])
def test_retry_s_never_blocks_longer_than_asked(frozen, budget):
    frozen.freeze()
    with Notifier(frozen.url, timeout=0.3) as n:
        t0 = time.monotonic()
        with pytest.raises(NotifierTimeout):
            n.send("s", retry_s=budget)
        elapsed = time.monotonic() - t0
    assert elapsed <= max(budget, 0.3) + 0.15


async def test_retry_s_never_blocks_longer_than_asked_async(refused_redis_url):
    async with AsyncNotifier(refused_redis_url, retry_s=0.6) as n:
        t0 = time.monotonic()
        with pytest.raises(NotifierRefused):
            await n.send("s")
        elapsed = time.monotonic() - t0
    assert 0.3 < elapsed <= 0.6 + 0.1  # it did retry, within the budget


def test_after_a_timeout_a_later_refusal_still_says_maybe_queued(frozen):
    """Attempt 1 times out (its LPUSH may be in), then the server dies (refused): the event
    may still have been queued, so the error is a timeout, not a refusal."""
    with Notifier(frozen.url, timeout=0.3) as n:
        n.send("warm")
        frozen.freeze()
        threading.Timer(0.4, frozen.kill).start()
        with pytest.raises(NotifierTimeout) as info:
            n.send("s", retry_s=1.5)
    assert info.value.queued is None
    assert "unreachable" in str(info.value)  # the last attempt's explanation
