"""Trading fit (issue 6), in-process and with a fake clock: rate limit and digests, repeat
suppression, expiry, the late marker, day threads and the producer helpers.

Two levels:

* queue level: the Lua scripts of worker/queue.py called with an explicit ``now``;
* deliverer level: :class:`worker.deliver.Deliverer` against the private redis-server and an
  aiosmtpd server, with ``time`` replaced by :class:`FakeClock` in worker.deliver,
  worker.queue and worker.accounts (the clock moves only when a test moves it).

``FakeClock`` and ``Rig`` come from tests/support/helpers.py, the ``make_rig`` fixture from
tests/conftest.py.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import AsyncNotifier, Notifier
from producer.event import Event, parse_event
from tests.support.helpers import (
    DIGEST_SUBJECT,
    EVENT_ID_IN_DIGEST,
    KEYS,
    MAIL_FROM,
    MAIL_TO,
    QQ_THROTTLE,
    T0,
    FakeClock,
    clean_env,
    is_digest,
    mail_ids,
    sent_marks,
    text_of,
)
from worker.compose import Composer, delayed_prefix, format_delay, repeated_note
from worker.devtools.smtp_server import SMTPTestServer
from worker.mailer import message_bytes
from worker.queue import Queue, connect
from worker.records import DeliveryRecord, Status
from worker.settings import load_settings

# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_notifier_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env(monkeypatch, tmp_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def digests(smtp: SMTPTestServer) -> list[EmailMessage]:
    return [m.message for m in smtp.messages if is_digest(m)]


def singles(smtp: SMTPTestServer) -> list[EmailMessage]:
    return [m.message for m in smtp.messages if not is_digest(m)]


# ============================================================================ queue level (Lua)


@pytest.fixture
async def q(redis_url: str) -> AsyncIterator[Queue]:
    client = connect(redis_url)
    yield Queue(client, KEYS, "w1")
    await client.aclose()


async def test_rate_allows_the_limit_per_window_then_says_how_long_to_wait(q: Queue):
    for i in range(10):
        assert await q.rate_acquire("acc", 10, now=T0 + i, window_s=60) == 0.0
    wait = await q.rate_acquire("acc", 10, now=T0 + 30, window_s=60)
    assert wait == pytest.approx(30.0)  # the first slot (T0) frees at T0 + 60
    # a refused attempt takes no slot: still refused just before, allowed just after
    assert await q.rate_acquire("acc", 10, now=T0 + 59.9, window_s=60) == pytest.approx(0.1)
    assert await q.rate_acquire("acc", 10, now=T0 + 60.001, window_s=60) == 0.0
    # that took the freed slot; the next one frees at T0 + 1 + 60
    assert await q.rate_acquire("acc", 10, now=T0 + 60.5, window_s=60) == pytest.approx(0.5)


async def test_rate_window_is_a_setting(q: Queue):
    for i in range(3):
        assert await q.rate_acquire("acc", 3, now=T0 + i * 0.1, window_s=3) == 0.0
    assert await q.rate_acquire("acc", 3, now=T0 + 1, window_s=3) == pytest.approx(2.0)
    assert await q.rate_acquire("acc", 3, now=T0 + 3.01, window_s=3) == 0.0


async def test_forced_sends_take_a_slot_beyond_the_limit_and_count(q: Queue):
    for i in range(2):
        assert await q.rate_acquire("acc", 2, now=T0 + i, window_s=10) == 0.0
    assert await q.rate_acquire("acc", 2, now=T0 + 2, window_s=10, force=True) == 0.0
    assert await q.rate_acquire("acc", 2, now=T0 + 3, window_s=10, force=True) == 0.0
    # four sends in the window, limit two: a slot frees when the 3rd oldest (T0 + 2) leaves
    assert await q.rate_acquire("acc", 2, now=T0 + 4, window_s=10) == pytest.approx(8.0)
    assert await q.rate_acquire("acc", 2, now=T0 + 12.001, window_s=10) == 0.0


async def test_rate_limits_are_per_account_and_shared_by_workers(redis_url: str):
    a, b = connect(redis_url), connect(redis_url)
    try:
        w1, w2 = Queue(a, KEYS, "w1"), Queue(b, KEYS, "w2")
        assert await w1.rate_acquire("qq", 2, now=T0, window_s=60) == 0.0
        assert await w2.rate_acquire("qq", 2, now=T0, window_s=60) == 0.0  # same instant
        assert await w1.rate_acquire("qq", 2, now=T0, window_s=60) > 0
        assert await w2.rate_acquire("qq", 2, now=T0, window_s=60) > 0
        assert await w2.rate_acquire("163", 2, now=T0, window_s=60) == 0.0
    finally:
        await a.aclose()
        await b.aclose()


async def test_suppress_window_counts_repeats_and_reports_them_after(q: Queue):
    assert await q.suppress("k", 300, "e1", now=T0) == (False, 0, 0.0)
    assert await q.suppress("k", 300, "e2", now=T0 + 10) == (True, 1, T0)
    assert await q.suppress("k", 300, "e3", now=T0 + 20) == (True, 2, T0)
    # the window's own event again (a retry) is never suppressed and counts nothing
    assert (await q.suppress("k", 300, "e1", now=T0 + 30))[0] is False
    assert await q.suppress("k", 300, "e4", now=T0 + 40) == (True, 3, T0)
    # after the window: sent, with the previous window's count and start
    assert await q.suppress("k", 300, "e5", now=T0 + 301) == (False, 3, T0)
    # a new window opened at T0 + 301 with nothing suppressed yet
    assert await q.suppress("k", 300, "e6", now=T0 + 302) == (True, 1, T0 + 301)
    assert await q.suppress("k", 300, "e7", now=T0 + 602) == (False, 1, T0 + 301)


async def test_suppress_keys_are_independent(q: Queue):
    assert (await q.suppress("a", 60, "a1", now=T0))[0] is False
    assert (await q.suppress("b", 60, "b1", now=T0 + 1))[0] is False
    assert (await q.suppress("a", 60, "a2", now=T0 + 2))[0] is True
    assert (await q.suppress("b", 60, "b2", now=T0 + 3))[0] is True
    assert (await q.suppress("c", 60, "c1", now=T0 + 4))[0] is False


async def test_hold_take_digest_and_ack(q: Queue, redis_url: str):
    r = redis.Redis.from_url(redis_url)
    try:
        raws = [f'{{"id":"h{i}","subject":"s{i}"}}'.encode() for i in range(5)]
        for raw in raws:
            r.lpush(KEYS.queue, raw)
        fetched = await q.fetch_ready(5)
        assert fetched == raws
        held = DeliveryRecord(T0, Status.HELD, "h0")
        assert await q.hold("g1", fetched[:3], T0 + 50, held) == 3
        assert await q.hold("g1", fetched[3:], T0 + 20, held) == 2  # the earliest due time wins
        assert await q.hold("g1", [b"not in processing"], T0 + 1, held) == 0  # only what we hold
        assert r.zscore(KEYS.digests, "g1") == T0 + 1  # (due time still moves earlier)
        assert r.llen(q.processing) == 0
        assert r.lrange(KEYS.held("g1"), 0, -1) == raws
        assert (await q.depths()).held == 5
        assert await q.take_digest(now=T0) is None  # not due yet
        assert await q.next_digest_due() == T0 + 1
        group, taken = await q.take_digest(now=T0 + 1)  # type: ignore[misc]
        assert group == "g1"
        assert taken == raws  # oldest first
        assert not r.exists(KEYS.held("g1"))
        assert r.zcard(KEYS.digests) == 0
        assert sorted(r.lrange(q.processing, 0, -1)) == sorted(raws)
        assert await q.take_digest(now=T0 + 100) is None
        await q.ack_digest(
            taken,
            [q.claim_for(f"h{i}", "t") for i in range(5)],
            DeliveryRecord(T0, Status.DIGEST, "d1", count=5),
        )
        assert r.llen(q.processing) == 0
        assert all(await sent_marks(q, [f"h{i}" for i in range(5)]))
        counters = await q.counters()
        assert counters["digested"] == 5
        assert counters["delivered"] == 1  # one mail
    finally:
        r.close()


# ============================================================================ digests (Deliverer)


async def test_burst_of_100_against_10_per_window_fake_clock(make_rig, smtp_server, clock):
    """100 events in one second, limit 10/min: 10 go out at once, the 5 critical ones too,
    the other 85 wait for the first free slot and go out as one digest, oldest first."""
    rig = make_rig(smtp_server, clock, smtp_rate_per_minute=10, smtp_rate_window_s=60)
    critical = {f"b{i:03d}" for i in (20, 40, 60, 80, 99)}
    kinds = ["signal", "signal", "fill"]
    events = [
        rig.event(f"b{i:03d}", kind=kinds[i % 3], strategy="ma_cross",
                  severity="critical" if f"b{i:03d}" in critical else "info", ts=T0 + i * 0.01)
        for i in range(100)
    ]  # fmt: skip
    await rig.push(*events)
    clock.advance(1.0)
    await rig.run_queue(step_s=0.001)
    first = singles(smtp_server)
    assert len(first) == 15
    ids = [str(m["X-Notifier-Event-Id"]) for m in first]
    assert ids[:10] == [f"b{i:03d}" for i in range(10)]  # within the limit: at once, in order
    assert set(ids[10:]) == critical  # never held behind the digest
    assert all(m["Subject"].startswith("[CRITICAL]") for m in first[10:])
    statuses = Counter(o.status for o in rig.outcomes)
    assert statuses == {"sent": 15, "held": 85}
    assert (await rig.queue.depths()).held == 85

    # nothing more until a slot frees (the first send was at T0 + 1)
    clock.advance(58.0)
    assert await rig.run_digest() is False
    assert len(smtp_server.messages) == 15
    clock.advance(2.5)  # T0 + 61.5: the first sends have left the window
    assert await rig.run_digest() is True
    assert await rig.run_digest() is False
    (digest,) = digests(smtp_server)
    held_ids = [f"b{i:03d}" for i in range(10, 100) if f"b{i:03d}" not in critical]
    listed = EVENT_ID_IN_DIGEST.findall(text_of(digest))
    assert listed == held_ids  # all of them, oldest first
    m = DIGEST_SUBJECT.fullmatch(str(digest["Subject"]))
    assert m is not None, digest["Subject"]
    n_signal = sum(1 for i in range(10, 100) if f"b{i:03d}" not in critical and i % 3 != 2)
    assert (m[1], m[2], m[3]) == ("85", f"{n_signal} signal, {85 - n_signal} fill", "ma_cross")
    assert digest["X-Notifier-Digest"] == "85"
    assert [a.addr_spec for a in digest["To"].addresses] == [MAIL_TO]

    # every event in exactly one mail; nothing left anywhere
    assert mail_ids(smtp_server.messages) == Counter({f"b{i:03d}": 1 for i in range(100)})
    assert await rig.leftovers() == {}
    assert await rig.dead() == []
    counters = await rig.queue.counters()
    assert counters["digested"] == 85
    assert counters["delivered"] == 16  # 15 mails for single events + 1 digest mail
    assert all(await sent_marks(rig.queue, [f"b{i:03d}" for i in range(100)]))
    # `notifier stats` counts every digested event as delivered, with its own latency
    from worker.cli import stats_snapshot

    st = await stats_snapshot(rig.queue, 10**9, 1.0)
    assert (st["delivered"], st["digests"], st["latency"]["count"]) == (100, 1, 100)
    assert st["depths"]["held"] == 0
    # latency: critical ones as fast as the first ten, the held ones a window later
    latency = {o.event_id: o.latency for o in rig.outcomes if o.status in ("sent", "digest")}
    assert max(latency[i] for i in critical) < 2.0
    assert min(latency[i] for i in held_ids) > 58.0


async def test_within_the_limit_again_after_a_digest_events_go_out_at_once(
    make_rig, smtp_server, clock
):
    rig = make_rig(smtp_server, clock, smtp_rate_per_minute=3, smtp_rate_window_s=10)
    await rig.deliver(*(rig.event(f"a{i}") for i in range(5)))
    assert len(smtp_server.messages) == 3
    clock.advance(10.5)
    assert await rig.run_digest()
    assert [m["X-Notifier-Digest"] for m in digests(smtp_server)] == ["2"]
    # the digest took one slot of the new window: two more single mails fit, then hold
    await rig.deliver(*(rig.event(f"c{i}") for i in range(3)))
    assert [str(m["X-Notifier-Event-Id"]) for m in singles(smtp_server)[3:]] == ["c0", "c1"]
    assert rig.outcomes[-1].status == "held" and rig.outcomes[-1].event_id == "c2"


async def test_a_held_group_waits_for_the_next_free_slot(make_rig, smtp_server, clock):
    """A digest that finds no free slot (critical sends took them) is held again."""
    rig = make_rig(smtp_server, clock, smtp_rate_per_minute=2, smtp_rate_window_s=10)
    await rig.deliver(rig.event("x0"), rig.event("x1"), rig.event("x2"))
    clock.advance(5)
    await rig.deliver(rig.event("k0", severity="critical"), rig.event("k1", severity="critical"))
    clock.advance(5.1)  # x0/x1 left the window; k0/k1 still fill it
    assert await rig.run_digest()
    assert digests(smtp_server) == []
    assert await rig.run_digest() is False
    assert (await rig.queue.depths()).held == 1
    clock.advance(5)
    assert await rig.run_digest()
    (digest,) = digests(smtp_server)
    assert EVENT_ID_IN_DIGEST.findall(text_of(digest)) == ["x2"]
    assert mail_ids(smtp_server.messages) == Counter({"x0": 1, "x1": 1, "x2": 1, "k0": 1, "k1": 1})


async def test_groups_are_per_recipients(make_rig, smtp_server, clock):
    rig = make_rig(smtp_server, clock, smtp_rate_per_minute=1, smtp_rate_window_s=10,
                   allowed_recipients=["risk@example.com"])  # fmt: skip
    await rig.deliver(
        rig.event("p0"), rig.event("p1"), rig.event("r1", to=["risk@example.com"]),
        rig.event("p2"), rig.event("r2", to=["risk@example.com"]),
    )  # fmt: skip
    clock.advance(11)
    assert await rig.run_digest()
    clock.advance(11)
    assert await rig.run_digest()
    by_to = {
        tuple(a.addr_spec for a in m["To"].addresses): EVENT_ID_IN_DIGEST.findall(text_of(m))
        for m in digests(smtp_server)
    }
    assert by_to == {(MAIL_TO,): ["p1", "p2"], ("risk@example.com",): ["r1", "r2"]}


# ============================================================================ repeat suppression


async def test_same_dedup_key_within_the_window_is_one_mail(make_rig, smtp_server, clock):
    rig = make_rig(smtp_server, clock)  # DEDUP_WINDOW_S default 300
    for i in range(4):
        await rig.deliver(rig.event(f"d{i}", dedup_key="ma_cross:feed-down"))
        clock.advance(10)
    assert [str(m.message["X-Notifier-Event-Id"]) for m in smtp_server.messages] == ["d0"]
    assert "repeated" not in text_of(smtp_server.messages[0].message)
    assert [o.status for o in rig.outcomes] == ["sent", "suppressed", "suppressed", "suppressed"]
    assert await rig.leftovers() == {}
    assert (await rig.queue.counters())["suppressed"] == 3
    clock.advance(300)  # the window (T0 .. T0 + 300) is over
    await rig.deliver(rig.event("d9", dedup_key="ma_cross:feed-down"))
    last = smtp_server.messages[-1].message
    assert last["X-Notifier-Event-Id"] == "d9"
    assert ">> repeated 3× in 6 min" in text_of(last)  # 3 suppressed; window began 340 s ago
    # and the new window started with d9: a repeat now is suppressed again
    await rig.deliver(rig.event("d10", dedup_key="ma_cross:feed-down"))
    assert len(smtp_server.messages) == 2


async def test_repeated_note_in_chinese(make_rig, smtp_server, clock):
    rig = make_rig(smtp_server, clock, locale="zh", dedup_window_s=30)
    for i in range(3):
        await rig.deliver(rig.event(f"z{i}", dedup_key="k"))
        clock.advance(5)
    clock.advance(30)
    await rig.deliver(rig.event("z9", dedup_key="k"))
    assert len(smtp_server.messages) == 2
    assert "此前 45 秒内重复 2 次（已合并）" in text_of(smtp_server.messages[-1].message)


def test_repeated_note_wording():
    assert repeated_note(37, T0, T0 + 300) == "repeated 37× in 5 min"
    assert repeated_note(2, T0, T0 + 12.4) == "repeated 2× in 12 s"
    assert repeated_note(5, T0, T0 + 2 * 3600) == "repeated 5× in 2.0 h"
    assert repeated_note(37, T0, T0 + 300, "zh") == "此前 5 分钟内重复 37 次（已合并）"


async def test_window_from_the_event_or_the_route_wins_over_the_setting(
    make_rig, smtp_server, clock, tmp_path
):
    routes = tmp_path / "routes.toml"
    routes.write_text('[[route]]\nstrategy = "grid_*"\nto = ["trader@example.com"]\n'
                      "dedup_window_s = 20\n")  # fmt: skip
    rig = make_rig(smtp_server, clock, routes_file=routes, dedup_window_s=1000)
    await rig.deliver(rig.event("e0", dedup_key="ev", dedup_window_s=10),
                      rig.event("g0", dedup_key="gr", strategy="grid_1"),
                      rig.event("s0", dedup_key="st"))  # fmt: skip
    clock.advance(15)  # past the event's own window, within the route's and the setting's
    await rig.deliver(rig.event("e1", dedup_key="ev", dedup_window_s=10),
                      rig.event("g1", dedup_key="gr", strategy="grid_1"),
                      rig.event("s1", dedup_key="st"))  # fmt: skip
    clock.advance(10)  # past the route's window
    await rig.deliver(rig.event("g2", dedup_key="gr", strategy="grid_1"),
                      rig.event("s2", dedup_key="st"))  # fmt: skip
    sent = [str(m.message["X-Notifier-Event-Id"]) for m in smtp_server.messages]
    assert sent == ["e0", "g0", "s0", "e1", "g2"]


async def test_different_keys_and_events_without_a_key_are_independent(
    make_rig, smtp_server, clock
):
    rig = make_rig(smtp_server, clock)
    await rig.deliver(
        rig.event("a0", dedup_key="a"), rig.event("b0", dedup_key="b"), rig.event("n0"),
        rig.event("a1", dedup_key="a"), rig.event("b1", dedup_key="b"), rig.event("n1"),
    )  # fmt: skip
    assert sorted(str(m.message["X-Notifier-Event-Id"]) for m in smtp_server.messages) == [
        "a0", "b0", "n0", "n1",
    ]  # fmt: skip


async def test_a_retry_of_the_windows_own_event_is_not_suppressed(make_rig, smtp_server, clock):
    rig = make_rig(smtp_server, clock, retry_base_s=1, retry_max_s=2)
    smtp_server.fail_next("DATA", 451, "4.3.0 try again later")
    await rig.deliver(rig.event("o1", dedup_key="k"))
    assert rig.outcomes[-1].status == "retry"
    await rig.deliver(rig.event("o2", dedup_key="k"))  # a repeat in o1's window
    assert rig.outcomes[-1].status == "suppressed"
    clock.advance(2)
    assert await rig.run_retries() == 1
    assert [str(m.message["X-Notifier-Event-Id"]) for m in smtp_server.messages] == ["o1"]
    assert await rig.leftovers() == {}


async def test_a_throttled_retry_of_the_windows_own_event_is_not_suppressed(
    make_rig, smtp_server, clock
):
    """Throttled retries keep attempts at 0: the Lua owner check must let them through."""
    rig = make_rig(smtp_server, clock, throttle_base_s=1, retry_max_s=2)
    smtp_server.fail_next("MAIL", 550, QQ_THROTTLE)
    await rig.deliver(rig.event("o1", dedup_key="k"))
    assert (rig.outcomes[-1].status, rig.outcomes[-1].reason) == ("retry", "throttled")
    clock.advance(5)
    assert await rig.run_retries() == 1
    assert [str(m.message["X-Notifier-Event-Id"]) for m in smtp_server.messages] == ["o1"]


async def test_the_repeated_note_survives_a_failed_first_attempt(make_rig, smtp_server, clock):
    """The mail after the window must say how many were suppressed even when its first
    attempt failed and a retry delivered it."""
    rig = make_rig(smtp_server, clock, retry_base_s=1, retry_max_s=2, dedup_window_s=60)
    await rig.deliver(rig.event("w0", dedup_key="k"))
    await rig.deliver(rig.event("w1", dedup_key="k"), rig.event("w2", dedup_key="k"))
    clock.advance(61)
    smtp_server.fail_next("DATA", 451, "4.3.0 try again later")
    await rig.deliver(rig.event("w3", dedup_key="k"))
    assert rig.outcomes[-1].status == "retry"
    clock.advance(2)
    await rig.run_retries()
    last = smtp_server.messages[-1].message
    assert last["X-Notifier-Event-Id"] == "w3"
    assert "repeated 2× in 1 min" in text_of(last)


async def test_producer_error_collapses_repeated_exceptions(
    make_rig, smtp_server, redis_url, monkeypatch
):
    clock = FakeClock(time.time())  # the producer stamps the real time
    rig = make_rig(smtp_server, clock)

    def failing(n: int) -> None:
        raise ConnectionResetError("行情源断开 feed lost")

    with Notifier(redis_url) as n:
        for i in range(5):
            try:
                failing(i)
            except ConnectionResetError as exc:
                n.error("ma_cross", exc, dedup_window_s=60)
        n.error("grid_1", "行情源断开 feed lost", dedup_window_s=60)  # another strategy
    await rig.run_queue()
    mails = [m.message for m in smtp_server.messages]
    assert len(mails) == 2
    by_strategy = {str(m["X-Notifier-Strategy"]): m for m in mails}
    ma = by_strategy["ma_cross"]
    assert (
        ma["Subject"] == "[CRITICAL] [ERROR] ConnectionResetError: 行情源断开 feed lost · ma_cross"
    )
    body = text_of(ma)
    assert "Traceback (most recent call last)" in body and "in failing" in body
    assert by_strategy["grid_1"]["Subject"] == "[CRITICAL] [ERROR] 行情源断开 feed lost · grid_1"
    assert Counter(o.status for o in rig.outcomes) == {"sent": 2, "suppressed": 4}
    clock.advance(61)
    with Notifier(redis_url) as n:
        n.error("ma_cross", ConnectionResetError("行情源断开 feed lost"), dedup_window_s=60)
    await rig.run_queue()
    assert "repeated 4× in 1 min" in text_of(smtp_server.messages[-1].message)


# ============================================================================ expiry, late marker


async def test_an_event_already_older_than_expires_s_is_dead_as_expired(
    make_rig, smtp_server, clock
):
    rig = make_rig(smtp_server, clock)
    await rig.deliver(rig.event("old", ts=T0 - 120, expires_s=60), rig.event("fresh",
                      ts=T0 - 30, expires_s=60))  # fmt: skip
    assert [str(m.message["X-Notifier-Event-Id"]) for m in smtp_server.messages] == ["fresh"]
    (letter,) = await rig.dead()
    assert (letter["id"], letter["reason"]) == ("old", "expired")
    assert "expires_s=60" in letter["error"]
    assert json.loads(letter["event"])["id"] == "old"
    assert await rig.leftovers() == {}
    assert (await rig.queue.counters())["dead:expired"] == 1


async def test_an_event_that_would_expire_during_retries_is_dead_as_expired(
    make_rig, smtp_server, clock
):
    # retry back-off of at least RETRY_BASE_S / 10 = 3 s; the event has 2 s left
    rig = make_rig(smtp_server, clock, retry_base_s=30, retry_max_s=60)
    smtp_server.fail_next("DATA", 451, "4.3.0 try again later", count=2)
    await rig.deliver(rig.event("soon", ts=T0 - 8, expires_s=10),
                      rig.event("later", ts=T0, expires_s=3600))  # fmt: skip
    (letter,) = await rig.dead()
    assert (letter["id"], letter["reason"]) == ("soon", "expired")
    assert "would pass before the next attempt" in letter["error"]
    assert "451" in letter["error"]
    assert (await rig.queue.depths()).retry == 1  # "later" has time: an ordinary retry
    assert smtp_server.messages == []


async def test_a_held_event_that_expires_before_its_digest_is_dead_not_digested(
    make_rig, smtp_server, clock
):
    """Held for a digest a window long, an event with a shorter expires_s must not reach
    anyone after it expired."""
    rig = make_rig(smtp_server, clock, smtp_rate_per_minute=1, smtp_rate_window_s=60)
    await rig.deliver(rig.event("first"), rig.event("short", expires_s=10),
                      rig.event("long", expires_s=600))  # fmt: skip
    assert rig.outcomes[-1].status == "held"
    clock.advance(61)
    assert await rig.run_digest()
    letters = await rig.dead()
    assert [(x["id"], x["reason"]) for x in letters] == [("short", "expired")]
    assert mail_ids(smtp_server.messages) == Counter({"first": 1, "long": 1})


async def test_late_marker_in_the_subject(make_rig, smtp_server, clock):
    rig = make_rig(smtp_server, clock)  # LATE_AFTER_S default 60
    await rig.deliver(rig.event("late", ts=T0 - 192.4, subject="止损触发 600519"),
                      rig.event("ontime", ts=T0 - 59, subject="on time"))  # fmt: skip
    subjects = [str(m.message["Subject"]) for m in smtp_server.messages]
    assert subjects == ["[DELAYED 3m12s] 止损触发 600519", "on time"]


async def test_late_marker_in_chinese_and_with_a_lower_threshold(make_rig, smtp_server, clock):
    rig = make_rig(smtp_server, clock, locale="zh", late_after_s=5)
    await rig.deliver(rig.event("late", ts=T0 - 192.4, severity="critical", subject="止损"),
                      rig.event("late2", ts=T0 - 6, subject="x"),
                      rig.event("ontime", ts=T0 - 4, subject="y"))  # fmt: skip
    subjects = [str(m.message["Subject"]) for m in smtp_server.messages]
    assert subjects == ["[延迟 3分12秒] [CRITICAL] 止损", "[延迟 6秒] x", "y"]


@pytest.mark.parametrize(
    ("seconds", "en", "zh"),
    [
        (0, "0s", "0秒"),
        (0.9, "0s", "0秒"),
        (59, "59s", "59秒"),
        (192.4, "3m12s", "3分12秒"),
        (3600, "1h", "1小时"),
        (3 * 3600 + 5, "3h5s", "3小时5秒"),
        (2 * 86400 + 3600 + 60, "2d1h1m", "2天1小时1分"),
    ],
)
def test_format_delay(seconds, en, zh):
    assert format_delay(seconds) == en
    assert format_delay(seconds, "zh") == zh
    assert delayed_prefix(seconds) == f"[DELAYED {en}]"
    assert delayed_prefix(seconds, "zh") == f"[延迟 {zh}]"


# ============================================================================ threading


def _local_ts(day: int, hour: int, minute: int = 0) -> float:
    return datetime(2026, 11, day, hour, minute).astimezone().timestamp()


def _compose(composer: Composer, **fields: Any) -> EmailMessage:
    ev = Event.model_validate({"subject": "s", **fields})
    msg = composer.compose(ev, event_id=fields.get("id", "e1"), recipients=[MAIL_TO])
    parsed = email.message_from_bytes(message_bytes(msg), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_one_thread_per_strategy_and_day():
    c = Composer(mail_from=MAIL_FROM)
    morning = _compose(c, id="e1", strategy="ma_cross", ts=_local_ts(25, 9, 30))
    evening = _compose(c, id="e2", strategy="ma_cross", ts=_local_ts(25, 23, 59))
    other = _compose(c, id="e3", strategy="grid_1", ts=_local_ts(25, 9, 30))
    next_day = _compose(c, id="e4", strategy="ma_cross", ts=_local_ts(26, 0, 1))
    root = morning["In-Reply-To"]
    assert root and root == morning["References"]
    assert root.endswith("@example.com>")
    assert (evening["In-Reply-To"], evening["References"]) == (root, root)
    assert other["In-Reply-To"] not in (None, root)
    assert next_day["In-Reply-To"] not in (None, root)
    assert other["References"] == other["In-Reply-To"]
    assert root not in {m["Message-ID"] for m in (morning, evening, other, next_day)}
    # a Chinese strategy name gives a valid (hashed) id, stable for the day
    zh1 = _compose(c, id="e5", strategy="均线 策略", ts=_local_ts(25, 10))
    zh2 = _compose(c, id="e6", strategy="均线 策略", ts=_local_ts(25, 11))
    assert zh1["In-Reply-To"] == zh2["In-Reply-To"]
    assert re.fullmatch(r"<[!-~]+@example\.com>", zh1["In-Reply-To"])


def test_threading_can_be_turned_off():
    msg = _compose(Composer(mail_from=MAIL_FROM, thread_by_day=False), strategy="s", ts=T0)
    assert msg["In-Reply-To"] is None and msg["References"] is None


def test_a_digest_of_one_strategy_joins_its_thread():
    c = Composer(mail_from=MAIL_FROM)
    evs = [(f"e{i}", Event.model_validate({"subject": f"s{i}", "strategy": "ma_cross",
                                          "ts": _local_ts(25, 9, i)})) for i in range(3)]  # fmt: skip
    digest = c.compose_digest(list(reversed(evs)), recipients=[MAIL_TO])
    single = _compose(c, strategy="ma_cross", ts=_local_ts(25, 15))
    assert digest["In-Reply-To"] == single["In-Reply-To"]
    assert digest["Subject"] == "[DIGEST] 3 alerts: 3 info · ma_cross"
    body = digest.get_body(("plain",))
    assert body is not None
    assert EVENT_ID_IN_DIGEST.findall(body.get_content()) == ["e0", "e1", "e2"]  # oldest first
    mixed = c.compose_digest([evs[0], ("x", Event.model_validate({"subject": "x",
                             "strategy": "grid_1"}))], recipients=[MAIL_TO])  # fmt: skip
    assert mixed["In-Reply-To"] is None


# ============================================================================ producer helpers


def _queued(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(x) for x in reversed(r.lrange(KEYS.queue, 0, -1))]


def test_dedup_and_expiry_fields_round_trip_on_the_wire(redis_url, r):
    with Notifier(redis_url) as n:
        n.send("s", dedup_key="ma:feed", dedup_window_s=120, expires_s=30.5)
        n.send("plain")
    first, second = _queued(r)
    assert (first["dedup_key"], first["dedup_window_s"], first["expires_s"]) == (
        "ma:feed", 120, 30.5,
    )  # fmt: skip
    ev = parse_event(json.dumps(first))
    assert (ev.dedup_key, ev.dedup_window_s, ev.expires_s) == ("ma:feed", 120.0, 30.5)
    assert not {"dedup_key", "dedup_window_s", "expires_s"} & set(second)


async def test_async_producer_sends_the_new_fields_and_error(redis_url, r):
    async with AsyncNotifier(redis_url) as n:
        await n.send("s", dedup_key="k", expires_s=5)
        await n.error("ma_cross", ValueError("bad price"))
        with pytest.raises(TypeError, match="dedup_windows"):
            await n.send("s", dedup_windows=3)
    first, second = _queued(r)
    assert (first["dedup_key"], first["expires_s"]) == ("k", 5)
    assert second["dedup_key"].startswith("error:ma_cross:")
    assert second["severity"] == "critical" and second["kind"] == "error"


def test_error_helper_with_an_exception(redis_url, r):
    def boom(symbol: str) -> None:
        raise ValueError(f"no price for {symbol}")

    with Notifier(redis_url) as n:
        for _ in range(2):
            try:
                boom("600519.SH")
            except ValueError as exc:
                n.error("ma_cross", exc)
        n.error("ma_cross", ValueError("no price for 000001.SZ"))
        n.error("grid_1", ValueError("no price for 600519.SH"))
        n.error("ma_cross", "plain text error", severity="warning", dedup_window_s=None)
    a, b, c, d, e = _queued(r)
    assert a["subject"] == "[ERROR] ValueError: no price for 600519.SH · ma_cross"
    assert (a["kind"], a["severity"], a["strategy"], a["dedup_window_s"]) == (
        "error", "critical", "ma_cross", 300,
    )  # fmt: skip
    assert a["body"].startswith("Traceback (most recent call last)")
    assert "in boom" in a["body"] and "ValueError: no price for 600519.SH" in a["body"]
    assert a["dedup_key"] == b["dedup_key"]  # the same error again: the same key
    assert a["id"] != b["id"]
    assert len({a["dedup_key"], c["dedup_key"], d["dedup_key"]}) == 3
    assert e["subject"] == "[ERROR] plain text error · ma_cross"
    assert (e["severity"], "body" in e, "dedup_window_s" in e) == ("warning", False, False)
    for x in (a, b, c, d, e):
        parse_event(json.dumps(x))  # all valid events


def test_unknown_keyword_fields_are_a_type_error(redis_url, r):
    with Notifier(redis_url) as n, pytest.raises(TypeError) as info:
        n.send("s", dedupkey="typo")
    assert "dedupkey" in str(info.value) and "dedup_key" in str(info.value)
    assert r.llen(KEYS.queue) == 0


@pytest.mark.parametrize(
    "raw",
    [
        '{"subject":"止损触发","strategy":"ma_cross"}',
        '{"v":1,"id":"x1","ts":1700000000,"kind":"fill","severity":"warning","data":{"p":1}}',
        '{"body":"old worker event","to":["trader@example.com"],"unknown_future_field":1}',
    ],
)
def test_old_events_without_the_new_fields_stay_valid(raw):
    ev = parse_event(raw)
    assert (ev.dedup_key, ev.dedup_window_s, ev.expires_s) == (None, None, None)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"dedup_key": ""}, "dedup_key"),
        ({"dedup_key": "a\nb"}, "dedup_key"),
        ({"dedup_window_s": 0}, "dedup_window_s"),
        ({"dedup_window_s": True}, "dedup_window_s"),
        ({"expires_s": -1}, "expires_s"),
        ({"expires_s": "60"}, "expires_s"),
    ],
)
def test_bad_new_fields_are_refused_with_the_field_named(fields, where):
    from producer.event import InvalidEvent

    with pytest.raises(InvalidEvent) as info:
        parse_event(json.dumps({"subject": "s", **fields}))
    assert where in info.value.reason


# ============================================================================ settings


@pytest.mark.parametrize(
    ("env", "per_minute", "window"),
    [
        ({}, 0, 60.0),
        ({"smtp_provider": "qq"}, 20, 60.0),
        ({"smtp_provider": "163"}, 15, 60.0),
        ({"smtp_provider": "qq", "smtp_rate_per_minute": 0}, 0, 60.0),
        ({"smtp_provider": "qq", "smtp_rate_per_minute": 5, "smtp_rate_window_s": 3}, 5, 3.0),
    ],
)
def test_rate_settings(env: dict[str, Any], per_minute: int, window: float):
    s = load_settings(**env)
    assert (s.smtp_rate_per_minute, s.smtp_rate_window_s) == (per_minute, window)


def test_trading_settings_from_the_environment(monkeypatch):
    defaults = load_settings()
    assert (defaults.locale, defaults.late_after_s, defaults.dedup_window_s) == ("en", 60, 300)
    assert defaults.thread_by_day is True
    for k, v in {"LOCALE": "zh", "LATE_AFTER_S": "30", "DEDUP_WINDOW_S": "600",
                 "THREAD_BY_DAY": "false", "SMTP_RATE_PER_MINUTE": "12",
                 "SMTP_RATE_WINDOW_S": "3"}.items():  # fmt: skip
        monkeypatch.setenv(f"NOTIFIER_{k}", v)
    s = load_settings()
    assert (s.locale, s.late_after_s, s.dedup_window_s, s.thread_by_day) == ("zh", 30, 600, False)
    assert (s.smtp_rate_per_minute, s.smtp_rate_window_s) == (12, 3.0)
