"""Retry policy: ``worker.retry.backoff`` as a pure function, and the retry set's scheduler.

``backoff(attempts, base=, cap=)`` is exponential with full jitter: uniform in
``[0, min(cap, base * 2 ** (attempts - 1))]`` with a floor of ``base / 10``.
The scheduler (``Queue.schedule``, a Lua script) moves due entries of ``<prefix>:retry`` to
the front of the queue; several workers run it at once.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time

import pytest
import redis.asyncio as aredis
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.keys import Keys
from worker.queue import Queue
from worker.retry import Cooldown, backoff


class FixedRandom(random.Random):
    """A Random whose uniform() returns a fixed point of the interval (0 = low end)."""

    def __init__(self, where: float) -> None:
        super().__init__(0)
        self.where = where
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a + (b - a) * self.where


def test_ceiling_doubles_from_base_until_the_cap():
    delays = [backoff(n, base=1.0, cap=300.0, jitter=False) for n in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_ceiling_is_monotone_and_capped_for_huge_attempt_counts():
    previous = 0.0
    for n in [*range(1, 200), 1_000, 10_000, 10**9]:
        ceiling = backoff(n, base=0.05, cap=0.5, jitter=False)
        assert previous <= ceiling <= 0.5
        previous = ceiling
    assert backoff(10**9, base=1.0, cap=300.0) <= 300.0  # no OverflowError


@pytest.mark.parametrize("attempts", [0, -1, -100])
def test_attempts_below_one_are_refused(attempts):
    with pytest.raises(ValueError, match="attempts"):
        backoff(attempts, base=1.0, cap=10.0)


def test_full_jitter_spans_zero_to_the_ceiling():
    rng = FixedRandom(1.0)
    assert backoff(3, base=1.0, cap=300.0, rng=rng) == 4.0
    assert rng.calls == [(0.0, 4.0)]
    assert backoff(20, base=1.0, cap=300.0, rng=FixedRandom(1.0)) == 300.0
    assert backoff(2, base=1.0, cap=300.0, rng=FixedRandom(0.5)) == 1.0


def test_floor_is_a_tenth_of_base():
    # A server failing at once must not be hammered in a tight loop.
    for n in (1, 2, 5, 50):
        assert backoff(n, base=1.0, cap=300.0, rng=FixedRandom(0.0)) == pytest.approx(0.1)
        assert backoff(n, base=0.05, cap=0.5, rng=FixedRandom(0.0)) == pytest.approx(0.005)
    assert backoff(1, base=2.0, cap=300.0, rng=FixedRandom(0.01)) == pytest.approx(0.2)


class ShortThenLong(random.Random):
    """The unluckiest draws for a probe: the shortest wait every time, then the longest."""

    def __init__(self, short: int) -> None:
        super().__init__(0)
        self.short = short

    def uniform(self, a: float, b: float) -> float:
        self.short -= 1
        return a if self.short >= 0 else b


@pytest.mark.parametrize("short", [3, 6, 9, 12])
def test_a_cool_down_never_outgrows_the_outage_it_follows(short):
    """Whatever the draws, a resource probed each time its cool-down runs out (every probe
    failing) is probed again within twice the time since its first failure, plus base: once
    it is back, the wait is bounded by the outage (the SMTP outage test's promise). Full
    jitter broke it: short draws kept the outage short while the ceiling doubled."""
    now = [0.0]
    cooldown = Cooldown(lambda: now[0], rng=ShortThenLong(short))
    base, cap = 0.05, 15.0
    for _ in range(short + 1):
        delay = cooldown.trip(base=base, cap=cap)
        assert delay is not None
        assert delay <= 2 * now[0] + base, (now[0], delay)
        now[0] = cooldown.until  # the probe fails as soon as it may run
    assert cooldown.trip(base=base, cap=cap) is not None


def test_a_running_cool_down_is_one_incident():
    now = [0.0]
    cooldown = Cooldown(lambda: now[0], rng=FixedRandom(1.0))
    assert cooldown.trip(base=1.0, cap=60.0) == 1.0
    now[0] = 0.5
    assert cooldown.trip(base=1.0, cap=60.0) is None  # every lane failing at once
    now[0] = 1.0
    assert cooldown.trip(base=1.0, cap=60.0) == 2.0
    assert cooldown.trip(base=1.0, cap=60.0, jitter=False) is None
    cooldown.reset()
    assert cooldown.trip(base=1.0, cap=60.0, jitter=False) == 1.0


def test_seeded_rng_is_reproducible_and_seeds_differ():
    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [backoff(n, base=1.0, cap=60.0, rng=rng) for n in range(1, 30)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_bounds_over_many_draws():
    rng = random.Random(1234)
    for n in range(1, 15):
        ceiling = backoff(n, base=0.5, cap=20.0, jitter=False)
        draws = [backoff(n, base=0.5, cap=20.0, rng=rng) for _ in range(300)]
        assert min(draws) >= 0.05
        assert max(draws) <= ceiling
        # Full jitter: the draws really spread over the interval.
        assert max(draws) - min(draws) > 0.5 * ceiling - 0.05


def test_full_jitter_mean_is_half_the_ceiling():
    rng = random.Random(42)
    draws = [backoff(6, base=1.0, cap=300.0, rng=rng) for _ in range(4000)]
    assert statistics.fmean(draws) == pytest.approx(16.0, rel=0.05)


def test_without_rng_uses_the_module_random_and_stays_in_bounds():
    draws = {backoff(4, base=1.0, cap=300.0) for _ in range(50)}
    assert len(draws) > 1
    assert all(0.1 <= d <= 8.0 for d in draws)


@settings(max_examples=300, deadline=None)
@given(
    attempts=st.integers(min_value=1, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=100.0),
    spread=st.floats(min_value=1.0, max_value=10_000.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_properties(attempts, base, spread, seed):
    cap = base * spread  # settings guarantee RETRY_MAX_S >= RETRY_BASE_S
    ceiling = backoff(attempts, base=base, cap=cap, jitter=False)
    assert math.isfinite(ceiling)
    assert base <= ceiling <= cap * (1 + 1e-12)
    assert ceiling == pytest.approx(min(cap, base * 2.0 ** min(attempts - 1, 60)))
    assert backoff(attempts + 1, base=base, cap=cap, jitter=False) >= ceiling
    delay = backoff(attempts, base=base, cap=cap, rng=random.Random(seed))
    assert base / 10 - 1e-12 <= delay <= ceiling
    assert delay == backoff(attempts, base=base, cap=cap, rng=random.Random(seed))


# -- the retry set and its scheduler (real redis-server) --------------------------------


@pytest.fixture
async def aredis_client(redis_url):
    client = aredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _event(i: int, attempts: int = 1) -> str:
    return json.dumps(
        {"id": f"r{i}", "subject": f"retry {i}", "_meta": {"attempts": attempts}},
        separators=(",", ":"),
    )


async def test_schedule_moves_only_due_entries_to_the_front(aredis_client):
    keys = Keys("notifier")
    queue = Queue(aredis_client, keys, "w-test")
    now = time.time()
    await aredis_client.lpush(keys.queue, "waiting-1", "waiting-2")  # oldest: waiting-1
    await aredis_client.zadd(
        keys.retry,
        {_event(1): now - 3, _event(2): now - 1, _event(3): now + 60, _event(4): now - 2},
    )
    assert await queue.next_due() == pytest.approx(now - 3)
    moved = await queue.schedule(now)
    assert moved == 3
    # The earliest due is first in line (the right end), ahead of events already waiting.
    assert await aredis_client.rpop(keys.queue) == _event(1).encode()
    assert await aredis_client.rpop(keys.queue) == _event(4).encode()
    assert await aredis_client.rpop(keys.queue) == _event(2).encode()
    assert await aredis_client.rpop(keys.queue) == b"waiting-1"
    assert await aredis_client.zrange(keys.retry, 0, -1) == [_event(3).encode()]
    assert await queue.schedule(now) == 0
    # The attempt count travels with the event text.
    assert json.loads(_event(3))["_meta"]["attempts"] == 1


async def test_concurrent_schedulers_move_each_entry_exactly_once(redis_url):
    keys = Keys("notifier")
    clients = [aredis.Redis.from_url(redis_url) for _ in range(6)]
    try:
        now = time.time()
        n = 2000
        entries = {_event(i): now - random.random() for i in range(n)}
        entries |= {_event(n + i): now + 3600 for i in range(50)}  # not due
        await clients[0].zadd(keys.retry, entries)
        queues = [Queue(c, keys, f"w{i}") for i, c in enumerate(clients)]

        async def drain(q: Queue) -> int:
            total = 0
            while moved := await q.schedule(now, limit=37):
                total += moved
            return total

        moved = await asyncio.gather(*(drain(q) for q in queues))
        assert sum(moved) == n
        queued = await clients[0].lrange(keys.queue, 0, -1)
        assert len(queued) == n
        assert len(set(queued)) == n  # nothing twice
        assert await clients[0].zcard(keys.retry) == 50
    finally:
        for c in clients:
            await c.aclose()


# -- the back-off of a whole SMTP account (pause on configuration errors) ----------------


def _health(now: list[float]):
    from worker.channels import Health

    return Health("qq", clock=lambda: now[0], throttle_base_s=30, throttle_cap_s=300,
                  down_base_s=1.0, down_cap_s=30)  # fmt: skip


def test_one_incident_seen_by_every_lane_does_not_escalate_the_pause():
    """A bad password fails every lane's login at the same moment: that is one failed
    login, and the pause must stay at its first step (``PAUSE_MIN_S``) until a probe
    after the pause fails too. Doubling once per lane makes a worker with 8 lanes wait
    5 s x 2**7 (capped at 5 min) before it even tries the corrected password."""
    from worker.channels import Health
    from worker.errors import ConfigurationError

    now = [100.0]
    health = _health(now)
    err = ConfigurationError("Error: authentication failed", code=535)
    for _ in range(8):  # every lane reports the same failure
        health.failed(err)
    assert health.paused and health.state == "paused"
    assert health.pause_remaining() == Health.PAUSE_MIN_S
    now[0] += Health.PAUSE_MIN_S
    assert health.available()  # the pause ran out: the next send probes the login
    health.failed(err)  # the probe failed too: now it doubles
    assert health.pause_remaining() == 2 * Health.PAUSE_MIN_S
    assert health.succeeded() is True and health.state == "ok" and health.available()


def test_one_outage_seen_by_every_lane_does_not_escalate_the_cool_down():
    """The same for an unreachable server: the lanes that fail together are one failed
    probe. The cool-down starts at its first step; only a probe after it that fails
    again doubles it. (Doubling per lane turns a 3 s outage into a 16 s wait with four
    lanes; see test_faults.py::test_smtp_down_for_60_s_...)"""
    from worker.errors import TransientError

    now = [100.0]
    health = _health(now)
    err = TransientError("Error connecting to 127.0.0.1 on port 2525: Connect call failed")
    for _ in range(4):
        health.failed(err)
    wait = health.retry_at() - now[0]
    assert not health.available() and health.state == "down"
    assert wait <= 1.0, wait


def test_cooldown_grows_only_when_a_probe_fails():
    from worker.retry import Cooldown

    now = [100.0]
    cd = Cooldown(lambda: now[0])
    assert cd.trip(base=5, cap=300, jitter=False) == 5
    assert cd.trip(base=5, cap=300, jitter=False) is None  # same incident: unchanged
    assert cd.remaining() == 5
    now[0] += 5  # it ran out; the probe fails again
    assert cd.trip(base=5, cap=300, jitter=False) == 10
    now[0] += 10
    assert cd.trip(base=5, cap=300, jitter=False) == 20
    cd.reset()
    assert cd.remaining() == 0 and cd.trip(base=5, cap=300, jitter=False) == 5
