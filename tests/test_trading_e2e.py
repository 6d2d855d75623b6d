"""Trading fit (issue 6) end to end: ``notifier run`` subprocesses, the private redis-server
and aiosmtpd. A burst against the rate limit (digests, critical events not held), repeat
suppression, expiry and the late marker, in English and Chinese.

The rate window is shortened with NOTIFIER_SMTP_RATE_WINDOW_S so that a digest does not
wait a minute. The helpers come from tests/support/helpers.py.
"""

from __future__ import annotations

import re
import time
from collections import Counter

from producer import Notifier
from tests.support.helpers import (
    DIGEST_SUBJECT,
    counters,
    dead_letters,
    event,
    ids_in,
    is_digest,
    mail_ids,
    push,
    start_worker,
    text_of,
    unsettled,
    wait_delivered,
    wait_until,
)

# quick heartbeats (stats see account states within ~0.5 s), quick stop
QUICK = {"heartbeat_ttl_s": 2, "shutdown_grace_s": 2}


def max_in_window(times: list[float], window: float) -> int:
    """The largest number of ``times`` within any span of ``window`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# -- the burst ----------------------------------------------------------------------------------


def test_burst_of_100_against_10_per_window(redis_url, r, smtp_server, worker_env, worker_proc):
    window = 3.0
    env = worker_env(redis_url, smtp_server, smtp_rate_per_minute=10, smtp_rate_window_s=window,
                     concurrency=4, **QUICK)  # fmt: skip
    start_worker(worker_proc, env)
    critical = {f"b{i:03d}" for i in (25, 50, 75, 99)}
    kinds = ["signal", "signal", "fill", "order"]
    now = time.time()
    events = [
        event(f"b{i:03d}", ts=now + i * 1e-4, kind=kinds[i % 4], strategy="open_burst",
              severity="critical" if f"b{i:03d}" in critical else "info")
        for i in range(100)
    ]  # fmt: skip
    push(r, *events)
    all_ids = [e["id"] for e in events]
    wait_delivered(smtp_server, all_ids, timeout=15, digests=True)
    time.sleep(0.3)  # anything extra (a duplicate) would show up now
    messages = smtp_server.messages

    # every event in exactly one mail
    assert mail_ids(messages) == Counter({i: 1 for i in all_ids})
    digest_mails = [m for m in messages if is_digest(m)]
    single = [m for m in messages if not is_digest(m)]
    assert digest_mails, "the burst over the limit must produce a digest"
    # at most the allowed mails: 10 per window, critical ones come on top (never held)
    limited = [m.received_at for m in messages if not set(ids_in(m)) <= critical]
    assert max_in_window(limited, window - 0.1) <= 10
    assert len(single) == 10 + len(critical)
    assert len(digest_mails) <= 2
    assert {i for m in single for i in ids_in(m)} >= critical

    for d in digest_mails:
        listed = ids_in(d)
        m = DIGEST_SUBJECT.fullmatch(str(d.message["Subject"]))
        assert m is not None, d.message["Subject"]
        assert int(m[1]) == len(listed) == int(d.message["X-Notifier-Digest"])
        counts = Counter(events[int(i[1:])]["kind"] for i in listed)
        expected = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        assert m[2] == expected
        assert m[3] == "open_burst"
        assert listed == sorted(listed)  # oldest first (ts grows with the number)
        assert not set(listed) & critical

    # critical events: delivered at once; the digest a window later
    received = {i: m.received_at for m in messages for i in ids_in(m)}
    ts = {e["id"]: e["ts"] for e in events}
    critical_latency = max(received[i] - ts[i] for i in critical)
    digest_latency = min(received[i] - ts[i] for d in digest_mails for i in ids_in(d))
    assert critical_latency < 1.0
    assert digest_latency > window - 1.0 > critical_latency

    assert unsettled(r) == {}
    assert dead_letters(r) == []
    assert counters(r)["digested"] == sum(len(ids_in(d)) for d in digest_mails)


# -- suppression, expiry, late marker -------------------------------------------------------------


def test_suppression_expiry_and_late_marker(redis_url, r, smtp_factory, worker_env, worker_proc):
    smtp = smtp_factory()
    env = worker_env(redis_url, smtp, dedup_window_s=1.0, retry_base_s=30, retry_max_s=60,
                     **QUICK)  # fmt: skip
    start_worker(worker_proc, env)
    now = time.time()
    push(r, event("late", ts=now - 192.2, subject="止损触发 600519"),
         event("stale", ts=now - 120, expires_s=60), event("k1", dedup_key="feed"))  # fmt: skip
    wait_delivered(smtp, ["late", "k1"], 5, digests=True)
    with Notifier(redis_url) as n:
        for _ in range(3):
            n.send("feed down again", dedup_key="feed")
        for _ in range(4):
            try:
                raise TimeoutError("行情超时")
            except TimeoutError as exc:
                n.error("ma_cross", exc, dedup_window_s=1.0)
    wait_until(lambda: r.hget("notifier:counters", "suppressed") == b"6", 5, "6 suppressed")
    time.sleep(1.2)  # both windows are over
    smtp.fail_next("DATA", 451, "4.3.0 try again later")
    push(r, event("doomed", expires_s=2))  # the retry would come 3 to 30 s later
    wait_until(lambda: len(dead_letters(r)) == 2, 5, "two dead letters")
    push(r, event("k2", dedup_key="feed"))
    with Notifier(redis_url) as n:
        last_error = n.error("ma_cross", TimeoutError("行情超时"), dedup_window_s=1.0)
    wait_delivered(smtp, ["k2", last_error], 5, digests=True)

    by_id = {str(m.message["X-Notifier-Event-Id"]): m for m in smtp.messages}
    assert by_id["late"].message["Subject"] == "[DELAYED 3m12s] 止损触发 600519"
    assert by_id["k1"].message["Subject"] == "alert k1"
    assert "repeated" not in text_of(by_id["k1"])
    assert re.search(r">> repeated 3× in [1-9] s", text_of(by_id["k2"]))
    assert re.search(r">> repeated 3× in [1-9] s", text_of(by_id[last_error]))
    errors = [m for m in smtp.messages if m.message["X-Notifier-Strategy"] == "ma_cross"]
    assert len(errors) == 2  # the first of four, then the one after the window
    assert "Traceback" in text_of(errors[0]) and "TimeoutError: 行情超时" in text_of(errors[0])
    assert set(by_id) == {"late", "k1", "k2", errors[0].message["X-Notifier-Event-Id"],
                          last_error}  # fmt: skip
    letters = {x["id"]: x for x in dead_letters(r)}
    assert {k: v["reason"] for k, v in letters.items()} == {"stale": "expired", "doomed": "expired"}
    assert "would pass before the next attempt" in letters["doomed"]["error"]
    assert unsettled(r) == {}


def test_chinese_locale(redis_url, r, smtp_server, worker_env, worker_proc):
    env = worker_env(redis_url, smtp_server, locale="zh", dedup_window_s=1.0, **QUICK)
    start_worker(worker_proc, env)
    now = time.time()
    push(r, event("late", ts=now - 192.2, subject="止损触发 600519"), event("k1", dedup_key="k"))
    # k1 opened the window (lanes run in parallel)
    wait_delivered(smtp_server, ["late", "k1"], 5, digests=True)
    push(r, event("k2", dedup_key="k"), event("k3", dedup_key="k"))
    wait_until(lambda: r.hget("notifier:counters", "suppressed") == b"2", 5, "2 suppressed")
    time.sleep(1.2)
    push(r, event("k4", dedup_key="k"))
    wait_delivered(smtp_server, ["k4"], 5, digests=True)
    by_id = {str(m.message["X-Notifier-Event-Id"]): m for m in smtp_server.messages}
    assert set(by_id) == {"late", "k1", "k4"}
    assert by_id["late"].message["Subject"] == "[延迟 3分12秒] 止损触发 600519"
    assert re.search(r"此前 [1-9] 秒内重复 2 次（已合并）", text_of(by_id["k4"]))
