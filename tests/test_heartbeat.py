"""Heartbeats from the producer (producer/client.py, producer/keepalive.py) and the shell
(`notifier push --heartbeat`), against redis-server processes these tests start, stop
(SIGSTOP: frozen), kill -9 and restart on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from producer import (
    AsyncNotifier,
    InvalidEvent,
    Notifier,
    NotifierRefused,
    NotifierTimeout,
)
from producer import keepalive as keepalive_module
from tests.support.helpers import REPO_ROOT, clean_env, wait_until
from worker.cli import main
from worker.devtools.redis_server import RedisServer

SEEN = "notifier:seen"
QUICK_S = 0.3  # the producers' timeout in the tests that freeze Redis
SLACK_S = 0.2


@pytest.fixture(autouse=True)
def _no_notifier_env(monkeypatch):
    monkeypatch.delenv("NOTIFIER_REDIS_URL", raising=False)
    monkeypatch.delenv("NOTIFIER_KEY_PREFIX", raising=False)
    monkeypatch.delenv("NOTIFIER_ENV_FILE", raising=False)


@pytest.fixture
def server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A Redis of this test alone: these tests freeze, kill and restart it."""
    return redis_factory()


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """The server stopped (SIGSTOP) for the block: connections stay open, nothing answers."""
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def seen_of(url: str, strategy: str) -> float | None:
    with redis.Redis.from_url(url) as r:
        return r.zscore(SEEN, strategy)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        rec.getMessage()
        for rec in caplog.records
        if rec.name == "producer.keepalive" and rec.levelno == logging.WARNING
    ]


# -- one heartbeat ---------------------------------------------------------------------------


def test_heartbeat_is_one_zadd_gt_of_the_time_now(redis_url, r):
    r.config_resetstat()
    with Notifier(redis_url) as n:
        before = time.time()
        assert n.heartbeat("ma_cross") is None
        assert before <= r.zscore(SEEN, "ma_cross") <= time.time()
        commands = r.info("commandstats")
        assert commands["cmdstat_zadd"]["calls"] == 1
        assert not {"cmdstat_lpush", "cmdstat_set", "cmdstat_hset"} & set(commands)
        # GT: a newer time (here from the worker, or another host) is never moved back
        r.zadd(SEEN, {"ma_cross": before + 1000})
        n.heartbeat("ma_cross")
        assert r.zscore(SEEN, "ma_cross") == before + 1000
        # ... and an older one is replaced
        r.zadd(SEEN, {"grid_btc": 1.0})
        n.heartbeat("grid_btc")
        assert r.zscore(SEEN, "grid_btc") >= before
    with Notifier(redis_url, key_prefix="desk2") as n:
        n.heartbeat("网格_btc")
    assert r.zscore("desk2:seen", "网格_btc") >= before
    assert r.zcard(SEEN) == 2


async def test_async_heartbeat(redis_url, r):
    r.zadd(SEEN, {"late": time.time() + 1000})
    async with AsyncNotifier(redis_url) as n:
        before = time.time()
        await n.heartbeat("ma_cross")
        await n.heartbeat("late")
    assert before <= r.zscore(SEEN, "ma_cross") <= time.time()
    assert r.zscore(SEEN, "late") > before + 900


@pytest.mark.parametrize(
    ("strategy", "words"),
    [
        ("", "'' is empty"),
        ("ma\ncross", "control character"),
        ("x" * 129, "is 129 characters long"),
        (None, "None is a NoneType, not a name"),
    ],
)
def test_a_bad_strategy_name_is_one_line_before_any_redis_call(refused_redis_url, strategy, words):
    n = Notifier(refused_redis_url)
    for call in (n.heartbeat, n.keepalive):
        with pytest.raises(InvalidEvent) as info:
            call(strategy)
        message = str(info.value)
        assert message.startswith("strategy ") and words in message, message
        assert "1 to 128 characters on one line" in message and "\n" not in message
        assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("every_s", [0, -1.0, True, "30"])
def test_a_bad_interval_is_one_line(refused_redis_url, every_s):
    with pytest.raises(ValueError, match=r"^every_s=.*: give a number of seconds above 0$"):
        Notifier(refused_redis_url).keepalive("ma_cross", every_s=every_s)


def test_heartbeat_refused(refused_redis_url):
    with Notifier(refused_redis_url) as n, pytest.raises(NotifierRefused) as info:
        n.heartbeat("ma_cross")
    exc = info.value
    assert exc.queued is False and exc.event is None and exc.event_id is None
    assert str(exc).startswith(
        f"heartbeat of 'ma_cross' was not recorded: Redis at {refused_redis_url} unreachable"
    )


