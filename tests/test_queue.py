"""worker/queue.py against the private redis-server: every move keeps the invariant.

An event is in exactly one of queue, processing, retry or dead (or delivered). Producers
LPUSH; workers take the oldest from the right end; retries and requeues go to that end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis
import redis.asyncio as aredis
import redis.exceptions

from producer.keys import Keys
from tests.support.helpers import sent_marks
from worker.queue import Queue, connect
from worker.records import DeliveryRecord


def R(fields: dict) -> DeliveryRecord:
    """A delivery record from its wire form (the tests write them as dicts)."""
    return DeliveryRecord.from_json(json.dumps(fields))


KEYS = Keys("notifier")


@pytest.fixture
async def r(redis_url) -> AsyncIterator[aredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_queue(redis_url) -> AsyncIterator[Callable[..., Queue]]:
    clients: list[aredis.Redis] = []

    def make(worker_id: str = "w1", **kwargs) -> Queue:
        client = connect(redis_url)
        clients.append(client)
        return Queue(client, KEYS, worker_id, **kwargs)

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def q(make_queue) -> Queue:
    return make_queue("w1", sent_ttl_s=3600, deliveries_kept=100)


def ev(n: int | str) -> bytes:
    return json.dumps({"id": f"e{n}", "subject": f"事件 {n}"}, ensure_ascii=False).encode()


async def lrange(r: aredis.Redis, key: str) -> list[bytes]:
    return list(await r.lrange(key, 0, -1))


async def push(r: aredis.Redis, *events: bytes) -> None:
    for e in events:
        await r.lpush(KEYS.queue, e)


# -- fetch ------------------------------------------------------------------------------------


async def test_lpush_then_fetch_takes_the_oldest_first(q, r):
    await push(r, ev(1), ev(2), ev(3))
    assert await q.fetch_ready(1) == [ev(1)]
    assert await q.fetch_ready(1) == [ev(2)]
    assert await lrange(r, KEYS.queue) == [ev(3)]
    assert await lrange(r, "notifier:processing:w1") == [ev(2), ev(1)]


async def test_fetch_ready_batch(q, r):
    await push(r, *(ev(i) for i in range(10)))
    batch = await q.fetch_ready(4)
    assert batch == [ev(0), ev(1), ev(2), ev(3)]
    rest = await q.fetch_ready(100)
    assert rest == [ev(i) for i in range(4, 10)]
    assert await q.fetch_ready(5) == []
    assert await q.fetch_ready(0) == []
    assert await r.llen(KEYS.queue) == 0
    assert await r.llen(KEYS.processing("w1")) == 10


async def test_fetch_blocking_returns_none_after_the_timeout(q, redis_url):
    blocking = connect(redis_url)
    try:
        t0 = time.monotonic()
        assert await q.fetch_blocking(blocking, 0.2) is None
        assert 0.15 <= time.monotonic() - t0 < 2.0
    finally:
        await blocking.aclose()


async def test_fetch_blocking_wakes_when_another_client_pushes(q, r, redis_url):
    blocking = connect(redis_url)
    try:
        waiter = asyncio.create_task(q.fetch_blocking(blocking, 5.0))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        pushed = time.monotonic()
        await r.lpush(KEYS.queue, ev("late"))
        got = await asyncio.wait_for(waiter, 2.0)
        assert got == ev("late")
        assert time.monotonic() - pushed < 0.5  # woken at once, not at the timeout
        assert await lrange(r, KEYS.processing("w1")) == [ev("late")]
        assert await r.llen(KEYS.queue) == 0
    finally:
        await blocking.aclose()


# -- settle -----------------------------------------------------------------------------------


async def test_ack_removes_exactly_that_element_and_marks_sent(q, r):
    same = ev("dup")
    await push(r, ev(1), same, ev(2), same)
    await q.fetch_ready(4)
    record = R({"t": time.time(), "o": "sent", "id": "e1", "l": 0.05})
    await q.ack(ev(1), q.claim_for("e1", "t"), record)
    assert sorted(await lrange(r, KEYS.processing("w1"))) == sorted([same, ev(2), same])
    await q.ack(
        same, q.claim_for("edup", "t"), R({"t": time.time(), "o": "sent", "id": "edup", "l": 0.1})
    )
    assert sorted(await lrange(r, KEYS.processing("w1"))) == sorted([same, ev(2)])
    assert await r.get(KEYS.sent("e1")) is not None
    assert 3500 < await r.ttl(KEYS.sent("e1")) <= 3600
    assert await sent_marks(q, ["e1", "edup", "e2"]) == [True, True, False]
    records = [json.loads(x) for x in await lrange(r, KEYS.deliveries)]
    assert [x["id"] for x in records] == ["edup", "e1"]  # newest first
    assert R(records[1]) == DeliveryRecord(round(record.t, 3), record.status, "e1", latency_s=0.05)
    assert (await q.counters())["delivered"] == 2


async def test_ack_many_in_one_round_trip(q, r):
    await push(r, ev(1), ev(2), ev(3))
    await q.fetch_ready(3)
    await asyncio.gather(
        q.ack(ev(1), q.claim_for("e1", "t"), R({"o": "sent"})),
        q.ack(ev(3), q.claim_for("e3", "t"), R({"o": "sent"})),
    )
    assert await lrange(r, KEYS.processing("w1")) == [ev(2)]
    assert await sent_marks(q, ["e1", "e2", "e3"]) == [True, False, True]


async def test_deliveries_are_capped(make_queue, r):
    q = make_queue("w1", deliveries_kept=100)
    for i in range(105):
        await r.lpush(KEYS.processing("w1"), ev(i))
        await q.ack(ev(i), q.claim_for(f"e{i}", "t"), R({"t": i, "o": "sent"}))
    assert await r.llen(KEYS.deliveries) == 100
    assert (await q.counters())["delivered"] == 105


async def test_drop_a_duplicate(q, r):
    await push(r, ev(1))
    await q.fetch_ready(1)
    await q.drop(ev(1), R({"t": 1, "o": "duplicate", "id": "e1"}))
    assert await r.llen(KEYS.processing("w1")) == 0
    assert (await q.counters())["duplicates_skipped"] == 1


async def test_retry_puts_the_updated_text_in_the_zset(q, r):
    await push(r, ev(1), ev(2))
    await q.fetch_ready(2)
    again = json.dumps({"id": "e1", "subject": "事件 1", "_meta": {"attempts": 1}})
    due = time.time() + 30
    await q.retry(ev(1), again, due, R({"t": time.time(), "o": "retry", "reason": "transient"}))
    assert await lrange(r, KEYS.processing("w1")) == [ev(2)]
    entries = await r.zrange(KEYS.retry, 0, -1, withscores=True)
    assert entries == [(again.encode(), pytest.approx(due))]
    assert await q.next_due() == pytest.approx(due)
    counters = await q.counters()
    assert counters["retried"] == 1 and counters["retried:transient"] == 1


async def test_bury_moves_to_dead_with_the_reason(q, r):
    await push(r, ev(1))
    await q.fetch_ready(1)
    letter = {"event": ev(1).decode(), "id": "e1", "reason": "permanent", "error": "550 no"}
    await q.bury(ev(1), letter, R({"t": time.time(), "o": "dead", "reason": "permanent"}))
    assert await r.llen(KEYS.processing("w1")) == 0
    ((raw, stored),) = await q.dead_letters()
    assert stored == letter
    assert "事件".encode() in raw  # kept readable, not \\u-escaped
    assert (await q.counters())["dead:permanent"] == 1


async def test_split_acks_and_schedules_the_refused_part(q, r):
    await push(r, ev(1))
    await q.fetch_ready(1)
    await q.split(
        ev(1),
        q.claim_for("e1", "t"),
        R({"o": "sent"}),
        '{"id":"e1.r1","subject":"s"}',
        time.time() + 5,
    )
    assert await r.llen(KEYS.processing("w1")) == 0
    assert await sent_marks(q, ["e1"]) == [True]
    assert await r.zcard(KEYS.retry) == 1


async def test_requeue_puts_it_at_the_front(q, r):
    await push(r, ev(1), ev(2), ev(3))
    (first,) = await q.fetch_ready(1)
    await q.requeue(first, R({"t": 1, "o": "requeued", "id": "e1", "reason": "fenced"}))
    assert await r.llen(KEYS.processing("w1")) == 0
    assert await q.fetch_ready(3) == [ev(1), ev(2), ev(3)]  # first in line again


# -- schedule -----------------------------------------------------------------------------------


async def test_schedule_moves_only_due_entries_to_the_front(q, r):
    now = time.time()
    await push(r, ev("waiting"))
    await r.zadd(KEYS.retry, {ev("due-late"): now - 1, ev("due-early"): now - 10})
    await r.zadd(KEYS.retry, {ev("future"): now + 60})
    assert await q.schedule(now) == 2
    assert await r.zrange(KEYS.retry, 0, -1) == [ev("future")]
    # the earliest due is first in line, and both come before what was already waiting
    assert await q.fetch_ready(10) == [ev("due-early"), ev("due-late"), ev("waiting")]
    assert await q.schedule(now) == 0


async def test_schedule_respects_the_limit(q, r):
    now = time.time()
    await r.zadd(KEYS.retry, {ev(i): now - 100 + i for i in range(5)})
    assert await q.schedule(now, limit=2) == 2
    assert await r.zcard(KEYS.retry) == 3
    assert await q.fetch_ready(10) == [ev(0), ev(1)]


# -- recover ------------------------------------------------------------------------------------


async def test_recover_returns_a_dead_workers_events_and_leaves_a_live_one(make_queue, r):
    dead = make_queue("dead-worker", heartbeat_ttl_s=2)
    live = make_queue("live-worker", heartbeat_ttl_s=30)
    me = make_queue("me", heartbeat_ttl_s=30)
    await dead.heartbeat({"pid": 1})
    await live.heartbeat({"pid": 2})
    await me.heartbeat({"pid": 3})
    await push(r, ev(1), ev(2), ev(3), ev(4), ev("waiting"))
    assert await dead.fetch_ready(3) == [ev(1), ev(2), ev(3)]
    assert await live.fetch_ready(1) == [ev(4)]
    await r.delete(KEYS.heartbeat("dead-worker"))  # its heartbeat expired

    assert await me.recover() == {"dead-worker": 3}
    assert await r.llen(KEYS.processing("dead-worker")) == 0
    assert await lrange(r, KEYS.processing("live-worker")) == [ev(4)]
    members = {m.decode() for m in await r.smembers(KEYS.workers)}
    assert members == {"live-worker", "me"}
    # the recovered events are first in line, oldest first, before what was waiting
    assert await me.fetch_ready(10) == [ev(1), ev(2), ev(3), ev("waiting")]
    assert await me.recover() == {}


async def test_recover_after_the_heartbeat_ttl_expires(make_queue, r):
    crashed = make_queue("crashed", heartbeat_ttl_s=2)
    crashed.heartbeat_ttl_ms = 100  # as if it last beat a while ago
    other = make_queue("other")
    await crashed.heartbeat({})
    await push(r, ev(1))
    await crashed.fetch_ready(1)
    assert await other.recover() == {}  # still alive
    await asyncio.sleep(0.25)
    assert await other.recover() == {"crashed": 1}
    assert await lrange(r, KEYS.queue) == [ev(1)]


async def test_requeue_all_returns_own_processing_list(q, r):
    await q.heartbeat({})
    await push(r, ev(1), ev(2), ev(3))
    await q.fetch_ready(2)
    assert await q.requeue_all() == 2
    assert await q.fetch_ready(3) == [ev(1), ev(2), ev(3)]
    assert "w1" in {m.decode() for m in await r.smembers(KEYS.workers)}  # still registered


async def test_heartbeat_and_deregister(q, r):
    await q.heartbeat({"pid": 42})
    assert await q.workers() == {"w1": {"pid": 42}}
    assert 0 < await r.pttl(KEYS.heartbeat("w1")) <= 10_000
    await q.deregister()
    assert await q.workers() == {}


async def test_depths(make_queue, r):
    a, b = make_queue("a"), make_queue("b")
    await a.heartbeat({})
    await b.heartbeat({})
    await push(r, *(ev(i) for i in range(6)))
    await a.fetch_ready(2)
    await b.fetch_ready(1)
    await r.zadd(KEYS.retry, {ev("r"): time.time() + 60})
    await r.lpush(KEYS.dead, "{}")
    d = await a.depths()
    assert (d.queue, d.retry, d.dead, d.processing) == (3, 1, 1, 3)


# -- dead letters ---------------------------------------------------------------------------------


async def bury_three(q: Queue, r: aredis.Redis) -> None:
    await push(r, ev(1), ev(2), ev(3))
    await q.fetch_ready(3)
    for i in (1, 2, 3):
        letter = {"event": ev(i).decode(), "id": f"e{i}", "reason": "permanent", "error": "x"}
        await q.bury(ev(i), letter, R({"o": "dead", "reason": "permanent"}))


async def test_dead_letters_list_newest_first_with_limit(q, r):
    await bury_three(q, r)
    letters = await q.dead_letters()
    assert [d["id"] for _, d in letters] == ["e3", "e2", "e1"]
    assert [d["id"] for _, d in await q.dead_letters(2)] == ["e3", "e2"]
    assert len(await q.dead_letters(0)) == 3  # 0 = all


async def test_dead_letter_replay_moves_exactly_one(q, r):
    await bury_three(q, r)
    letters = await q.dead_letters()
    raw, letter = letters[1]
    assert await q.replay(raw, letter["event"])
    assert not await q.replay(raw, letter["event"])  # already replayed: no duplicate
    assert [d["id"] for _, d in await q.dead_letters()] == ["e3", "e1"]
    assert await lrange(r, KEYS.queue) == [ev(2)]


async def test_dead_letter_purge(q, r):
    await bury_three(q, r)
    assert await q.purge_dead() == 3
    assert await q.dead_letters() == []
    assert await q.purge_dead() == 0


async def test_pause_flag(q, r):
    await q.set_paused("535 auth failed", ttl_s=60)
    info = json.loads(await r.get(KEYS.paused))
    assert info["worker"] == "w1" and info["reason"] == "535 auth failed"
    await q.set_paused(None)
    assert await r.exists(KEYS.paused) == 0


async def test_recent_outcomes_since(q, r):
    now = time.time()
    for i, t in enumerate([now - 100, now - 10, now - 1]):
        await r.lpush(KEYS.deliveries, json.dumps({"t": t, "o": "sent", "id": f"e{i}"}))
    assert [x.id for x in await q.recent(now - 50)] == ["e2", "e1"]


async def test_reconcile_returns_what_the_worker_does_not_hold(q, r):
    """A fetch whose reply was lost (Redis restarted) leaves events in the processing list
    that the worker never received: reconcile puts exactly those back at the front."""
    proc = q.processing
    await r.rpush(proc, b"a", b"b", b"b", b"c")
    await r.rpush(KEYS.queue, b"older")
    moved = await q.reconcile([b"b", b"c"])
    assert moved == 2
    assert sorted(await r.lrange(proc, 0, -1)) == [b"b", b"c"]
    queued = await r.lrange(KEYS.queue, 0, -1)
    assert sorted(queued) == [b"a", b"b", b"older"]
    assert queued[0] == b"older"  # the returned ones are next in line (right end)
    assert await q.reconcile([b"b", b"c"]) == 0


async def test_settling_an_event_no_longer_held_adds_no_copy(q, r):
    """A worker taken for dead (its events recovered by another) or a settle call retried
    after a lost reply must not add a second copy to retry, dead or the queue."""
    await r.rpush(q.processing, b"e")
    assert await q.retry(b"e", "again", 1.0, R({"t": 1, "o": "retry", "id": "x"}))
    assert not await q.retry(b"e", "again", 1.0, R({"t": 1, "o": "retry", "id": "x"}))
    assert not await q.bury(b"e", {"reason": "permanent"}, R({"t": 1, "o": "dead", "id": "x"}))
    assert not await q.requeue(b"e", R({"t": 1, "o": "requeued", "id": "x"}))
    assert await r.zcard(KEYS.retry) == 1
    assert await r.llen(KEYS.dead) == 0 and await r.llen(KEYS.queue) == 0


# -- claims, heartbeats and a full Redis (issue 9) ------------------------------------------


async def test_ack_of_an_event_returned_meanwhile_still_marks_it_sent(make_queue, r):
    """The worker was taken for dead while it sent: the returned copy must be dropped as a
    duplicate, so the sent mark is set although the event is no longer in its list."""
    q = make_queue("w1")
    claim = q.claim_for("e1", "t1")
    assert await q.claim(claim) == "claimed"
    assert not await q.ack(ev(1), claim, R({"t": 1, "o": "sent", "id": "e1"}))
    assert await r.exists(KEYS.sent("e1")) == 1
    assert await r.exists(KEYS.sending("e1")) == 0  # our claim released


async def test_settle_releases_only_its_own_claim_even_when_the_event_is_gone(make_queue, r):
    q, other = make_queue("w1"), make_queue("w2")
    await q.heartbeat({})
    await other.heartbeat({})
    mine, theirs = q.claim_for("e1", "t1"), other.claim_for("e2", "t2")
    assert await q.claim(mine) == "claimed"
    assert await other.claim(theirs) == "claimed"
    # neither event is in w1's processing list: nothing is settled, but w1's claim goes
    assert not await q.retry(ev(1), "again", 1.0, R({"t": 1, "o": "retry", "id": "e1"}), mine)
    assert await r.exists(KEYS.sending("e1")) == 0
    # a claim with the same id but another owner's value is left alone
    assert not await q.bury(ev(2), {"reason": "x"}, R({"t": 1, "o": "dead", "id": "e2"}),
                            q.claim_for("e2", "t2"))  # fmt: skip
    assert await r.get(KEYS.sending("e2")) == theirs.value.encode()
    await q.release([q.claim_for("e2", "other-token")])
    assert await r.exists(KEYS.sending("e2")) == 1
    await other.release([theirs])
    assert await r.exists(KEYS.sending("e2")) == 0


async def test_a_full_redis_refuses_a_settle_as_a_whole_but_not_the_heartbeat(
    make_queue, redis_factory
):
    """At maxmemory with noeviction a script used to run up to its first write that grows
    memory: LREM from processing, then the LPUSH to dead refused: the event was lost."""
    server = redis_factory(extra_args=("--maxmemory-policy", "noeviction"))
    client = connect(server.url)
    try:
        q = Queue(client, KEYS, "w1")
        await client.rpush(q.processing, ev(1))
        await client.config_set("maxmemory", 1)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            await q.bury(ev(1), {"reason": "x"}, R({"t": 1, "o": "dead", "id": "e1"}))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            await q.ack(ev(1), q.claim_for("e1", "t"), R({"t": 1, "o": "sent", "id": "e1"}))
        assert await client.lrange(q.processing, 0, -1) == [ev(1)]  # nothing half-done
        assert not await q.heartbeat({"pid": 1})  # allowed while full (first registration)
        assert await q.heartbeat({"pid": 1})
        assert await client.exists(KEYS.heartbeat("w1")) == 1
        await client.config_set("maxmemory", 0)
        assert await q.bury(ev(1), {"reason": "x"}, R({"t": 1, "o": "dead", "id": "e1"}))
    finally:
        await client.aclose()


async def test_heartbeat_tells_a_worker_that_it_was_taken_for_dead(make_queue, r):
    q, other = make_queue("w1", heartbeat_ttl_s=10), make_queue("w2")
    assert not await q.heartbeat({})  # first registration
    assert await q.heartbeat({})
    await r.rpush(q.processing, ev(1))
    await r.delete(KEYS.heartbeat("w1"))  # its heartbeat lapsed
    assert await other.recover() == {"w1": 1}
    assert not await q.heartbeat({})  # it learns that its events were returned
    assert await q.heartbeat({})


async def test_a_worker_fences_itself_when_its_heartbeat_is_not_renewed(make_queue):
    now = [100.0]
    q = make_queue("w1", heartbeat_ttl_s=4, clock=lambda: now[0])
    assert q.fenced  # never renewed
    await q.heartbeat({})
    assert not q.fenced and q.lease_left() == pytest.approx(4)
    now[0] += 1.9
    assert not q.fenced
    now[0] += 0.2  # half the TTL gone without a renewal: no new sends
    assert q.fenced
    await q.heartbeat({})
    assert not q.fenced


async def test_foreign_queues_name_a_prefix_that_only_a_producer_uses(q, r):
    await r.lpush("notifer:queue", json.dumps({"subject": "typo prefix"}))
    await r.lpush("celery:queue", "not an event")
    await r.lpush(KEYS.queue, ev(1))
    await r.zadd("arq:queue", {"job": 1})
    assert await q.foreign_queues() == {"notifer:queue": 1}
