"""Start-up and stop at the edges, the pause flag, fencing, slow digests and a mismatched key
prefix (issue 9), against real ``notifier run`` processes, redis-server and SMTP servers."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest

from tests.support.helpers import (
    PREFIX,
    QQ_535,
    delivered,
    event,
    log_of,
    mail_ids,
    push,
    rclient,
    wait_delivered,
    wait_for_log,
)

FAST = {"retry_base_s": 0.05, "retry_max_s": 0.5, "heartbeat_ttl_s": 3}


def _stop_within(proc: subprocess.Popen[bytes], sig: signal.Signals, limit_s: float) -> float:
    proc.send_signal(sig)
    started = time.monotonic()
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - started
    assert rc == 0 and took < limit_s, (rc, took, log_of(proc)[-2000:])
    return took


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_waiting_for_redis_at_start_up_ends_the_worker_within_a_second(
    worker_proc, worker_env, smtp_server, refused_redis_url, sig
):
    proc = worker_proc(worker_env(refused_redis_url, smtp_server, **FAST))
    wait_for_log(proc, "Redis unreachable during connect")
    _stop_within(proc, sig, 1.0)


def test_a_signal_while_waiting_for_smtp_at_start_up_ends_the_worker_within_a_second(
    worker_proc, worker_env, smtp_server, redis_url
):
    sock = socket.socket()  # a port that accepts but never greets: the login waits
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        env = worker_env(redis_url, smtp_server, smtp_port=sock.getsockname()[1], smtp_timeout_s=30)
        proc = worker_proc(env)
        time.sleep(1.5)  # well inside the 30 s greeting wait
        assert proc.poll() is None, log_of(proc)
        _stop_within(proc, signal.SIGTERM, 1.0)
    finally:
        sock.close()


def test_the_pause_flag_is_cleared_once_a_worker_logs_in_with_working_settings(
    worker_proc, worker_env, smtp_factory, redis_url
):
    r = rclient(redis_url)
    smtp = smtp_factory(auth={"bot@example.com": "right-code"})
    wrong = worker_env(redis_url, smtp, smtp_password="wrong-code", **FAST)
    proc = worker_proc(wrong)
    wait_for_log(proc, "paused")
    assert r.exists(f"{PREFIX}:paused")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)

    fixed = worker_env(redis_url, smtp, **FAST)  # the operator fixed the code and restarted
    proc = worker_proc(fixed)
    wait_for_log(proc, "started")
    deadline = time.monotonic() + 5
    while r.exists(f"{PREFIX}:paused") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not r.exists(f"{PREFIX}:paused"), "check and stats would still say PAUSED"


def test_the_pause_flag_is_cleared_when_a_paused_account_works_again(
    worker_proc, worker_env, smtp_factory, redis_url
):
    r = rclient(redis_url)
    smtp = smtp_factory(auth={"bot@example.com": "code"})
    proc = worker_proc(worker_env(redis_url, smtp, **FAST))
    wait_for_log(proc, "started")
    smtp.auth_fail(535, QQ_535)
    smtp.stop()  # drop the warm (already authenticated) connections
    smtp.start()
    push(r, event("p1"))
    wait_for_log(proc, "paused")
    assert r.exists(f"{PREFIX}:paused")
    smtp.auth_fail(None)
    wait_delivered(smtp, ["p1"], 20)
    time.sleep(0.3)
    assert not r.exists(f"{PREFIX}:paused")


def test_events_under_another_key_prefix_are_named_in_the_worker_log(
    worker_proc, worker_env, smtp_server, redis_url
):
    r = rclient(redis_url)
    r.lpush("notifer:queue", json.dumps({"subject": "pushed with a typo in the prefix"}))
    proc = worker_proc(worker_env(redis_url, smtp_server, **FAST))
    line = wait_for_log(proc, "disagree on the key prefix")
    assert "notifer:queue" in line and "NOTIFIER_KEY_PREFIX=notifer" in line


async def test_a_fenced_worker_sends_nothing_and_returns_the_event(make_rig, smtp_server):
    rig = make_rig(smtp_server)
    await rig.push(rig.event("f1"))
    (raw,) = await rig.queue.fetch_ready(1)
    # no heartbeat renewed: the worker could be taken for dead while it sent
    assert rig.queue.fenced
    await rig.deliverer.handle(0, raw, rig.now())
    assert smtp_server.messages == []
    assert await rig.redis.llen(f"{PREFIX}:queue") == 1
    assert await rig.redis.llen(rig.queue.processing) == 0
    assert not await rig.redis.exists(f"{PREFIX}:sending:f1")
    assert [o.status for o in rig.outcomes] == ["requeued"]
    await rig.run_queue()  # heartbeat renewed: it goes
    assert set(delivered(smtp_server)) == {"f1"}


async def test_a_digest_of_events_held_past_the_target_is_logged_as_slow(
    make_rig, smtp_server, caplog
):
    rig = make_rig(smtp_server, smtp_rate_per_minute=1, smtp_rate_window_s=1, latency_target_s=0.5)
    old = time.time() - 5
    await rig.deliver(rig.event("d0"), rig.event("d1", ts=old), rig.event("d2", ts=old))
    assert set(delivered(smtp_server)) == {"d0"}
    time.sleep(1.1)  # the window has room again
    assert await rig.run_digest()
    assert set(mail_ids(smtp_server.messages)) == {"d0", "d1", "d2"}
    slow = [r for r in caplog.records if r.levelname == "WARNING" and "SLOW" in r.message]
    assert slow, [r.message for r in caplog.records]
    assert "rate limit of" in slow[0].message and "(1/min)" in slow[0].message
    assert "d1" in slow[0].message and "d2" in slow[0].message
