"""Redis Sentinel failover with real processes (issue 13): nothing acknowledged is lost.

A Sentinel set of our own (worker/devtools/redis_topology.py: a master, two replicas (one in
the third run), three sentinels, quorum 2, down-after-milliseconds 1000, both passwords,
failover-timeout 10 s rather than the set's 2 s), two ``notifier run`` processes with
``REDIS_URL`` = the set's ``redis+sentinel://`` URL, each delivering to an aiosmtpd server
of its own (so that the test sees which worker delivered what), and two producer threads,
each with its own ``producer.Notifier(url, replicas=1)``.

The run: 500 events (unique ids) at a steady pace; after a third of them the master is
killed with SIGKILL. A send that raises ``NotifierUnavailable`` (refused, or timed out) was
not acknowledged: the producer re-sends it with the same id (the documented safe re-send)
at its next steps until one returns. One that raises ``NotifierNotReplicated`` is queued on
the master, not confirmed: recorded, not re-sent. Then a shorter run (150 events) in which
the master is frozen with SIGSTOP instead: its connections stay open and silent, as when
its host is lost or cut off (no FIN, no RST); a worker learns it from the sentinels, which
it asks every second, and resumes with the new master instead of at its 10 s socket
timeout. Last, the issue's own topology, one replica: the first run again, and once the new
master is named the old master's ``redis-server`` is started again (same port and
directory, empty: a host that comes back).

What counts:

- acknowledged: events of which one send returned (queued on the master and confirmed by a
  replica);
- queued unconfirmed: events whose send raised ``NotifierNotReplicated``; each must be
  delivered all the same (it is on the master);
- lost: acknowledged events never delivered; must be 0;
- duplicates: deliveries beyond the first of an id;
- in flight at the kill: the events the workers held around the kill, as Redis knew it: in
  the workers' processing lists on the master just before the kill, or on the replica that
  became the new master just after it (an event settled on the master whose settlement had
  not reached that replica is there again), plus the events delivered before the kill that
  this replica still had in its queue (taken from the queue on the master in the instant
  before the kill, the move not yet replicated). Every duplicate must be one of them;
- seconds to resume: from the kill to the first delivery of an event first sent after it;
  acknowledgements resumed: to the first acknowledgement of an event first sent after it.

One replica, the third run, shows why the README recommends two with ``replicas=1``: the
failover promotes the only replica and leaves the new master without one, so every
``replicas=1`` send from then on raises ``NotifierNotReplicated`` (queued on the new
master, not confirmed), each after waiting ``replica_timeout_ms``, until the old host is
back and the sentinels have made it a replica: 10 s after it reappears (Sentinel
reconfigures an instance that reports the wrong role once it has done so for 8 s, at its
INFO round, every 10 s for a replica), 12.3 s after the kill here. Asserted: no event sent
after the kill is acknowledged before the restart, and acknowledgements resume after it;
the unconfirmed events are all delivered (they are on the new master, which nothing
replaced: what they lacked was a copy that would survive a second loss). With two
replicas the other one follows the new master within a second, and acknowledged sends
resume with the failover. The one-replica run takes about 18 s, most of it that wait,
which no Sentinel setting shortens.

The failover-timeout: once, with 2 s, on a loaded machine, a run saw 102 unconfirmed sends
after the kill and 145 duplicates, as if the new master had been demoted and its writes
rolled back by a second promotion; not seen again in 40 runs. Sentinel's default is 3
minutes.

Run with ``pytest -s`` to see the figures. The other tests: a worker started while the
sentinels name no master waits and stops on SIGTERM like one started against an unreachable
Redis (and one pointed at sentinels that do not monitor its service exits with one line); a
claim whose release the failover lost; the guard through an election; a blocking fetch
ended by a switchover (UNBLOCKED).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from producer import Notifier, NotifierNotReplicated, NotifierUnavailable
from producer.event import Event, event_from_dict
from producer.keys import Keys
from producer.redis_errors import redacted_url
from producer.topology import sync_client
from tests.support.helpers import (
    PREFIX,
    QUEUE,
    delivered,
    log_of,
    raw_ids,
    run_cli,
    slow_down,
    unsettled,
    wait_delivered,
    wait_for_log,
    wait_started,
    wait_until,
)
from worker.devtools.redis_topology import SentinelSet
from worker.devtools.smtp_server import SMTPTestServer
from worker.outage import RedisGuard
from worker.queue import Queue, connect
from worker.records import DeliveryRecord, Status

PASSWORD = "pw-Failover-Master-3c9e"
SENTINEL_PASSWORD = "pw-Failover-Sentinel-8a71"
PRODUCERS = 2
PACE_S = 0.02  # each producer: one event every 20 ms (about 100 events a second in all)
WORKERS = ("failover-w1", "failover-w2")
WORKER_SETTINGS = {"retry_base_s": 0.05, "retry_max_s": 0.5, "concurrency": 4}


@pytest.fixture
def sentinel_set(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SentinelSet]:
    """Two replicas, or as many as an indirect parametrization asks."""
    servers = SentinelSet(
        tmp_path / "sentinel-set",
        replicas=getattr(request, "param", 2),
        failover_timeout_ms=10_000,
        password=PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
    )
    try:
        yield servers.start()
    finally:
        for server in servers.data:
            server.kill()  # (a frozen one too: SIGTERM would wait for it in vain)
        servers.stop()


# -- producers -------------------------------------------------------------------------------


@dataclass
class Sends:
    """What the producers saw, shared by their threads (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempted: int = 0  # events tried at least once
    first_try: dict[str, float] = field(default_factory=dict)  # id -> its step's time
    acked: dict[str, float] = field(default_factory=dict)  # id -> when a send returned
    unconfirmed: dict[str, float] = field(default_factory=dict)  # NotifierNotReplicated
    # failed sends: (when, exception class, message)
    errors: list[tuple[float, str, str]] = field(default_factory=list)
    deferred: set[str] = field(default_factory=set)  # ids not queued at their step
    unsent: list[str] = field(default_factory=list)  # ids never acknowledged in the end


def _event(producer: int, n: int) -> Event:
    return event_from_dict(
        {
            "id": f"p{producer}-{n:03d}",
            "subject": f"failover test {producer}/{n}",
            "strategy": f"producer-{producer}",
            "ts": time.time(),
        }
    )


def _produce(producer: int, url: str, sends: Sends, start: float, count: int) -> None:
    """Send ``count`` events at ``PACE_S``; re-send the unacknowledged ones (same id) at
    each step until one send returns, and after the last event until all have."""
    backlog: list[Event] = []

    def attempt(notifier: Notifier, event: Event) -> bool:
        """True when the event is queued (acknowledged or not), False to send it again."""
        assert event.id is not None
        try:
            notifier.send_event(event)
        except NotifierNotReplicated:
            with sends.lock:
                sends.unconfirmed.setdefault(event.id, time.time())
            return True
        except NotifierUnavailable as exc:
            with sends.lock:
                sends.errors.append((time.time(), type(exc).__name__, str(exc)))
            return False
        with sends.lock:
            sends.acked[event.id] = time.time()
        return True

    def drain(notifier: Notifier) -> None:
        while backlog and attempt(notifier, backlog[0]):
            backlog.pop(0)

    with Notifier(url, replicas=1) as notifier:
        for n in range(count):
            time.sleep(max(0.0, start + n * PACE_S - time.monotonic()))
            event = _event(producer, n)
            with sends.lock:
                sends.attempted += 1
                sends.first_try[str(event.id)] = time.time()
            if backlog or not attempt(notifier, event):
                backlog.append(event)
                with sends.lock:
                    sends.deferred.add(str(event.id))
            drain(notifier)
        deadline = time.monotonic() + 20
        while backlog and time.monotonic() < deadline:
            drain(notifier)
            time.sleep(0.05)
    with sends.lock:
        sends.unsent += [str(event.id) for event in backlog]


# -- the run ---------------------------------------------------------------------------------


def _held(address: tuple[str, int]) -> tuple[set[str], set[str]]:
    """(ids in the workers' processing lists, ids in the queue) on one server."""
    with redis.Redis(host=address[0], port=address[1], password=PASSWORD) as client:
        pipe = client.pipeline(transaction=False)
        for wid in WORKERS:
            pipe.lrange(f"{PREFIX}:processing:{wid}", 0, -1)
        pipe.lrange(QUEUE, 0, -1)
        *lists, queue = pipe.execute()
    return set().union(*(raw_ids(x) for x in lists)), raw_ids(queue)


def _all_delivered(servers: list[SMTPTestServer]) -> Counter[str]:
    got: Counter[str] = Counter()
    for smtp in servers:
        got.update(delivered(smtp))
    return got


def _lose_master(servers: SentinelSet, how: str) -> None:
    """kill: SIGKILL (the kernel closes its connections: every client sees it at once);
    freeze: SIGSTOP (its connections stay open and silent, as when its host is lost or cut
    off: a client learns it only from the sentinels, or at its socket timeout)."""
    if how == "kill":
        servers.kill_master()
        return
    address = servers.master_address()
    server = servers.server_at(address)
    assert server.pid is not None
    servers.killed, servers.killed_at = address, time.monotonic()  # (for wait_failover)
    os.kill(server.pid, signal.SIGSTOP)


@pytest.mark.parametrize(
    ("how", "events", "sentinel_set"),
    [
        pytest.param("kill", 500, 2, id="kill-500"),
        pytest.param("freeze", 150, 2, id="freeze-150"),
        pytest.param("kill", 500, 1, id="kill-one-replica-500"),
    ],
    indirect=["sentinel_set"],
)
def test_workers_and_producers_survive_a_sentinel_failover(
    how: str,
    events: int,
    sentinel_set: SentinelSet,
    smtp_factory: Callable[..., SMTPTestServer],
    worker_env: Callable[..., dict[str, str]],
    worker_proc,
) -> None:
    url = sentinel_set.url
    smtps = [smtp_factory() for _ in WORKERS]
    for smtp in smtps:
        slow_down(smtp, 0.02, "MAIL")  # a few events in flight at any time
    procs = [
        worker_proc(worker_env(url, smtp, worker_id=wid, **WORKER_SETTINGS))
        for wid, smtp in zip(WORKERS, smtps, strict=True)
    ]
    for proc in procs:
        wait_started(proc)

    sends = Sends()
    start = time.monotonic() + 0.1
    per_producer = events // PRODUCERS
    threads = [
        threading.Thread(target=_produce, args=(p, url, sends, start, per_producer), daemon=True)
        for p in range(1, PRODUCERS + 1)
    ]
    for thread in threads:
        thread.start()

    # -- the kill, with what the workers held around it
    kill_after = events // 3
    wait_until(lambda: sends.attempted >= kill_after, 20, f"{kill_after} events sent")
    old = sentinel_set.master_address()
    replicas = [("127.0.0.1", s.port) for s in sentinel_set.data if s.port != old[1]]
    master_processing, _ = _held(old)
    kill_started = time.time()
    _lose_master(sentinel_set, how)
    killed_at = time.time()
    survived = {address: _held(address) for address in replicas}  # before any promotion
    delivered_before_kill = {
        str(m.message["X-Notifier-Event-Id"])
        for smtp in smtps
        for m in smtp.messages
        if m.received_at < killed_at
    }
    new, failover_s = sentinel_set.wait_failover()
    assert new != old
    one_replica = len(replicas) == 1
    if one_replica:  # the old host comes back; the sentinels make it a replica of the new one
        sentinel_set.restart_old_master()
        restarted_at = time.time()
        rejoined_s = sentinel_set.wait_rejoined()
    replica_processing, replica_queue = survived[new]
    in_flight = master_processing | replica_processing | (delivered_before_kill & replica_queue)

    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a producer hung"

    # -- every acknowledged event delivered, nothing stranded
    acked = set(sends.acked)
    queued = acked | set(sends.unconfirmed)
    wait_until(
        lambda: acked <= set(_all_delivered(smtps)), 15, "every acknowledged event delivered"
    )
    client = sync_client(url)
    try:
        wait_until(lambda: not unsettled(client), 15, "nothing left in queue or processing")
    finally:
        client.close()
    got = _all_delivered(smtps)
    lost = acked - set(got)
    duplicates = {i: n - 1 for i, n in got.items() if n > 1}
    pushed_after = {i for i in queued if sends.first_try[i] > killed_at}
    resumed = min(
        (
            m.received_at
            for smtp in smtps
            for m in smtp.messages
            if str(m.message["X-Notifier-Event-Id"]) in pushed_after
        ),
        default=None,
    )
    # (an event first tried after the kill can only have been acknowledged by the new master)
    acks_resumed = min(
        (t for i, t in sends.acked.items() if sends.first_try[i] > killed_at), default=None
    )
    election_errors = Counter(kind for t, kind, _ in sends.errors if t >= kill_started)
    rejoin = f", old master rejoined as a replica after {rejoined_s:.2f} s" if one_replica else ""
    print(
        f"\nsentinel failover, master {how}, {len(replicas)} replica(s): events {events}, "
        f"acknowledged {len(acked)}, queued unconfirmed {len(set(sends.unconfirmed) - acked)}, "
        f"delivered {len(got)}, lost {len(lost)}, "
        f"duplicates {sum(duplicates.values())}, in flight at the kill {len(in_flight)}, "
        f"new master named {failover_s:.2f} s after the kill, delivery resumed after "
        f"{resumed - killed_at if resumed else float('nan'):.2f} s, acknowledgements resumed "
        f"after {acks_resumed - killed_at if acks_resumed else float('nan'):.2f} s{rejoin}; "
        f"producers: failed sends during the election {dict(election_errors)}, "
        f"{len(sends.deferred)} events re-sent"
    )

    assert not sends.unsent, f"never acknowledged: {sends.unsent[:10]}"
    assert not lost, f"{len(lost)} acknowledged events never delivered: {sorted(lost)[:10]}"
    assert not set(sends.unconfirmed) - set(got), "a queued (unconfirmed) event was lost"
    assert set(duplicates) <= in_flight, (
        f"duplicates of events not in flight at the kill: {sorted(set(duplicates) - in_flight)}"
    )
    assert sum(duplicates.values()) <= len(in_flight)
    assert resumed is not None, "no event pushed after the kill was delivered"
    # a command held by a frozen master would wait for its socket timeout (10 s)
    assert resumed - killed_at < failover_s + 2.0, "delivery resumed late"
    assert acks_resumed is not None, "no send after the kill was acknowledged"
    if one_replica:
        # the new master had no replica to confirm a push before the old host came back
        assert acks_resumed > restarted_at, "acknowledged with no replica"
        assert set(sends.unconfirmed) - acked, "no send between the failover and the rejoin"
    before = [message for t, _, message in sends.errors if t < kill_started]
    assert not before, f"producer errors before the kill: {before[:3]}"

    # -- both workers alive, and each still delivering
    for proc in procs:
        assert proc.poll() is None, log_of(proc)[-3000:]
    for smtp, wid in zip(smtps, WORKERS, strict=True):
        after = [m for m in smtp.messages if m.received_at > killed_at + failover_s]
        assert after, f"worker {wid} delivered nothing after the failover"
    with Notifier(url) as notifier:
        last = [notifier.send(f"after the failover {n}", id=f"after-{n}") for n in range(8)]
    wait_until(lambda: set(last) <= set(_all_delivered(smtps)), 10, "deliveries after the run")
    for proc in procs:
        assert "Traceback" not in log_of(proc), log_of(proc)[-3000:]
        assert PASSWORD not in log_of(proc) and SENTINEL_PASSWORD not in log_of(proc)
    if duplicates:
        print(f"duplicates: {json.dumps(duplicates)}")


# -- start-up without a master -----------------------------------------------------------------


def _master_down(servers: SentinelSet) -> bool:
    """Every sentinel sees the master down (and, its replica stopped, none to promote)."""
    for host, port in servers.sentinel_addresses:
        with redis.Redis(host=host, port=port, password=SENTINEL_PASSWORD) as sentinel:
            state = sentinel.sentinel_master(servers.service)
        if not state["is_sdown"]:
            return False
    return True


def test_a_worker_started_while_the_sentinels_name_no_master_waits_then_delivers(
    sentinel_set: SentinelSet,
    smtp_server: SMTPTestServer,
    worker_env: Callable[..., dict[str, str]],
    worker_proc,
) -> None:
    """As against an unreachable plain Redis (tests/test_lifecycle_edges.py): one line that
    names REDIS_URL (passwords masked), alive while it waits, exit 0 within a second on
    SIGTERM; and once the master is back it starts and delivers without a restart. Sentinels
    that do not monitor the service named are a mistake that waiting does not fix: one line
    and exit 1, no traceback."""
    wrong = sentinel_set.url.replace("/mymaster/", "/mymastr/")
    rc, out = run_cli(worker_proc, worker_env(wrong, smtp_server), "run", timeout=10)
    assert rc == 1 and "Traceback" not in out, out
    (line,) = [x for x in out.splitlines() if x.startswith("notifier run: ")]
    assert redacted_url(wrong) in line and "does not monitor 'mymastr'" in line, line
    assert PASSWORD not in out and SENTINEL_PASSWORD not in out

    master_address = sentinel_set.master_address()
    for server in sentinel_set.data:
        if server.port != master_address[1]:
            server.stop()  # no replica: nothing to promote
    master = sentinel_set.server_at(master_address)
    master.kill()
    wait_until(lambda: _master_down(sentinel_set), 10, "the sentinels to see the master down")

    env = worker_env(sentinel_set.url, smtp_server, **WORKER_SETTINGS)
    stopped, waiting = worker_proc(env), worker_proc(env)
    for proc in (stopped, waiting):
        log = wait_for_log(proc, "Redis unreachable during connect")
        (line,) = [x for x in log.splitlines() if "Redis unreachable" in x]
        assert redacted_url(sentinel_set.url) in line, line
        assert "NOTIFIER_REDIS_URL" in line and "mymaster" in line, line
        assert PASSWORD not in log and SENTINEL_PASSWORD not in log
    time.sleep(0.5)
    assert stopped.poll() is None and waiting.poll() is None, log_of(stopped)

    stopped.send_signal(signal.SIGTERM)
    began = time.monotonic()
    rc = stopped.wait(timeout=10)
    took = time.monotonic() - began
    assert rc == 0 and took < 1.0, (rc, took, log_of(stopped)[-2000:])

    master.start()  # the same port: the sentinels see it up again
    wait_started(waiting)
    with Notifier(sentinel_set.url) as notifier:
        notifier.send("the master is back", id="after-restart")
    wait_delivered(smtp_server, ["after-restart"], 10)
    log = log_of(waiting)
    assert log.count("Redis unreachable") == 1 and "Traceback" not in log, log


# -- a settlement the failover lost ------------------------------------------------------------


async def test_a_claim_whose_release_a_failover_lost_does_not_hold_its_event(redis_url: str):
    """A worker delivered an event and settled it on the old master, which died before the
    replica had the settlement: the new master still holds the event in the worker's
    processing list (the worker returns it to the queue) and the worker's claim on its id,
    without the sent mark. When the worker meets that claim again it takes it over: no
    handling of its own holds it. A claim it still uses, or another live worker's, makes
    it wait as before (a recheck a second later; the other worker's stale claim is taken
    over by this one when it fetches the event)."""
    client = connect(redis_url)
    try:
        keys = Keys(PREFIX)
        mine, other = Queue(client, keys, "w1"), Queue(client, keys, "w2")
        for q in (mine, other):
            await q.heartbeat({"nonce": q.nonce})
        raw = json.dumps({"id": "e1", "subject": "settled on the old master"}).encode()
        await client.rpush(mine.processing, raw)
        first = mine.claim_for("e1", "first")
        assert await mine.claim(first) == "claimed"
        assert await mine.claim(mine.claim_for("e1", "second")) == "busy"  # first in use
        assert await other.claim(other.claim_for("e1", "x")) == "busy"
        record = DeliveryRecord(t=time.time(), status=Status.SENT, id="e1")
        assert await mine.ack(raw, first, record)

        # what the new master holds: the state before the ack, the claim still there
        await client.delete(keys.sent("e1"))
        await client.set(keys.sending("e1"), first.value)
        await client.rpush(mine.processing, raw)
        assert await mine.reconcile([]) == 1  # not held: back to the queue
        assert await other.claim(other.claim_for("e1", "y")) == "busy"  # w1 lives
        again = mine.claim_for("e1", "again")
        assert await mine.claim(again) == "claimed"  # its own stale claim, taken over
        assert await client.get(keys.sending("e1")) == again.value.encode()
    finally:
        await client.aclose()


# -- the guard through an election -------------------------------------------------------------


async def test_the_guard_retries_a_broken_connection_at_once_and_wakes_the_waiting_ops(caplog):
    """A connection that broke (Redis restarted, the master changed) costs one unlogged try
    on a new one; an outage is logged once, and when one operation (the heartbeat, retried
    at least every second) reaches the new master, the others try again at once instead of
    at the end of their back-off (up to 5 s)."""
    guard = RedisGuard(
        f"redis+sentinel://:{PASSWORD}@127.0.0.1:1/mymaster/0?sentinel_password={SENTINEL_PASSWORD}"
    )
    calls = Counter[str]()

    async def broken_once() -> str:
        calls["broken"] += 1
        if calls["broken"] == 1:
            raise redis.ConnectionError("Connection closed by server.")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="worker.outage"):
        assert await guard(broken_once, "fetch") == "ok"
    assert calls["broken"] == 2 and caplog.records == []
    assert guard.errors == 1  # (the fetch loop reconciles on it)

    back = asyncio.Event()  # the new master is named

    async def until_back() -> str:
        calls["slow"] += 1
        if not back.is_set():
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    started = time.monotonic()
    waiting = asyncio.create_task(guard(until_back, "fetch"))
    await asyncio.sleep(1.5)  # tries at 0, 0.2, 0.6, 1.4, then not before 3.0
    back.set()
    assert await guard(until_back, "heartbeat", urgent=True) == "ok"
    assert await asyncio.wait_for(waiting, 0.5) == "ok"
    assert time.monotonic() - started < 2.0
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and "Redis unreachable during fetch" in logged[0], logged
    assert "reachable again" in logged[1] and PASSWORD not in "".join(logged)