async def test_heartbeat_retries_within_retry_s(refused_redis_url):
    async with AsyncNotifier(refused_redis_url, retry_s=0.4) as n:
        t0 = time.monotonic()
        with pytest.raises(NotifierRefused, match=r"^heartbeat of 'ma_cross' was not recorded"):
            await n.heartbeat("ma_cross")
    assert 0.2 < time.monotonic() - t0 <= 0.4 + 0.1  # it did retry, within the budget


def test_heartbeat_on_a_frozen_redis_times_out_in_the_client_timeout(server):
    with Notifier(server.url) as n:  # the default timeout: 0.5 s
        n.heartbeat("warm")
        with frozen(server):
            t0 = time.monotonic()
            with pytest.raises(NotifierTimeout) as info:
                n.heartbeat("ma_cross")
            assert 0.4 < time.monotonic() - t0 < 0.5 + SLACK_S
    assert info.value.queued is None and info.value.event is None
    assert str(info.value).startswith("heartbeat of 'ma_cross' may or may not have been recorded")
    assert "did not answer in time" in str(info.value)


# -- the keep-alive thread ---------------------------------------------------------------------


def test_keepalive_beats_at_once_then_at_its_interval(redis_url, r):
    with Notifier(redis_url) as n:
        with n.keepalive("ma_cross", every_s=0.1) as ka:
            assert wait_until(lambda: ka.beats >= 1, 1.0, "the first beat") < 0.08
            first = r.zscore(SEEN, "ma_cross")
            clients = len(r.client_list())
            n.send("the strategy's own connection is not the keep-alive's")
            assert len(r.client_list()) == clients + 1
            time.sleep(0.45)
            assert 5 <= ka.beats <= 6, ka.beats
            assert r.zscore(SEEN, "ma_cross") > first
            assert ka.running and not ka.failing
        assert not ka.running
        beats = ka.beats
        time.sleep(0.15)
        assert ka.beats == beats  # stopped for good
        ka.stop()  # idempotent
        assert n.send("the strategy's own client is still open")


def test_closing_the_notifier_stops_its_keepalives(redis_url):
    with Notifier(redis_url) as n:
        handles = [n.keepalive(name, every_s=10) for name in ("ma_cross", "grid_btc")]
        wait_until(lambda: all(ka.beats for ka in handles), 1.0, "the first beats")
    assert not any(ka.running for ka in handles)


def test_a_frozen_redis_never_delays_the_strategy(server):
    """A keep-alive stuck on a frozen Redis holds nothing the strategy needs: each send fails
    in its own timeout, the main thread keeps running, stop() returns promptly."""
    with Notifier(server.url, timeout=QUICK_S) as n:
        n.send("warm the strategy's connection")
        ka = n.keepalive("ma_cross", every_s=0.05)
        wait_until(lambda: ka.beats >= 1, 1.0, "the first beat")
        with frozen(server):
            for _ in range(3):
                t0 = time.monotonic()
                with pytest.raises(NotifierTimeout):
                    n.send("s")
                assert time.monotonic() - t0 < QUICK_S + SLACK_S
            gaps, last = [], time.monotonic()
            while time.monotonic() - last < 0.4 and len(gaps) < 40:
                time.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()
            assert max(gaps) < 0.06, max(gaps)
            assert ka.failing
            t0 = time.monotonic()
            ka.stop()
            assert time.monotonic() - t0 < QUICK_S + SLACK_S
    wait_until(lambda: not ka.running, QUICK_S + 1.0, "the stuck beat to end the thread")


def test_keepalive_logs_an_outage_once_and_resumes_after_a_restart(server, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="producer.keepalive")
    monkeypatch.setattr(keepalive_module, "OUTAGE_RETRY_S", 0.05)  # else min(every_s, 5 s)
    with Notifier(server.url, timeout=QUICK_S) as n, n.keepalive("ma_cross", every_s=1.5) as ka:
        wait_until(lambda: ka.beats == 1, 1.0, "the first beat")
        for outage in (1, 2):
            server.kill()
            wait_until(lambda: ka.failing, 3.0, "a failed beat")
            time.sleep(0.25)  # several more failed beats: still one line
            assert len(warnings_of(caplog)) == 2 * outage - 1, warnings_of(caplog)
            line = warnings_of(caplog)[-1]
            assert line.startswith("keep-alive of 'ma_cross': heartbeat failed: Redis at ")
            assert server.url in line and line.endswith("; trying again every 0.05 s")
            server.start()  # same port, empty data set
            took = wait_until(lambda: seen_of(server.url, "ma_cross"), 2.0, "a beat")
            assert took < 0.4  # retried every 0.05 s, not every_s (1.5 s)
            assert not ka.failing
            assert len(warnings_of(caplog)) == 2 * outage
            assert warnings_of(caplog)[-1].startswith(
                "keep-alive of 'ma_cross': heartbeats recorded again after "
            )
    assert not ka.running


