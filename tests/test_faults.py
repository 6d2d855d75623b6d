"""Faults against real ``notifier run`` subprocesses, a real redis-server and the test SMTP server.

Each test pushes events with LPUSH (as ``redis-cli`` would), injects a fault, and checks what
the SMTP server received (one ``X-Notifier-Event-Id`` per delivery) and what Redis holds.
The helpers come from tests/support/helpers.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.support.helpers import (
    DEAD,
    EMPTY,
    PREFIX,
    QQ_535,
    QQ_THROTTLE,
    QUEUE,
    RETRY,
    counters,
    dead_letters,
    delivered,
    event,
    kill9_holding,
    leftovers,
    log_of,
    processing_of,
    push,
    rclient,
    run_cli,
    slow_down,
    wait_delivered,
    wait_for_log,
    wait_until,
)
from worker.settings import Settings

# Fast retries so that a test sees several attempts in a second.
FAST = {"retry_base_s": 0.05, "retry_max_s": 0.5, "heartbeat_ttl_s": 3}


# -- retries, dead letters --------------------------------------------------------------


def test_451_twice_then_delivered_once_with_attempts_visible(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    smtp_server.fail_next("DATA", 451, "4.3.0 try again later", count=2)
    push(r, event("t451"))
    proc = worker_proc(worker_env(redis_url, smtp_server, **FAST))

    wait_delivered(smtp_server, ["t451"], 15)
    wait_until(lambda: r.exists(f"{PREFIX}:sent:t451"), 5, "the sent mark")
    time.sleep(0.3)  # a second copy would arrive now
    assert delivered(smtp_server) == {"t451": 1}
    assert smtp_server.transactions == 3
    c = counters(r)
    assert c.get("delivered") == 1 and c.get("retried:transient") == 2, c
    log = log_of(proc)
    assert "retry t451" in log and "attempt 1 of 8" in log and "attempt 2 of 8" in log, log
    records = [json.loads(x) for x in r.lrange(f"{PREFIX}:deliveries", 0, -1)]
    assert [x["o"] for x in records if x["id"] == "t451"] == ["sent", "retry", "retry"]
    assert leftovers(r) == EMPTY and dead_letters(r) == []


@pytest.mark.parametrize(
    ("stage", "code", "text"),
    [("RCPT", 550, "5.1.1 Mailbox unavailable"), ("DATA", 554, "5.7.1 Message rejected as spam")],
)
def test_permanent_reply_is_dead_lettered_at_once_and_can_be_replayed(
    worker_proc, worker_env, smtp_server, redis_url, stage, code, text
):
    r = rclient(redis_url)
    smtp_server.fail_next(stage, code, text)
    original = event("perm-1", body="价格 3012.5")
    push(r, original)
    env = worker_env(redis_url, smtp_server, **FAST)
    proc = worker_proc(env)

    wait_until(lambda: r.llen(DEAD) == 1, 10, "the dead letter")
    [letter] = dead_letters(r)
    assert letter["id"] == "perm-1"
    assert letter["reason"] == "permanent"
    assert str(code) in letter["error"] and text in letter["error"]
    assert letter["attempts"] == 1
    assert json.loads(letter["event"]) == original  # the original text, unchanged
    assert smtp_server.transactions == 1  # not retried
    assert delivered(smtp_server) == {}
    assert leftovers(r) == EMPTY
    assert "dead letter perm-1 (permanent)" in log_of(proc)

    rc, out = run_cli(worker_proc, env, "dead", "list")
    assert rc == 0 and "perm-1" in out and "[permanent]" in out and text in out, out
    rc, out = run_cli(worker_proc, env, "dead", "replay", "--id", "perm-1")
    assert rc == 0 and "replayed 1" in out, out
    wait_delivered(smtp_server, ["perm-1"], 10)
    assert r.llen(DEAD) == 0
    assert delivered(smtp_server) == {"perm-1": 1}


def test_always_451_is_dead_after_max_attempts(worker_proc, worker_env, smtp_server, redis_url):
    r = rclient(redis_url)
    smtp_server.set_random_faults(1.0, 451, "4.3.0 try again later")
    push(r, event("never"))
    worker_proc(worker_env(redis_url, smtp_server, max_attempts=3, **FAST))

    wait_until(lambda: r.llen(DEAD) == 1, 15, "the dead letter")
    [letter] = dead_letters(r)
    assert letter["reason"] == "exhausted"
    assert letter["attempts"] == 3
    assert "451" in letter["error"] and "try again later" in letter["error"]
    assert smtp_server.transactions == 3
    assert delivered(smtp_server) == {}
    assert leftovers(r) == EMPTY


def test_qq_frequency_limited_is_throttled_and_never_dead_for_that(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    # More refusals than MAX_ATTEMPTS: throttling alone must not use up the attempts.
    smtp_server.fail_next("DATA", 550, QQ_THROTTLE, count=5)
    push(r, event("qq-busy"))
    proc = worker_proc(
        worker_env(redis_url, smtp_server, max_attempts=2, throttle_base_s=0.05, **FAST)
    )

    wait_delivered(smtp_server, ["qq-busy"], 15)
    time.sleep(0.2)
    assert delivered(smtp_server) == {"qq-busy": 1}
    assert dead_letters(r) == []
    c = counters(r)
    assert smtp_server.failed == 5
    assert c.get("retried:throttled", 0) >= 5 and "retried:transient" not in c, c
    assert "throttled" in log_of(proc)
    assert leftovers(r) == EMPTY


def test_dropped_connections_are_retried_and_delivered(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    smtp_server.drop_next(4)
    ids = [f"drop-{i}" for i in range(8)]
    push(r, *(event(i) for i in ids))
    worker_proc(worker_env(redis_url, smtp_server, **FAST))

    wait_delivered(smtp_server, ids, 15)
    time.sleep(0.2)
    assert smtp_server.dropped == 4
    assert delivered(smtp_server) == dict.fromkeys(ids, 1)
    assert dead_letters(r) == [] and leftovers(r) == EMPTY


# -- configuration errors --------------------------------------------------------------


@pytest.mark.slow
def test_auth_failure_keeps_events_queued_says_why_and_resumes_by_itself(
    worker_proc, worker_env, smtp_factory, redis_url
):
    user, password = "12345@qq.com", "abcdefghijklmnop"
    smtp = smtp_factory(auth={user: password})
    smtp.auth_fail(535, QQ_535)
    r = rclient(redis_url)
    env = worker_env(redis_url, smtp, smtp_provider="qq", **FAST)
    ids = [f"auth-{i}" for i in range(3)]
    push(r, *(event(i) for i in ids))
    proc = worker_proc(env)

    log = wait_for_log(proc, "授权码")
    assert "535" in log
    time.sleep(1.0)
    # Not burnt: not dead, not retried, still waiting in the queue.
    assert r.llen(QUEUE) == 3, leftovers(r)
    assert dead_letters(r) == [] and r.zcard(RETRY) == 0
    assert not any(k.startswith("retried") for k in counters(r))
    assert smtp.messages == [] and smtp.transactions == 0

    rc, out = run_cli(worker_proc, env, "check")
    assert rc == 1, out
    assert "授权码" in out and "535" in out and "configuration" in out, out

    smtp.auth_fail(None)  # the user fixed the mailbox settings; no restart
    wait_delivered(smtp, ids, 20)
    assert proc.poll() is None
    assert delivered(smtp) == dict.fromkeys(ids, 1)

    assert "resuming" in log_of(proc)

    # A password that stops working while the worker runs: the same, mid-run.
    mark = len(log_of(proc))
    smtp.auth_fail(535, QQ_535)
    smtp.stop()  # drop the warm (already authenticated) connections
    smtp.start()
    later = [f"auth-late-{i}" for i in range(3)]
    push(r, *(event(i) for i in later))
    wait_until(lambda: "授权码" in log_of(proc)[mark:], 10, "the second auth failure logged")
    time.sleep(0.5)
    assert dead_letters(r) == [] and r.zcard(RETRY) == 0
    assert sum(leftovers(r).values()) == 3, leftovers(r)
    assert delivered(smtp) == dict.fromkeys(ids, 1)
    smtp.auth_fail(None)
    resumed = wait_delivered(smtp, later, 30)
    assert delivered(smtp) == dict.fromkeys(ids + later, 1)
    # One incident, seen by every lane at once, is one failed login: the first pause
    # (5 s) applies, not one doubling per lane that noticed it.
    assert resumed <= 8.0, (
        f"delivery resumed {resumed:.1f} s after the login worked again; the log shows the "
        "pause growing once per lane:\n"
        + "\n".join(x for x in log_of(proc)[mark:].splitlines() if "paused for" in x)
    )
    assert proc.poll() is None and leftovers(r) == EMPTY


def test_tls_certificate_failure_pauses_and_keeps_events_queued(
    worker_proc, worker_env, smtp_factory, redis_url
):
    smtp = smtp_factory(tls="ssl")
    r = rclient(redis_url)
    # Without the test CA the server's certificate cannot be verified.
    env = worker_env(redis_url, smtp, NOTIFIER_SMTP_CA_FILE=None, **FAST)
    push(r, event("tls-1"), event("tls-2"))
    proc = worker_proc(env)
    log = wait_for_log(proc, "paused")
    assert "TLS" in log and "certificate" in log.lower(), log
    time.sleep(1.0)
    assert r.llen(QUEUE) == 2, leftovers(r)
    assert dead_letters(r) == [] and r.zcard(RETRY) == 0
    assert smtp.messages == []
    rc, out = run_cli(worker_proc, env, "check")
    assert rc == 1 and "configuration" in out and "TLS" in out, out
    assert proc.poll() is None


# -- outages ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smtp_down_for_60_s_events_wait_in_retry_and_flow_when_it_returns(
    worker_proc, worker_env, smtp_server, redis_url
):
    """The issue's "SMTP server down for 60 s", on the default retry settings scaled 1/20.

    RETRY_BASE_S, RETRY_MAX_S and MAX_ATTEMPTS are the defaults with every duration scaled
    by the same factor (so the back-off sequence is the same); the server is away for
    60 s x 1/20. Events pushed meanwhile wait in the retry set with their attempt count and
    last error, nothing is dead-lettered, and everything flows when the server returns.
    """
    scale = 1 / 20
    fields = Settings.model_fields
    r = rclient(redis_url)
    env = worker_env(
        redis_url,
        smtp_server,
        retry_base_s=fields["retry_base_s"].default * scale,
        retry_max_s=fields["retry_max_s"].default * scale,
        max_attempts=fields["max_attempts"].default,
        heartbeat_ttl_s=3,
    )
    proc = worker_proc(env)
    wait_for_log(proc, "started")
    smtp_server.stop()
    down_at = time.monotonic()
    ids = [f"outage-{i:02d}" for i in range(12)]
    push(r, *(event(i) for i in ids))

    waiting: list[dict] = []

    def in_retry() -> bool:
        """Events deferred because every account is down carry attempt 0 (not burnt); those
        that tried the server carry 1 or more, and may be in flight again at any instant:
        wait for a look at the set that holds one of those too."""
        waiting[:] = [json.loads(x) for x in r.zrange(RETRY, 0, -1)]
        return len(waiting) >= 6 and any(ev["_meta"]["attempts"] >= 1 for ev in waiting)

    wait_until(in_retry, 60 * scale, "events waiting in the retry set, one after a failed try")
    # The attempt count and the last error travel with the event.
    assert all(ev["_meta"]["last_error"] for ev in waiting), waiting
    assert any(ev["_meta"]["attempts"] >= 1 for ev in waiting), waiting
    time.sleep(max(0.0, 60 * scale - (time.monotonic() - down_at)))
    assert proc.poll() is None
    outage = time.monotonic() - down_at
    smtp_server.start()

    def settled() -> bool:
        dead = {x["id"] for x in dead_letters(r)}
        return set(ids) <= dead | set(delivered(smtp_server))

    back = wait_until(settled, 40, "every event delivered or dead")
    letters = dead_letters(r)
    print(f"SMTP outage {60 * scale:.1f} s: {len(letters)} of {len(ids)} events dead-lettered "
          f"{sorted({(x['reason'], x['attempts']) for x in letters})}; all settled "
          f"{back:.1f} s after the server returned")  # fmt: skip
    assert letters == [], "events were dead-lettered while the SMTP server was unreachable"
    time.sleep(0.2)
    assert delivered(smtp_server) == dict.fromkeys(ids, 1)
    wait_until(lambda: leftovers(r) == EMPTY, 5, "empty queue, retry and processing")
    # A back-off that doubles per failed probe never waits much longer than the server has
    # been away: the events flow soon after it returns (here within 2 x outage + 2 s).
    assert back <= 2 * outage + 2, (
        f"events flowed {back:.1f} s after a {outage:.1f} s outage ended: the back-off grew "
        "faster than once per failed probe"
    )


@pytest.mark.slow
def test_redis_restart_mid_run_worker_survives_and_nothing_is_lost(
    worker_proc, worker_env, smtp_server, redis_factory
):
    server = redis_factory(appendonly=True)
    r = rclient(server.url)
    # Some transactions fail, so events sit in retry and processing when Redis goes.
    smtp_server.set_random_faults(0.3, 451, "4.3.0 try again later", seed=7)
    slow_down(smtp_server, 0.02)
    proc = worker_proc(worker_env(server.url, smtp_server, max_attempts=40, **FAST))
    first = [f"rr-a{i}" for i in range(60)]
    push(r, *(event(i) for i in first))
    wait_until(lambda: len(delivered(smtp_server)) >= 15, 15, "the first deliveries")

    server.kill()  # a crash: only what appendfsync-always wrote survives (everything acked)
    r.close()
    # An outage longer than the back-off cap (5 s: the guard's waits 0.2, 0.4 ... 5 s have
    # reached it after 11.2 s) and than the heartbeat TTL (3 s): every heartbeat expired.
    time.sleep(12.0)
    assert proc.poll() is None, log_of(proc)
    assert "Redis unreachable" in log_of(proc)

    server.start()  # same port, same directory
    r = rclient(server.url)
    second = [f"rr-b{i}" for i in range(20)]
    push(r, *(event(i) for i in second))
    wait_delivered(smtp_server, first + second, 30)
    wait_until(lambda: leftovers(r) == EMPTY, 10, "empty queue, retry and processing")
    time.sleep(0.2)
    got = delivered(smtp_server)
    assert set(got) == set(first + second)
    assert all(n == 1 for n in got.values()), {k: n for k, n in got.items() if n > 1}
    assert dead_letters(r) == []
    log = log_of(proc)
    assert "Redis reachable again" in log, log
    assert proc.poll() is None


# -- crashes and stops ------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_in_flight_events_are_delivered_by_another_worker_within_15_s(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    slow_down(smtp_server, 0.1)  # events stay in flight long enough to be caught there
    env = worker_env(redis_url, smtp_server, **FAST)
    victim = worker_proc(env | {"NOTIFIER_WORKER_ID": "victim"})
    worker_proc(env | {"NOTIFIER_WORKER_ID": "survivor"})
    ids = [f"k9-{i:03d}" for i in range(100)]
    push(r, *(event(i) for i in ids))

    wait_until(lambda: len(processing_of(r, "victim")) >= 3, 10, "events in flight")
    killed_at, in_flight = kill9_holding(r, victim, "victim")
    assert in_flight, "the victim held no events when it was killed"

    wait_delivered(smtp_server, in_flight, 15)
    recovered_at = max(
        m.received_at
        for m in smtp_server.messages
        if m.message["X-Notifier-Event-Id"] in in_flight and m.received_at > killed_at
    )
    recovery = recovered_at - killed_at
    print(
        f"kill -9 with {len(in_flight)} in flight: recovered by another worker in {recovery:.2f} s"
    )
    assert recovery <= 15
    assert "victim" in log_of(worker_proc.procs[1]), "the survivor should say whose events it took"

    wait_delivered(smtp_server, ids, 20)
    wait_until(lambda: leftovers(r) == EMPTY, 10, "empty queue, retry and processing")
    got = delivered(smtp_server)
    duplicates = sum(n - 1 for n in got.values())
    assert duplicates <= len(in_flight)
    assert dead_letters(r) == []


def test_kill_9_then_restart_with_the_same_id_takes_its_events_back_at_once(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    slow_down(smtp_server, 0.1)
    env = worker_env(redis_url, smtp_server, **FAST) | {"NOTIFIER_WORKER_ID": "phoenix"}
    first = worker_proc(env)
    ids = [f"ph-{i:02d}" for i in range(30)]
    push(r, *(event(i) for i in ids))
    wait_until(lambda: len(processing_of(r, "phoenix")) >= 3, 10, "events in flight")
    killed_at, in_flight = kill9_holding(r, first, "phoenix")
    assert in_flight

    second = worker_proc(env)
    wait_delivered(smtp_server, in_flight, 15)
    recovery = time.time() - killed_at
    print(f"restart with the same id: {len(in_flight)} in-flight event(s) back in {recovery:.2f} s")
    # Without waiting for its own heartbeat to expire (3 s here).
    assert recovery < 3.0
    assert "recovered" in log_of(second)
    wait_delivered(smtp_server, ids, 15)
    wait_until(lambda: leftovers(r) == EMPTY, 10, "empty queue, retry and processing")
    assert dead_letters(r) == []


@pytest.mark.slow
def test_graceful_stop_under_load_exits_0_and_loses_or_repeats_nothing(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    slow_down(smtp_server, 0.02)
    env = worker_env(redis_url, smtp_server, **FAST)
    proc = worker_proc(env)
    ids = [f"gs-{i:03d}" for i in range(200)]
    push(r, *(event(i) for i in ids))

    wait_until(lambda: len(smtp_server.messages) >= 40, 15, "deliveries under way")
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    rc = proc.wait(timeout=15)
    stop_s = time.monotonic() - started
    assert rc == 0, log_of(proc)
    assert "stopping" in log_of(proc)
    before = delivered(smtp_server)
    print(f"SIGTERM under load: exit {rc} in {stop_s:.2f} s, {len(before)} of 200 delivered")
    assert 0 < len(before) < len(ids), "the stop must land while events flow"
    # Everything unsent is back in the queue; every delivered one is acknowledged.
    assert leftovers(r) == {"queue": len(ids) - len(before), "retry": 0, "processing": 0}
    assert all(r.exists(f"{PREFIX}:sent:{i}") for i in before)

    worker_proc(env)
    wait_delivered(smtp_server, ids, 20)
    wait_until(lambda: leftovers(r) == EMPTY, 10, "empty queue, retry and processing")
    time.sleep(0.2)
    assert delivered(smtp_server) == dict.fromkeys(ids, 1)
    assert dead_letters(r) == []


def test_several_workers_never_send_one_event_twice(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    env = worker_env(redis_url, smtp_server, **FAST)
    procs = [worker_proc(env) for _ in range(3)]
    for p in procs:
        wait_for_log(p, "started")
    ids = [f"multi-{i:03d}" for i in range(300)]
    push(r, *(event(i) for i in ids))

    wait_delivered(smtp_server, ids, 30)
    wait_until(lambda: leftovers(r) == EMPTY, 10, "empty queue, retry and processing")
    time.sleep(0.3)
    got = delivered(smtp_server)
    assert got == dict.fromkeys(ids, 1), {k: n for k, n in got.items() if n > 1}
    assert len({m.message["Message-ID"] for m in smtp_server.messages}) == len(ids)
    senders = sum(1 for p in procs if " sent multi-" in log_of(p))
    assert senders >= 2, "the workers should share the load"
    assert all(p.poll() is None for p in procs)


def test_graceful_stop_cancels_sends_that_outlast_the_grace_period(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    slow_down(smtp_server, 4.0, "MAIL")  # every send hangs longer than the grace period
    env = worker_env(redis_url, smtp_server, shutdown_grace_s=0.5, **FAST)
    proc = worker_proc(env | {"NOTIFIER_WORKER_ID": "patient"})
    ids = [f"gc-{i}" for i in range(6)]
    push(r, *(event(i) for i in ids))
    wait_until(lambda: len(processing_of(r, "patient")) >= 4, 10, "sends in flight")

    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    rc = proc.wait(timeout=15)
    stop_s = time.monotonic() - started
    assert rc == 0, log_of(proc)
    assert stop_s < 4.0, f"took {stop_s:.1f} s: the grace period is 0.5 s"
    # Nothing was sent; everything is back in the queue, nothing in processing or retry.
    assert leftovers(r) == {"queue": len(ids), "retry": 0, "processing": 0}
    assert dead_letters(r) == []

    del smtp_server._handler.handle_MAIL  # the server is fast again (for new connections)
    worker_proc(env)
    wait_delivered(smtp_server, ids, 15)
    time.sleep(0.2)
    assert delivered(smtp_server) == dict.fromkeys(ids, 1)


def test_sigterm_during_a_redis_outage_exits_within_the_stop_timeout(
    worker_proc, worker_env, smtp_server, redis_factory
):
    server = redis_factory(appendonly=True)
    r = rclient(server.url)
    slow_down(smtp_server, 0.05, "MAIL")
    env = worker_env(server.url, smtp_server, shutdown_grace_s=2, **FAST)
    proc = worker_proc(env)
    ids = [f"so-{i:03d}" for i in range(200)]
    push(r, *(event(i) for i in ids))
    wait_until(lambda: len(smtp_server.messages) >= 10, 10, "deliveries under way")
    server.kill()
    r.close()
    wait_for_log(proc, "Redis unreachable")

    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    stop_s = time.monotonic() - started
    print(f"SIGTERM while Redis is down: exit {rc} after {stop_s:.1f} s")
    # Within grace (2 s) + the bounded clean-up, far below systemd's TimeoutStopSec=45.
    assert rc == 0 and stop_s < 15, (rc, stop_s, log_of(proc)[-3000:])

    server.start()
    r = rclient(server.url)
    worker_proc(env)
    wait_delivered(smtp_server, ids, 30)
    wait_until(lambda: leftovers(r) == EMPTY, 10, "empty queue, retry and processing")
    got = delivered(smtp_server)
    assert sum(n - 1 for n in got.values()) <= 4, "at most the sends in flight at the stop"


def test_worker_started_before_redis_waits_for_it(
    worker_proc, worker_env, smtp_server, redis_factory
):
    server = redis_factory()
    url = server.url
    server.stop()
    proc = worker_proc(worker_env(url, smtp_server, **FAST))
    wait_for_log(proc, "Redis unreachable")
    time.sleep(1.0)
    assert proc.poll() is None, log_of(proc)
    server.start()
    r = rclient(url)
    push(r, event("late-redis"))
    wait_delivered(smtp_server, ["late-redis"], 15)
    assert proc.poll() is None


def test_a_repeat_of_a_delivered_id_is_not_sent_again(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    worker_proc(worker_env(redis_url, smtp_server, **FAST))
    push(r, event("once"))
    wait_delivered(smtp_server, ["once"], 10)
    wait_until(lambda: r.exists(f"{PREFIX}:sent:once"), 5, "the sent mark")
    push(r, event("once", subject="the same id again"), event("other"))
    wait_delivered(smtp_server, ["other"], 10)
    wait_until(lambda: leftovers(r) == EMPTY, 5, "empty queue")
    time.sleep(0.2)
    assert delivered(smtp_server) == {"once": 1, "other": 1}
    assert counters(r).get("duplicates_skipped") == 1


def test_two_copies_of_one_id_pushed_together_are_sent_once(
    worker_proc, worker_env, smtp_server, redis_url
):
    """A strategy whose LPUSH timed out (the client gives up after 0.5 s) cannot know
    whether the event was queued, so it sends it again with the same id: that is what
    the id is for. The two copies sit side by side in the queue, one fetch takes both,
    and two lanes must not both send them."""
    r = rclient(redis_url)
    proc = worker_proc(worker_env(redis_url, smtp_server, **FAST))
    wait_for_log(proc, "started")
    for n in range(5):
        copy = event(f"twice-{n}")
        push(r, copy, copy)
    ids = [f"twice-{n}" for n in range(5)]
    wait_delivered(smtp_server, ids, 10)
    wait_until(lambda: leftovers(r) == EMPTY, 5, "empty queue, retry and processing")
    time.sleep(0.3)
    got = delivered(smtp_server)
    assert got == dict.fromkeys(ids, 1), {i: n for i, n in got.items() if n > 1}