async def test_no_worker_is_taken_for_dead_until_redis_has_answered_for_a_heartbeat_ttl():
    """After an outage longer than the heartbeat TTL every heartbeat has lapsed, the living
    workers' too. The keeper's recovery asks ``answered_for(ttl)`` inside its guarded try:
    False while the outage lasts (a recovery that waited through it asks again when Redis
    answers) and for a TTL after it ends, by when the living have renewed their heartbeats.
    Without it the first worker back returned another's events while that one was still
    sending them: duplicates (tests/test_channels_faults.py's Redis restart, 4 runs in 6)."""
    now = [100.0]
    guard = RedisGuard("redis://127.0.0.1:1/0", clock=lambda: now[0])
    assert guard.answered_for(3.0)  # no outage seen
    gate_seen: list[bool] = []
    tries = Counter[str]()

    async def recover_like() -> str:  # what Queue.recover does with ready=
        tries["recover"] += 1
        gate_seen.append(guard.answered_for(3.0))
        if tries["recover"] <= 3:
            now[0] += 1.5  # the outage: 4.5 s, longer than the TTL
            raise ConnectionRefusedError(111, "Connection refused")
        return "ran"

    guard._pause = lambda seconds: asyncio.sleep(0)  # type: ignore[method-assign]
    assert await guard(recover_like, "recover") == "ran"
    assert gate_seen == [True, False, False, False]  # the try after the outage: not yet
    now[0] += 2.9
    assert not guard.answered_for(3.0)
    now[0] += 0.2
    assert guard.answered_for(3.0)


