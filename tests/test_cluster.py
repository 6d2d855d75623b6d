"""notifier on a real three-master Redis Cluster (issue 13): ``notifier run`` subprocesses, the
CLI and the producer, all through redis-py's cluster client (``redis+cluster://`` URLs).

One :class:`~worker.devtools.redis_topology.ClusterSet` serves the module (its nodes are
emptied before each test); each test starts its own workers and aiosmtpd server. Every key a
test leaves behind must be in one hash slot, on one node (``{notifier}:...``): each test ends
by scanning every node. The last test kills the node that holds that slot; it must stay last.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
import redis.cluster
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from producer import AsyncNotifier, Notifier, NotifierUnavailable
from producer.keys import Keys
from producer.topology import sync_client
from tests.support.helpers import (
    event,
    ids_in,
    is_digest,
    kill9,
    log_of,
    mail_ids,
    raw_ids,
    run_cli,
    slow_down,
    start_worker,
    text_of,
    wait_delivered,
    wait_for_log,
    wait_until,
)
from worker.bench.helpers import proc_cpu_s
from worker.devtools.redis_server import RedisServer
from worker.devtools.redis_topology import ClusterSet
from worker.outage import RedisGuard
from worker.queue import Queue

K = Keys("notifier", cluster=True)  # {notifier}:queue, ...
# Short heartbeats (a killed worker's events come back within ~3 s), quick stops and retries.
QUICK = {"heartbeat_ttl_s": 2, "shutdown_grace_s": 1, "retry_base_s": 0.05, "retry_max_s": 0.3}
Cluster = redis.cluster.RedisCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    with ClusterSet(tmp_path_factory.mktemp("cluster")) as servers:
        yield servers


@pytest.fixture
def rc(cluster: ClusterSet) -> Iterator[Cluster]:
    """A cluster client of the test's own, on nodes emptied for the test."""
    for host, port in cluster.addresses:
        with redis.Redis(host=host, port=port) as node:
            node.flushall()
    client = sync_client(cluster.url)
    assert isinstance(client, Cluster)
    yield client
    client.close()


def env_for(cluster: ClusterSet, smtp: Any, worker_env: Any, **overrides: object) -> dict[str, str]:
    return worker_env(cluster.url, smtp, **(QUICK | overrides))


def push(rc: Cluster, *events: dict[str, Any] | str) -> None:
    """LPUSH onto ``{notifier}:queue``, as a producer in another language does."""
    rc.lpush(K.queue, *(json.dumps(e, ensure_ascii=False) if isinstance(e, dict) else e
                        for e in events))  # fmt: skip


def counters(rc: Cluster) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in rc.hgetall(K.counters).items()}


def dead_letters(rc: Cluster) -> list[dict[str, Any]]:
    return [json.loads(x) for x in rc.lrange(K.dead, 0, -1)]


def delivered(smtp: Any) -> Counter[str]:
    return Counter(str(m.message["X-Notifier-Event-Id"]) for m in smtp.messages)


