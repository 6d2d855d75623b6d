"""Chaos: three ``notifier run`` processes, a flaky SMTP server, a worker kill -9'd every ~2 s.

The SMTP server takes 0.1 s to answer MAIL (so events spend time in flight), answers 451 to
20 % of transactions at the end of DATA and drops 5 % of connections there. Events are
pushed at a steady pace while, every ~2 s, a random worker is killed with SIGKILL and started
again (with a new worker id, as a systemd restart of the default
configuration would). At the end every event was delivered (an ``X-Notifier-Event-Id`` per
id), nothing is left in the queue, the retry set or any processing list, and duplicates,
which need a kill between the server's 250 and the acknowledgement, number at most the kills.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from tests.support.helpers import (
    EMPTY,
    dead_letters,
    delivered,
    event,
    kill9_holding,
    leftovers,
    push,
    rclient,
    slow_down,
    wait_delivered,
    wait_until,
)

EVENTS = 1000
WORKERS = 3
PUSH_SECONDS = 16.0  # events arrive over this long, so the kills land while they flow
KILL_EVERY_S = 2.0
RECOVERY_LIMIT_S = 15.0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_chaos_kill_9_and_a_flaky_smtp_server_lose_nothing(
    worker_proc, worker_env, smtp_server, redis_url
):
    rng = random.Random(20261125)
    r = rclient(redis_url)
    smtp_server.set_random_faults(
        0.20, 451, "4.3.0 try again later", drop_rate=0.05, seed=rng.randrange(2**32)
    )
    env = worker_env(
        redis_url,
        smtp_server,
        retry_base_s=0.05,
        retry_max_s=0.5,
        # A quarter of the transactions fail: with 8 attempts one event in ~65,000 would be
        # exhausted by bad luck alone, a flake every ~65 runs.
        max_attempts=30,
        heartbeat_ttl_s=3,
    )
    # The server takes a while to answer MAIL: events spend time in flight.
    slow_down(smtp_server, 0.1, "MAIL")
    slots = [worker_proc(env) for _ in range(WORKERS)]
    ids = [f"chaos-{i:04d}" for i in range(EVENTS)]
    started = time.monotonic()

    def produce() -> None:
        producer = rclient(redis_url)
        chunks = [ids[i : i + 25] for i in range(0, EVENTS, 25)]
        for chunk in chunks:
            push(producer, *(event(i, body="chaos") for i in chunk))
            time.sleep(PUSH_SECONDS / len(chunks))
        producer.close()

    pusher = threading.Thread(target=produce, name="chaos-producer", daemon=True)
    pusher.start()

    kills: list[tuple[float, set[str]]] = []  # (time of the kill, ids it held in flight)
    while pusher.is_alive() or time.monotonic() - started < PUSH_SECONDS + 2:
        time.sleep(rng.uniform(0.75, 1.25) * KILL_EVERY_S)
        slot = rng.randrange(WORKERS)
        victim = slots[slot]
        assert victim.poll() is None, f"worker {victim.pid} exited by itself ({victim.returncode})"
        kills.append(kill9_holding(r, victim))
        slots[slot] = worker_proc(env)
    pusher.join()

    wait_delivered(smtp_server, ids, 60)
    wait_until(lambda: leftovers(r) == EMPTY, 20, "empty queue, retry and processing")
    total_s = time.monotonic() - started
    time.sleep(0.3)

    got = delivered(smtp_server)
    lost = [i for i in ids if i not in got]
    duplicates = sum(n - 1 for n in got.values())
    first_after: dict[str, list[float]] = {}
    for m in smtp_server.messages:
        first_after.setdefault(str(m.message["X-Notifier-Event-Id"]), []).append(m.received_at)
    recoveries = []
    for killed_at, held in kills:
        if held:
            recoveries.append(
                max(min(t for t in first_after[i] if t > killed_at) for i in held) - killed_at
            )
    in_flight = sum(len(held) for _, held in kills)
    max_recovery = max(recoveries, default=0.0)
    print(
        f"\nchaos figures: events {EVENTS}, workers {WORKERS}, kills {len(kills)} "
        f"({in_flight} events in flight at the kills), lost {len(lost)}, duplicates "
        f"{duplicates}, max time to recover a killed worker's events {max_recovery:.2f} s, "
        f"total {total_s:.1f} s (SMTP: {smtp_server.transactions} transactions, "
        f"{smtp_server.failed} answered 451, {smtp_server.dropped} dropped)"
    )

    assert lost == []
    assert set(got) == set(ids)
    assert leftovers(r) == EMPTY
    assert dead_letters(r) == []
    assert len(kills) >= 6
    assert in_flight > 0, "no kill caught a worker with events in flight"
    assert smtp_server.failed > 0 and smtp_server.dropped > 0
    assert duplicates <= len(kills), f"{duplicates} duplicates for {len(kills)} kills"
    assert max_recovery <= RECOVERY_LIMIT_S
    assert all(p.poll() is None for p in slots), "a worker exited by itself"
