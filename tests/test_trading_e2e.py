"""Trading fit (issue 6) end to end: ``notifier run`` subprocesses, the private redis-server
and aiosmtpd. A burst against the rate limit (digests, critical events not held), repeat
suppression, expiry and the late marker, in English and Chinese.

The rate window is shortened with NOTIFIER_SMTP_RATE_WINDOW_S so that a digest does not
wait a minute. The helpers at the top are shared with test_routing.py and test_failover.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Notifier
from tests.support.smtp_server import Received, SMTPTestServer

PREFIX = "notifier"
QUEUE = f"{PREFIX}:queue"
DEAD = f"{PREFIX}:dead"
EVENT_ID_IN_DIGEST = re.compile(r"\(event ([!-~]+?)\)")
DIGEST_SUBJECT = re.compile(r"\[DIGEST\] (\d+) alerts: (.+?)(?: · (.+))?")
START_TIMEOUT_S = 20.0
# quick heartbeats (stats see account states within ~0.5 s), quick stop
QUICK = {"heartbeat_ttl_s": 2, "shutdown_grace_s": 2}


# -- helpers (shared) ---------------------------------------------------------------------------


def log_of(proc: subprocess.Popen[bytes]) -> str:
    path: Path = proc.log_path  # type: ignore[attr-defined]
    return path.read_text("utf-8", "replace") if path.exists() else ""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll until ``predicate()`` is truthy; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def wait_started(proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S) -> str:
    """Wait until the worker logs that it started (after its SMTP warm-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_of(proc)
        if " started: " in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode} before starting:\n{text}")
        time.sleep(0.02)
    pytest.fail(f"worker did not start within {timeout} s:\n{log_of(proc)}")


def start_worker(worker_proc: Any, env: dict[str, str], dotenv: str | None = None) -> Any:
    """``notifier run`` with ``env``; ``dotenv`` is written to its working directory's .env."""
    if dotenv is not None:
        cwd = worker_proc.tmp_path / f"worker-{len(worker_proc.procs) + 1}"
        cwd.mkdir(parents=True, exist_ok=True)
        (cwd / ".env").write_text(dotenv, encoding="utf-8")
    proc = worker_proc(env)
    wait_started(proc)
    return proc


def run_cli(
    worker_proc: Any, env: dict[str, str], *args: str, timeout: float = 30
) -> tuple[int, str]:
    """``python -m worker ARGS`` (the ``notifier`` command): exit code and output."""
    proc = worker_proc.spawn([sys.executable, "-m", "worker", *args], env)
    rc = proc.wait(timeout=timeout)
    return rc, log_of(proc)


def event(event_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": event_id, "subject": f"alert {event_id}", "ts": time.time(), **fields}


def push(r: redis.Redis, *events: dict[str, Any]) -> None:
    """LPUSH every event in one pipeline (as fast as a burst of strategies can)."""
    pipe = r.pipeline(transaction=False)
    for ev in events:
        pipe.lpush(QUEUE, json.dumps(ev, ensure_ascii=False))
    pipe.execute()


def text_of(received: Received) -> str:
    plain = received.message.get_body(("plain",))
    assert plain is not None
    return str(plain.get_content())


def is_digest(received: Received) -> bool:
    return received.message["X-Notifier-Digest"] is not None


def ids_in(received: Received) -> list[str]:
    if is_digest(received):
        return EVENT_ID_IN_DIGEST.findall(text_of(received))
    return [str(received.message["X-Notifier-Event-Id"])]


def mail_ids(messages: Iterable[Received]) -> Counter[str]:
    """Event id -> how many mails carried it (individually or listed in a digest)."""
    seen: Counter[str] = Counter()
    for m in messages:
        seen.update(ids_in(m))
    return seen


def wait_ids(smtp: SMTPTestServer, ids: Iterable[str], timeout: float) -> float:
    wanted = set(ids)
    try:
        return wait_until(lambda: wanted <= set(mail_ids(smtp.messages)), timeout,
                          f"{len(wanted)} events delivered")  # fmt: skip
    except AssertionError:
        missing = sorted(wanted - set(mail_ids(smtp.messages)))
        raise AssertionError(f"not delivered within {timeout} s: {missing[:10]} "
                             f"({len(missing)} of {len(wanted)})") from None  # fmt: skip


def dead_letters(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(x) for x in r.lrange(DEAD, 0, -1)]


def leftovers(r: redis.Redis) -> dict[str, int]:
    """Events not settled: queue, retry, processing, held for a digest, digest groups."""
    out = {"queue": r.llen(QUEUE), "retry": r.zcard(f"{PREFIX}:retry"),
           "digests": r.zcard(f"{PREFIX}:digests")}  # fmt: skip
    for pattern in (f"{PREFIX}:processing:*", f"{PREFIX}:held:*"):
        for key in r.scan_iter(pattern):
            out[key.decode()] = r.llen(key)
    return {k: v for k, v in out.items() if v}


def max_in_window(times: list[float], window: float) -> int:
    """The largest number of ``times`` within any span of ``window`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.fixture
def r(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


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
    wait_ids(smtp_server, all_ids, timeout=15)
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

    assert leftovers(r) == {}
    assert dead_letters(r) == []
    counters = {k.decode(): int(v) for k, v in r.hgetall(f"{PREFIX}:counters").items()}
    assert counters["digested"] == sum(len(ids_in(d)) for d in digest_mails)


# -- suppression, expiry, late marker -------------------------------------------------------------


def test_suppression_expiry_and_late_marker(redis_url, r, smtp_factory, worker_env, worker_proc):
    smtp = smtp_factory()
    env = worker_env(redis_url, smtp, dedup_window_s=1.0, retry_base_s=30, retry_max_s=60,
                     **QUICK)  # fmt: skip
    start_worker(worker_proc, env)
    now = time.time()
    push(r, event("late", ts=now - 192.2, subject="止损触发 600519"),
         event("stale", ts=now - 120, expires_s=60), event("k1", dedup_key="feed"))  # fmt: skip
    wait_ids(smtp, ["late", "k1"], 5)
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
    wait_ids(smtp, ["k2", last_error], 5)

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
    assert leftovers(r) == {}


def test_chinese_locale(redis_url, r, smtp_server, worker_env, worker_proc):
    env = worker_env(redis_url, smtp_server, locale="zh", dedup_window_s=1.0, **QUICK)
    start_worker(worker_proc, env)
    now = time.time()
    push(r, event("late", ts=now - 192.2, subject="止损触发 600519"), event("k1", dedup_key="k"))
    wait_ids(smtp_server, ["late", "k1"], 5)  # k1 opened the window (lanes run in parallel)
    push(r, event("k2", dedup_key="k"), event("k3", dedup_key="k"))
    wait_until(lambda: r.hget("notifier:counters", "suppressed") == b"2", 5, "2 suppressed")
    time.sleep(1.2)
    push(r, event("k4", dedup_key="k"))
    wait_ids(smtp_server, ["k4"], 5)
    by_id = {str(m.message["X-Notifier-Event-Id"]): m for m in smtp_server.messages}
    assert set(by_id) == {"late", "k1", "k4"}
    assert by_id["late"].message["Subject"] == "[延迟 3分12秒] 止损触发 600519"
    assert re.search(r"此前 [1-9] 秒内重复 2 次（已合并）", text_of(by_id["k4"]))