async def test_a_blocking_fetch_ended_by_a_switchover_is_waited_out(redis_factory):
    """A master that a switchover turns into a replica ends its blocked BLMOVEs with
    ``UNBLOCKED ... instance state changed (master -> replica?)``, an error without a
    redis-py class: the worker's guard waits it out (read-only) instead of letting the
    fetch loop die, and the fetch works once the server is a master again."""
    first, second = redis_factory(), redis_factory()
    client = connect(first.url)
    guard = RedisGuard(first.url)
    queue = Queue(client, Keys(PREFIX), "w1", guard=guard)
    blocked = connect(first.url)
    try:
        fetch = asyncio.create_task(queue.fetch_blocking(blocked, 5))
        await asyncio.sleep(0.2)
        with redis.Redis(port=first.port) as admin:
            admin.replicaof("127.0.0.1", second.port)
            await asyncio.sleep(0.5)
            assert not fetch.done() and guard.errors >= 1  # waiting it out, not raised
            admin.replicaof("NO", "ONE")
            admin.lpush(QUEUE, b'{"id": "e1", "subject": "after the switch"}')
        assert await asyncio.wait_for(fetch, 5) == b'{"id": "e1", "subject": "after the switch"}'
    finally:
        await client.aclose()
        await blocked.aclose()
