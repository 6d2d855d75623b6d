"""Every decision goes through one Settler, and each does all of the bookkeeping: the Redis
move (with the delivery record in the same step), the metrics, the counts, the log line and
the hook. A decision type that skipped any of them fails here (issue 10)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis

from producer.event import parse_event
from producer.keys import Keys
from worker.metrics import Metrics
from worker.queue import Queue, connect
from worker.records import DeliveryRecord, Status
from worker.settle import (
    Dead,
    DigestSent,
    Duplicate,
    Handling,
    Hold,
    Outcome,
    Receipt,
    Requeue,
    Retry,
    Sent,
    Settler,
    Suppressed,
)

KEYS = Keys("notifier")
RAW = json.dumps({"id": "s1", "subject": "止损 600519", "ts": time.time() - 0.2}).encode()
RECEIPT = Receipt(channel="primary", mode="pipelining", send_s=0.05)

# decision, what it leaves where, the metric (name, labels) that counts it, the count key
CASES = {
    "sent": (Sent(RECEIPT, "止损 600519"), "sent", ("notifier_delivered_total", {}), "sent"),
    "sent, some recipients refused": (
        Sent(
            Receipt("primary", "pipelining", 0.05, refused={"b@example.com": "550 no"}),
            "止损 600519",
            retry_refused='{"id":"s1.r1","subject":"x","to":["b@example.com"]}',
            retry_due=time.time() + 5,
        ),
        "sent+retry",
        ("notifier_retried_total", {"reason": "refused"}),
        "sent",
    ),
    "retry": (
        Retry("transient", "451 later", time.time() + 5, RAW.decode(), 1),
        "retry",
        ("notifier_retried_total", {"reason": "transient"}),
        "retry",
    ),
    "retry, another copy in flight": (
        Retry("in-flight", "being sent by another lane", time.time() + 1, RAW.decode(), 0),
        "retry",
        ("notifier_retried_total", {"reason": "in-flight"}),
        "retry",
    ),
    "dead": (
        Dead("permanent", "550 refused", 1),
        "dead",
        ("notifier_dead_total", {"reason": "permanent"}),
        "dead",
    ),
    "hold": (
        Hold("primary.abc", time.time() + 30, "primary", 20),
        "held",
        ("notifier_held_total", {}),
        "held",
    ),
    "requeue": (
        Requeue("configuration", "535 login"),
        "queue",
        ("notifier_requeued_total", {"reason": "configuration"}),
        "requeued",
    ),
    "requeue, fenced": (
        Requeue("fenced"),
        "queue",
        ("notifier_requeued_total", {"reason": "fenced"}),
        "requeued",
    ),
    "suppressed": (
        Suppressed(3, "feed-down"),
        "gone",
        ("notifier_suppressed_total", {}),
        "suppressed",
    ),
    "duplicate": (Duplicate(), "gone", ("notifier_duplicates_total", {}), "duplicate"),
}


@pytest.fixture
async def client(redis_url) -> AsyncIterator[aredis.Redis]:
    c = connect(redis_url)
    yield c
    await c.aclose()


def _metric(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("case", list(CASES))
async def test_every_decision_does_all_the_bookkeeping(client, caplog, case):
    decision, where, (metric, labels), count_key = CASES[case]
    queue = Queue(client, KEYS, "w1")
    metrics = Metrics(1.0)
    outcomes: list[Outcome] = []
    woken: list[bool] = []
    settler = Settler(
        queue,
        metrics,
        latency_target_s=1.0,
        on_outcome=outcomes.append,
        on_retry=lambda: woken.append(True),
    )
    await client.rpush(queue.processing, RAW)
    event = parse_event(RAW)
    claim = queue.claim_for("s1", "t1")
    assert await queue.claim(claim) == "claimed"
    h = Handling(
        raw=RAW,
        id="s1",
        fetched_at=time.time() - 0.1,
        event=event,
        claim=None if isinstance(decision, Duplicate) else claim,
        first_seen=time.time() - 0.1,
        produced=event.ts or 0.0,
        recipients=["a@example.com", "b@example.com"],
    )
    before = _metric(metrics, metric, labels)
    with caplog.at_level(logging.INFO, logger="worker.deliver"):
        await settler.settle(h, decision)

    # 1. the Redis move
    assert await client.llen(queue.processing) == 0
    places = {
        "queue": await client.llen(KEYS.queue),
        "retry": await client.zcard(KEYS.retry),
        "dead": await client.llen(KEYS.dead),
        "held": await client.llen(KEYS.held("primary.abc")),
        "sent": await client.exists(KEYS.sent("s1")),
    }
    expected = {
        "sent": {"sent": 1},
        "sent+retry": {"sent": 1, "retry": 1},
        "retry": {"retry": 1},
        "dead": {"dead": 1},
        "held": {"held": 1},
        "queue": {"queue": 1},
        "gone": {},
    }[where]
    assert {k: v for k, v in places.items() if v} == expected
    if not isinstance(decision, Duplicate):  # the claim taken for this handling is released
        assert not await client.exists(KEYS.sending("s1"))
    # 2. the delivery record, written in the same step
    (newest,) = await client.lrange(KEYS.deliveries, 0, 0)
    record = DeliveryRecord.from_json(newest)
    assert record.id == "s1"
    assert record.status.value == outcomes[-1].status.value
    # 3. the metric
    assert _metric(metrics, metric, labels) == before + 1
    # ... and per channel (the account that sent it, else the delivery's channel)
    channel = "primary" if isinstance(decision, Sent) else "email"
    if not isinstance(decision, Hold):  # (held: the channel whose limit held it)
        status = outcomes[-1].status.value
        labels = {"channel": channel, "outcome": status}
        assert metrics.registry.get_sample_value("notifier_channel_outcomes_total", labels) == 1
    # 4. the worker's counts
    assert settler.counts[count_key] >= 1
    # 5. the log line, naming the event
    assert any("s1" in r.getMessage() for r in caplog.records), caplog.text
    # 6. the hook
    assert [o.event_id for o in outcomes] == ["s1"]
    if isinstance(decision, Retry) or (isinstance(decision, Sent) and decision.retry_refused):
        assert woken, "the scheduler was not woken for the retry"


async def test_a_digest_is_settled_with_every_event_counted(client, caplog):
    queue = Queue(client, KEYS, "w1")
    metrics = Metrics(1.0)
    outcomes: list[Outcome] = []
    settler = Settler(queue, metrics, latency_target_s=1.0, on_outcome=outcomes.append)
    hs = []
    for i in range(3):
        raw = json.dumps({"id": f"d{i}", "subject": f"s{i}", "ts": time.time() - 5}).encode()
        await client.rpush(queue.processing, raw)
        claim = queue.claim_for(f"d{i}", "t")
        await queue.claim(claim)
        hs.append(Handling(raw=raw, id=f"d{i}", fetched_at=time.time(), claim=claim,
                           produced=time.time() - 5, recipients=["a@example.com"]))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="worker.deliver"):
        await settler.digest_sent(hs, DigestSent(RECEIPT, "[DIGEST] 3", "<m@x>", "primary", 20))
    assert await client.llen(queue.processing) == 0
    assert all([await client.exists(KEYS.sent(f"d{i}")) for i in range(3)])
    assert not [k async for k in client.scan_iter("notifier:sending:*")]
    (newest,) = await client.lrange(KEYS.deliveries, 0, 0)
    record = DeliveryRecord.from_json(newest)
    assert record.status is Status.DIGEST and record.delivered == 3
    assert len(record.event_latencies) == 3
    assert metrics.registry.get_sample_value("notifier_delivered_total") == 3
    assert metrics.registry.get_sample_value("notifier_digests_total") == 1
    assert settler.counts["sent"] == 3
    assert [o.status for o in outcomes] == [Status.DIGEST] * 3
    assert "digest of 3 event(s)" in caplog.text
    assert "SLOW 3 held event(s)" in caplog.text  # 5 s past the 1 s target