CHILD = """
import sys, time
from producer import Notifier
ka = Notifier(sys.argv[1], timeout=2.0).keepalive("child", every_s=0.05)
time.sleep(0.15)
print(time.monotonic(), flush=True)
"""


@pytest.mark.parametrize("freeze", [False, True], ids=["running", "frozen"])
def test_a_process_with_a_keepalive_exits_when_main_returns(server, freeze):
    """The thread is a daemon: the interpreter does not wait for it, even while its beat
    hangs (here up to 2 s) on a frozen Redis."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": str(REPO_ROOT)}
    with frozen(server) if freeze else contextlib.nullcontext():
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, server.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )
        ended = time.monotonic()
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert ended - float(proc.stdout) < 0.5
    assert (seen_of(server.url, "child") is None) is freeze


# -- the asyncio keep-alive --------------------------------------------------------------------


async def test_async_keepalive_beats_and_stop_cancels_its_task(redis_url):
    async with AsyncNotifier(redis_url) as n:
        ka = n.keepalive("ma_cross", every_s=0.05)
        await asyncio.sleep(0.22)
        assert 4 <= ka.beats <= 6, ka.beats
        assert seen_of(redis_url, "ma_cross") is not None
        ka.stop()
        t0 = time.monotonic()
        await ka.wait_stopped()  # (it closes its own Redis client)
        assert time.monotonic() - t0 < 0.05 and not ka.running
        beats = ka.beats
        await asyncio.sleep(0.1)
        assert ka.beats == beats
        async with n.keepalive("grid_btc", every_s=10) as ka:
            await asyncio.sleep(0.05)
            assert ka.running and ka.beats == 1
        assert not ka.running  # async with waits for the end of the task
        with n.keepalive("with", every_s=10) as ka:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.01)
        assert not ka.running and ka.beats == 1
        assert seen_of(redis_url, "with") is not None
        ka = n.keepalive("left running", every_s=10)
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.01)
    assert not ka.running  # aclose() stopped it


async def test_async_keepalive_on_a_frozen_redis(server, caplog):
    caplog.set_level(logging.WARNING, logger="producer.keepalive")
    async with AsyncNotifier(server.url, timeout=QUICK_S) as n:
        await n.send("warm the strategy's connection")
        async with n.keepalive("ma_cross", every_s=0.05) as ka:
            await asyncio.sleep(0.05)
            with frozen(server):
                t0 = time.monotonic()
                with pytest.raises(NotifierTimeout):
                    await n.send("s")
                assert time.monotonic() - t0 < QUICK_S + SLACK_S
                await asyncio.sleep(0.3)
                assert ka.failing
                t0 = time.monotonic()
        assert time.monotonic() - t0 < 0.1  # cancelled mid-beat
    assert len(warnings_of(caplog)) == 1
    assert "did not answer in time" in warnings_of(caplog)[0]


def test_async_keepalive_outside_a_loop_is_one_clear_error(refused_redis_url):
    with pytest.raises(RuntimeError, match=r"call it from a coroutine \(Notifier.keepalive"):
        AsyncNotifier(refused_redis_url).keepalive("ma_cross")


# -- notifier push --heartbeat -----------------------------------------------------------------


def test_push_heartbeat_from_the_shell(redis_url, r, tmp_path):
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONPATH": str(REPO_ROOT),
        "NOTIFIER_REDIS_URL": redis_url,
        "NOTIFIER_KEY_PREFIX": "desk2",
    }
    before = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "push", "--heartbeat", "ma_cross"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0,
        "heartbeat of ma_cross recorded\n",
        "",
    )
    assert before <= r.zscore("desk2:seen", "ma_cross") <= time.time()
    assert r.llen("desk2:queue") == 0  # no event, nothing to mail


@pytest.mark.parametrize(
    ("args", "code", "line"),
    [
        (["--heartbeat", ""], 2, "--heartbeat: strategy '' is empty: give the strategy's name"),
        (
            ["s", "--heartbeat", "ma", "--data", "a=1"],
            2,
            "--heartbeat records a sign of life, not an event: leave out a subject, --data (",
        ),
        (["--heartbeat", "ma"], 1, "Redis at {url} unreachable"),
    ],
    ids=["empty", "with-event-fields", "redis-down"],
)
def test_push_heartbeat_errors_are_one_line(
    monkeypatch, tmp_path, capsys, refused_redis_url, args, code, line
):
    clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("NOTIFIER_REDIS_URL", refused_redis_url)
    assert main(["push", *args, "--env-file", os.devnull]) == code
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("notifier push: " + line.format(url=refused_redis_url)), err