def cli(worker_proc: Any, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    """``notifier ARGS`` started, not waited for (:func:`finished`): several run at once."""
    return worker_proc.spawn([sys.executable, "-m", "worker", *args], env)


def finished(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    return proc.wait(timeout=30), log_of(proc)


def slot_node(cluster: ClusterSet) -> RedisServer:
    """The node that serves the slot of ``{notifier}``."""
    host, port = cluster.addresses[0]
    with redis.Redis(host=host, port=port) as node:
        slot = int(node.execute_command("CLUSTER", "KEYSLOT", K.queue))
        owner = next(int(m[1]) for lo, hi, m, *_ in node.execute_command("CLUSTER", "SLOTS")
                     if lo <= slot <= hi)  # fmt: skip
    return next(n for n in cluster.nodes if n.port == owner)


def node_keys(cluster: ClusterSet) -> dict[int, list[str]]:
    """Every key on every node (SCAN each one), by port."""
    out: dict[int, list[str]] = {}
    for host, port in cluster.addresses:
        with redis.Redis(host=host, port=port) as node:
            out[port] = sorted(k.decode() for k in node.scan_iter(count=1000))
    return out


def unsettled(rc: Cluster, cluster: ClusterSet) -> dict[str, int]:
    """Events anywhere but delivered or dead: queue, retry, processing, held, digest groups."""
    out = {K.queue: rc.llen(K.queue), K.retry: rc.zcard(K.retry), K.digests: rc.zcard(K.digests)}
    for keys in node_keys(cluster).values():
        out |= {k: rc.llen(k) for k in keys if k.startswith((K.processing(""), K.held("")))}
    return {k: n for k, n in out.items() if n}


def assert_one_slot(cluster: ClusterSet, *expected: str) -> None:
    """Every key on the cluster is a ``{notifier}`` key, all on one node and in one slot
    (CLUSTER KEYSLOT), ``expected`` among them."""
    by_node = {port: keys for port, keys in node_keys(cluster).items() if keys}
    assert len(by_node) == 1, {port: keys[:5] for port, keys in by_node.items()}
    ((port, keys),) = by_node.items()
    assert port == slot_node(cluster).port
    assert all(k.startswith("{notifier}:") for k in keys), keys
    with redis.Redis(port=port) as node:
        slots = {int(node.execute_command("CLUSTER", "KEYSLOT", k)) for k in keys}
        assert slots == {int(node.execute_command("CLUSTER", "KEYSLOT", "notifier"))}
    assert set(expected) <= set(keys), sorted(set(expected) - set(keys))


# -- (a) the pipeline, repeat suppression, check and stats ----------------------------------------


def test_producer_and_push_events_delivered_repeats_suppressed_check_and_stats(
    cluster, rc, smtp_server, worker_env, worker_proc
):
    env = env_for(cluster, smtp_server, worker_env, concurrency=2, dedup_window_s=1.0)
    proc = start_worker(worker_proc, env)
    shell = cli(worker_proc, env, "push", "pushed from the shell", "--id", "cli-1")

    with Notifier(redis_url=cluster.url) as n:
        sent = [n.send("策略启动 ma_cross", strategy="ma_cross", data={"n": 1}),
                n.signal("ma_cross", "600519.SH", "buy", 1700.5, 100)]  # fmt: skip

    async def send_async() -> str:
        async with AsyncNotifier(redis_url=cluster.url) as an:
            return await an.send("async hello", strategy="grid")

    sent.append(asyncio.run(send_async()))
    code, out = finished(shell)
    assert code == 0 and "cli-1" in out, out
    push(rc, event("raw-1"))
    ids = [*sent, "cli-1", "raw-1"]
    wait_delivered(smtp_server, ids, 10)

    # repeat suppression: one mail per dedup_key and window, the next one says how many
    push(rc, event("k1", dedup_key="feed"))
    wait_delivered(smtp_server, ["k1"], 5)
    push(rc, event("k2", dedup_key="feed"), event("k3", dedup_key="feed"))
    wait_until(lambda: counters(rc).get("suppressed") == 2, 5, "2 suppressed")
    cpu_before = proc_cpu_s(proc.pid)
    time.sleep(1.1)  # the window is over; the worker waits on BLMOVE meanwhile
    idle_cpu = proc_cpu_s(proc.pid) - cpu_before
    assert idle_cpu < 0.25, f"an idle worker used {idle_cpu:.2f} s of CPU in 1.1 s"
    push(rc, event("k4", dedup_key="feed"))
    wait_delivered(smtp_server, ["k4"], 5)
    time.sleep(0.2)  # a duplicate would arrive now
    assert delivered(smtp_server) == Counter({i: 1 for i in [*ids, "k1", "k4"]})
    by_id = {str(m.message["X-Notifier-Event-Id"]): m for m in smtp_server.messages}
    assert re.search(r">> repeated 2× in [1-9] s", text_of(by_id["k4"]))
    assert counters(rc)["delivered"] == len(ids) + 2

    check, stats = cli(worker_proc, env, "check"), cli(worker_proc, env, "stats")
    code, out = finished(check)
    assert code == 0, out
    assert "topology cluster: state ok, 16384/16384 slots ok, 3 node(s), 3 master(s)" in out, out
    assert "queue {notifier}:queue on redis+cluster://" in out, out
    code, out = finished(stats)
    assert code == 0, out
    assert f"delivered {len(ids) + 2}," in out and "workers: 1 alive" in out, out

    assert unsettled(rc, cluster) == {}
    assert_one_slot(cluster, K.counters, K.deliveries, K.workers, K.sent("k4"),
                    K.suppress("feed"), K.seen, K.last)  # fmt: skip


# -- (b) retries ----------------------------------------------------------------------------------


def test_transient_failures_retried_then_delivered_once(
    cluster, rc, smtp_server, worker_env, worker_proc
):
    smtp_server.fail_next("MAIL", 421, "4.7.0 try again later")
    smtp_server.fail_next("DATA", 451, "4.3.0 try again later", count=2)
    # one seed node, not the one that serves the queue's slot: the client finds the rest
    other = next(p for _, p in cluster.addresses if p != slot_node(cluster).port)
    env = env_for(
        cluster, smtp_server, worker_env, NOTIFIER_REDIS_URL=f"redis+cluster://127.0.0.1:{other}"
    )
    proc = start_worker(worker_proc, env)
    push(rc, event("t451"))
    wait_delivered(smtp_server, ["t451"], 10)
    wait_until(lambda: rc.exists(K.sent("t451")), 5, "the sent mark")
    time.sleep(0.3)  # a second copy would arrive now
    assert delivered(smtp_server) == {"t451": 1}
    assert smtp_server.transactions == 4
    c = counters(rc)
    assert c.get("delivered") == 1 and c.get("retried") == 3, c
    records = [json.loads(x) for x in rc.lrange(K.deliveries, 0, -1)]
    assert [x["o"] for x in records if x["id"] == "t451"] == ["sent", "retry", "retry", "retry"]
    assert "attempt 3 of 8" in log_of(proc)
    assert unsettled(rc, cluster) == {} and dead_letters(rc) == []
    assert_one_slot(cluster, K.sent("t451"), K.deliveries)


# -- (c) dead letters ------------------------------------------------------------------------------


def test_bad_input_and_permanent_refusal_are_dead_letters(
    cluster, rc, smtp_server, worker_env, worker_proc
):
    env = env_for(cluster, smtp_server, worker_env)
    start_worker(worker_proc, env)
    smtp_server.fail_next("DATA", 554, "5.7.1 Message rejected as spam")
    empty = '{"id": "empty-1", "strategy": "x"}'
    push(rc, "not json at all", empty, event("perm-1"))
    wait_until(lambda: len(dead_letters(rc)) == 3, 10, "three dead letters")
    letters = {x["event"]: x for x in dead_letters(rc)}
    assert letters["not json at all"]["reason"] == "invalid"
    assert "event is not JSON" in letters["not json at all"]["error"]
    assert letters[empty]["reason"] == "invalid"
    assert "needs at least one of subject, body, data" in letters[empty]["error"]
    [perm] = [x for x in letters.values() if x["id"] == "perm-1"]
    assert perm["reason"] == "permanent" and "554 5.7.1 Message rejected as spam" in perm["error"]
    assert smtp_server.messages == []

    code, out = run_cli(worker_proc, env, "dead", "list")
    assert code == 0 and "3 shown, 3 in total" in out, out
    assert "perm-1  [permanent] refused by the SMTP server: 554 5.7.1" in out, out
    assert "<no id>  [invalid] event is not JSON" in out, out
    code, out = run_cli(worker_proc, env, "dead", "replay", "--id", "perm-1")
    assert code == 0 and "replayed 1" in out, out
    wait_delivered(smtp_server, ["perm-1"], 5)
    code, out = run_cli(worker_proc, env, "dead", "purge", "--yes")  # one MULTI
    assert code == 0 and "purged 2 dead letter(s)" in out, out
    assert dead_letters(rc) == [] and unsettled(rc, cluster) == {}
    assert_one_slot(cluster, K.sent("perm-1"), K.counters)


# -- (d) a worker killed -9 -------------------------------------------------------------------------


def test_events_of_a_killed_worker_are_delivered_by_another(
    cluster, rc, smtp_server, worker_env, worker_proc
):
    slow_down(smtp_server, 0.1)  # events stay in flight long enough to be caught there
    env = env_for(cluster, smtp_server, worker_env)
    victim = start_worker(worker_proc, env | {"NOTIFIER_WORKER_ID": "victim"})
    ids = [f"k9-{i:02d}" for i in range(30)]
    push(rc, *(event(i) for i in ids))
    wait_until(lambda: rc.llen(K.processing("victim")) >= 3, 10, "events in flight")
    kill9(victim)
    killed_at = time.time()
    in_flight = raw_ids(rc.lrange(K.processing("victim"), 0, -1))
    assert in_flight, "the victim held no events when it was killed"

    survivor = start_worker(worker_proc, env | {"NOTIFIER_WORKER_ID": "survivor"})
    wait_delivered(smtp_server, ids, 15)
    recovered_at = max(m.received_at for m in smtp_server.messages
                       if m.message["X-Notifier-Event-Id"] in in_flight)  # fmt: skip
    print(f"cluster: kill -9 with {len(in_flight)} in flight, delivered by another worker "
          f"{recovered_at - killed_at:.2f} s later")  # fmt: skip
    assert f"worker victim stopped heartbeating: returned its {len(in_flight)} event(s)" in log_of(
        survivor
    )
    wait_until(lambda: unsettled(rc, cluster) == {}, 5, "nothing unsettled")
    got = delivered(smtp_server)
    assert set(got) == set(ids)
    assert sum(n - 1 for n in got.values()) <= len(in_flight)
    assert dead_letters(rc) == []
    assert_one_slot(cluster, K.workers, K.heartbeat("survivor"))


# -- (e) digests ------------------------------------------------------------------------------------


def test_burst_over_the_rate_limit_goes_as_a_digest(
    cluster, rc, smtp_server, worker_env, worker_proc
):
    window = 1.0
    env = env_for(cluster, smtp_server, worker_env, smtp_rate_per_minute=3,
                  smtp_rate_window_s=window, concurrency=2)  # fmt: skip
    start_worker(worker_proc, env)
    now = time.time()
    ids = [f"b{i:02d}" for i in range(12)]
    push(rc, *(event(i, ts=now + n * 1e-4, strategy="open_burst", kind="signal")
               for n, i in enumerate(ids)))  # fmt: skip
    wait_delivered(smtp_server, ids, 10, digests=True)
    time.sleep(0.2)
    messages = smtp_server.messages
    assert mail_ids(messages) == Counter({i: 1 for i in ids})
    digests = [m for m in messages if is_digest(m)]
    assert digests and len(messages) - len(digests) == 3
    assert all(ids_in(d) == sorted(ids_in(d)) for d in digests)  # oldest first
    assert counters(rc)["digested"] == sum(len(ids_in(d)) for d in digests)
    wait_until(lambda: unsettled(rc, cluster) == {}, 5, "nothing unsettled")
    assert_one_slot(cluster, K.rate("primary"), K.counters)


# -- a connection closed under a call ---------------------------------------------------------------


async def test_a_connection_closed_while_in_use_is_retried_as_a_lost_connection():
    """redis-py 8.1 lets asyncio's AttributeError out of a write on a connection that another
    task closed (its cluster client closes them all on CLUSTERDOWN, when a node comes back):
    the worker's guard waits it out like a lost connection; any other AttributeError is a bug
    and raised."""
    closed = aredis.Connection(port=1)  # never connected: no writer, as after a close

    async def renew_on_a_closed_connection(**_: Any) -> int:
        calls.append(time.monotonic())
        if len(calls) == 1:
            await closed._send_packed_command([b"PING\r\n"])
        return 1

    calls: list[float] = []
    client = aredis.Redis(port=1)  # never used
    queue = Queue(client, K, "w1", guard=RedisGuard("redis+cluster://127.0.0.1:1"))
    queue._renew = renew_on_a_closed_connection  # type: ignore[assignment]
    assert await queue.heartbeat({}) is True
    assert len(calls) == 2 and queue.guard.errors == 1  # type: ignore[union-attr]

    async def bug(**_: Any) -> int:
        raise AttributeError("a bug of ours")

    queue._renew = bug  # type: ignore[assignment]
    with pytest.raises(AttributeError, match="a bug of ours"):
        await queue.heartbeat({})
    await client.aclose()


# -- (g) the node that holds the queue is lost and comes back (keep last: it restarts a node) -------


def cluster_ok(cluster: ClusterSet) -> bool:
    for host, port in cluster.addresses:
        with redis.Redis(host=host, port=port) as node:
            info = node.cluster("INFO")
        if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != len(cluster.nodes):
            return False
    return True


def test_loss_of_the_queue_node_is_waited_out_nothing_lost(
    cluster, rc, smtp_server, worker_env, worker_proc
):
    node = slot_node(cluster)
    with redis.Redis(port=node.port) as r:  # every write fsynced before it is acknowledged
        r.config_set("appendonly", "yes")
        r.config_set("appendfsync", "always")
        wait_until(lambda: not r.info("persistence")["aof_rewrite_in_progress"], 5, "the AOF")
    node.appendonly = True  # and read back at the restart
    slow_down(smtp_server, 0.1)
    proc = start_worker(worker_proc, env_for(cluster, smtp_server, worker_env, concurrency=2))
    ids = [f"n{i}" for i in range(6)]
    with Notifier(redis_url=cluster.url) as n:
        for i in ids:
            n.send(f"alert {i}", id=i)
        wait_until(lambda: len(smtp_server.messages) >= 1, 5, "a first delivery")
        node.kill()
        killed_at = time.time()
        with pytest.raises(NotifierUnavailable) as refused:
            n.send("during the outage", id="during")
        assert refused.value.queued is False
    wait_for_log(proc, "Redis unreachable during")
    node.start()
    back_at = time.time()
    ok_after = wait_until(lambda: cluster_ok(cluster), 10, "the cluster ok again")
    push(rc, event("after"))
    wait_delivered(smtp_server, [*ids, "after"], 15)
    resumed_at = min(m.received_at for m in smtp_server.messages if m.received_at > back_at)
    print(f"cluster: queue node down {back_at - killed_at:.2f} s, cluster ok {ok_after:.2f} s "
          f"after its restart, first delivery {resumed_at - back_at:.2f} s after it")  # fmt: skip
    wait_for_log(proc, "Redis reachable again")
    assert proc.poll() is None
    wait_until(lambda: unsettled(rc, cluster) == {}, 5, "nothing unsettled")
    got = delivered(smtp_server)
    assert set(got) == {*ids, "after"}
    assert sum(n - 1 for n in got.values()) <= 2  # at most the lanes' events in flight
    assert dead_letters(rc) == []
    assert_one_slot(cluster, K.sent("after"))


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "redis+sentinel://127.0.0.1:1/mymaster/0",
        "redis+cluster://127.0.0.1:1",
    ],
    ids=["standalone", "sentinel", "cluster"],
)
async def test_the_worker_client_makes_no_retries_of_its_own(url: str) -> None:
    """Every failed call reaches the worker's guard (which counts it, so that the fetch loop
    returns what a lost reply moved): redis-py's own retries are off for every topology (the
    cluster client's default was 3 tries, hiding a lost BLMOVE reply)."""
    from worker.queue import connect

    client = connect(url)
    try:
        retry = client.retry if isinstance(client, AsyncRedisCluster) else client.get_retry()
        assert retry is not None and retry.get_retries() == 0
    finally:
        await client.aclose()
