"""Redis at ``maxmemory`` with ``noeviction``: writes are refused with OOM while reads work.

Two ``notifier run`` processes send through a slow SMTP server that answers some
transactions 451 (retried) and some 550 (dead letter) while Redis is full for longer than
the heartbeat TTL, then flaps over and under its limit, and a producer keeps pushing (its
refused pushes were never queued; only acknowledged ones count). Once memory is back,
every acknowledged event must be delivered or dead-lettered exactly once within 30 s, with
no claim left behind and both workers alive.

What used to go wrong: a live worker whose heartbeat writes were refused was taken for dead
and its in-flight events were sent again by the other worker; a Lua script ran up to its
first refused write (LREM from processing, then the LPUSH to dead refused), so events
vanished; claims of a worker taken for dead stayed held and the returned copies looped.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import redis

from tests.support.helpers import (
    EMPTY,
    PREFIX,
    dead_letters,
    delivered,
    event,
    leftovers,
    log_of,
    rclient,
    slow_down,
    wait_until,
)

TTL_S = 2.0
FULL_S = 5.0  # longer than two heartbeat TTLs
FLAPS = 8
FLAP_S = 0.5
SETTLE_LIMIT_S = 30.0


class Producer(threading.Thread):
    """Pushes an event every 40 ms and remembers which pushes Redis acknowledged."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.client = rclient(url)
        self.acked: list[str] = []
        self.refused = 0
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            event_id = f"{self.name}-{n:05d}"
            n += 1
            try:
                self.client.lpush(f"{PREFIX}:queue", json.dumps(event(event_id)))
            except redis.exceptions.OutOfMemoryError:
                self.refused += 1
            else:
                self.acked.append(event_id)
            time.sleep(0.04)
        self.client.close()


def set_full(admin: redis.Redis, full: bool) -> None:
    admin.config_set("maxmemory", 1 if full else 0)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_workers_survive_a_full_redis_without_duplicates_losses_or_stuck_claims(
    worker_proc, worker_env, smtp_server, redis_factory
):
    server = redis_factory(extra_args=("--maxmemory-policy", "noeviction"))
    admin = rclient(server.url)
    slow_down(smtp_server, 0.3, "MAIL")  # sends are in flight when Redis fills up
    smtp_server.set_random_faults(0.15, 451, "4.3.0 try again later", seed=9)
    env = worker_env(
        server.url,
        smtp_server,
        heartbeat_ttl_s=TTL_S,
        retry_base_s=0.05,
        retry_max_s=0.5,
        max_attempts=60,
        concurrency=4,
    )
    workers = [worker_proc(env), worker_proc(env)]
    producers = [Producer(server.url, "full-a"), Producer(server.url, "full-b")]
    for producer in producers:
        producer.start()
    halt = producers[0].halt
    time.sleep(1.5)

    def permanent_refusals() -> None:  # a 550 now and then: those events are dead letters
        while not halt.is_set():
            smtp_server.fail_next("DATA", 550, "5.7.1 message refused")
            time.sleep(0.7)

    refuser = threading.Thread(target=permanent_refusals, daemon=True)
    refuser.start()

    set_full(admin, True)
    time.sleep(FULL_S)
    for _ in range(FLAPS):
        set_full(admin, False)
        time.sleep(FLAP_S)
        set_full(admin, True)
        time.sleep(FLAP_S)
    set_full(admin, False)
    back = time.monotonic()
    for producer in producers:
        producer.halt.set()
        producer.join()
    refuser.join()
    acked = {i for p in producers for i in p.acked}
    refused = sum(p.refused for p in producers)

    def settled() -> bool:
        done = set(delivered(smtp_server)) | {d["id"] for d in dead_letters(admin)}
        return acked <= done and leftovers(admin) == EMPTY

    wait_until(settled, SETTLE_LIMIT_S, "every acknowledged event delivered or dead")
    settle_s = time.monotonic() - back
    time.sleep(1.0)  # a late duplicate would arrive now

    got = delivered(smtp_server)
    dead = Counter(d["id"] for d in dead_letters(admin))
    duplicates = sum(n - 1 for n in got.values()) + sum(n - 1 for n in dead.values())
    both = set(got) & set(dead)
    claims = list(admin.scan_iter(f"{PREFIX}:sending:*"))
    print(
        f"\nRedis-full figures: pushed {len(acked)} acknowledged ({refused} refused "
        f"with OOM), delivered {len(got)}, dead {sum(dead.values())}, duplicates {duplicates}, "
        f"delivered and dead {len(both)}, stuck claims {len(claims)}, settled {settle_s:.1f} s "
        f"after memory was back (SMTP: {smtp_server.transactions} transactions, "
        f"{smtp_server.failed} refused)"
    )
    assert refused > 0, "Redis never refused a push: the test did not fill it"
    assert sum(dead.values()) > 0, "no 550 reached an event"
    assert set(got) | set(dead) == acked
    assert duplicates == 0
    assert both == set()
    assert claims == []
    assert all(w.poll() is None for w in workers), "a worker died"
    assert all(d["reason"] == "permanent" for d in dead_letters(admin))
    log = "".join(log_of(w) for w in workers)
    assert "is full (OOM" in log, log[-3000:]
    assert "taken for dead" not in log
