"""The daemon as operators see it: /metrics, the slow-event log line, sd_notify with a real
notify socket (READY, STATUS, WATCHDOG, STOPPING), JSON logs, and `notifier check`'s Redis
durability warnings. Every worker here is a real `notifier run` subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from producer import Notifier
from tests.support.helpers import REPO_ROOT, wait_started, wait_until
from worker.devtools import free_port

USER, PASSWORD = "alerts@example.com", "abcdefghijklmnop"


def scrape(port: int) -> dict[str, float]:
    """Every sample of /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_endpoint_counts_every_outcome(redis_url, smtp_factory, worker_env, worker_proc):
    smtp = smtp_factory(auth={USER: PASSWORD}, pipelining=True)
    port = free_port()
    env = worker_env(redis_url, smtp, metrics_port=port, retry_base_s=0.05, retry_max_s=0.2)
    proc = worker_proc(env)
    wait_started(proc)
    with Notifier(redis_url) as n:
        for i in range(5):
            n.send(f"metric test {i}", strategy="metrics")
    r = redis.Redis.from_url(redis_url)
    r.lpush("notifier:queue", b"not json at all")
    smtp.fail_next("DATA", 451, "4.3.0 try again", count=1)
    n2 = Notifier(redis_url)
    n2.send("retried once", strategy="metrics")
    smtp.wait_for(6, timeout=10)

    def done() -> bool:
        m = scrape(port)
        return (
            m.get("notifier_delivered_total", 0) >= 6
            and m.get('notifier_dead_total{reason="invalid"}', 0) >= 1
        )

    wait_until(done, timeout=10, what="metrics to count 6 delivered and 1 dead")
    m = scrape(port)
    assert m["notifier_delivered_total"] == 6
    assert m["notifier_delivered_within_target_total"] == 6
    assert m["notifier_delivery_latency_seconds_count"] == 6
    assert m["notifier_smtp_seconds_count"] == 6
    assert m["notifier_queue_wait_seconds_count"] == 6
    # sub-second buckets exist and the deliveries fall inside 1 s
    assert m['notifier_delivery_latency_seconds_bucket{le="0.005"}'] >= 0
    assert m['notifier_delivery_latency_seconds_bucket{le="1.0"}'] == 6
    assert m['notifier_retried_total{reason="transient"}'] == 1
    assert m['notifier_dead_total{reason="invalid"}'] == 1
    assert m["notifier_latency_target_seconds"] == 1.0
    assert m["notifier_smtp_paused"] == 0
    assert m["notifier_smtp_connections"] >= 1
    wait_until(lambda: scrape(port)["notifier_dead_depth"] == 1, timeout=10, what="dead gauge")
    assert scrape(port)["notifier_queue_depth"] == 0
    n2.close()


def test_slow_event_gets_one_log_line_with_the_breakdown(
    redis_url, smtp_server, worker_env, worker_proc
):
    env = worker_env(redis_url, smtp_server, latency_target_s=0.5)
    proc = worker_proc(env)
    wait_started(proc)
    with Notifier(redis_url) as n:
        fast = n.send("on time")
        slow = n.send("produced 3 s ago", ts=time.time() - 3)
    smtp_server.wait_for(2, timeout=10)
    log_path: Path = proc.log_path  # type: ignore[attr-defined]
    wait_until(lambda: slow in log_path.read_text(), timeout=5, what="the slow line")
    lines = log_path.read_text().splitlines()
    slow_lines = [ln for ln in lines if "SLOW" in ln]
    assert len(slow_lines) == 1, slow_lines
    assert slow in slow_lines[0] and "WARNING" in slow_lines[0]
    assert "queue" in slow_lines[0] and "smtp" in slow_lines[0]  # the breakdown
    assert not any(fast in ln and "SLOW" in ln for ln in lines)


def test_json_logs(redis_url, smtp_server, worker_env, worker_proc):
    proc = worker_proc(worker_env(redis_url, smtp_server, log_format="json"))
    wait_started(proc)
    with Notifier(redis_url) as n:
        event_id = n.send("json log line")
    smtp_server.wait_for(1, timeout=10)
    log_path: Path = proc.log_path  # type: ignore[attr-defined]
    wait_until(lambda: event_id in log_path.read_text(), timeout=5, what="the sent line")
    records = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.startswith("{")]
    sent = [rec for rec in records if event_id in rec["msg"]]
    assert sent and sent[0]["level"] == "info" and sent[0]["logger"] == "worker.deliver"


# ------------------------------------------------------------------ systemd notify
class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                return self.messages

    def wait_for(self, needle: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.drain():
                if needle in m:
                    return m
        pytest.fail(f"no {needle!r} in {self.messages}")


@pytest.fixture
def notify_socket(tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


def test_systemd_ready_status_watchdog_stopping(
    redis_url, smtp_factory, worker_env, worker_proc, notify_socket, tmp_path
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    env = worker_env(redis_url, smtp, shutdown_grace_s=2)
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    env["WATCHDOG_USEC"] = "1000000"  # 1 s: pings every 0.5 s while the loops progress
    proc = worker_proc(env)
    ready = notify_socket.wait_for("READY=1", timeout=20)
    assert "STATUS=" in ready and "PAUSED" not in ready
    assert smtp.logins >= 1  # READY only after an SMTP login worked
    notify_socket.wait_for("WATCHDOG=1", timeout=5)
    with Notifier(redis_url) as n:
        n.send("status counts this")
    smtp.wait_for(1, timeout=10)
    notify_socket.wait_for("sent 1", timeout=5)  # live figures in STATUS=
    pings = sum("WATCHDOG=1" in m for m in notify_socket.drain())
    time.sleep(1.5)
    assert sum("WATCHDOG=1" in m for m in notify_socket.drain()) >= pings + 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert any("STOPPING=1" in m for m in notify_socket.drain())


def test_systemd_ready_when_paused_on_a_configuration_error(
    redis_url, smtp_factory, worker_env, worker_proc, notify_socket, tmp_path
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    env = worker_env(redis_url, smtp, smtp_password="wrong-password-16ch", smtp_provider=None)
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    proc = worker_proc(env)
    ready = notify_socket.wait_for("READY=1", timeout=20)
    assert "STATUS=PAUSED" in ready and "535" in ready
    assert "wrong-password-16ch" not in ready
    with Notifier(redis_url) as n:
        n.send("kept queued while paused")
    time.sleep(1.0)
    r = redis.Redis.from_url(redis_url)
    assert r.llen("notifier:queue") == 1 and r.llen("notifier:dead") == 0
    assert r.get("notifier:paused") is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


# ------------------------------------------------------------------ check: durability
def run_check(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "check"], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("appendonly", "policy", "expect"),
    [
        (False, "noeviction", "no persistence"),
        (True, "noeviction", None),
        (True, "allkeys-lru", "may evict"),
    ],
)
def test_check_warns_about_redis_durability(
    redis_factory, smtp_server, worker_env, tmp_path, appendonly, policy, expect
):
    srv = redis_factory(appendonly=appendonly, extra_args=("--maxmemory-policy", policy))
    env = worker_env(srv.url, smtp_server)
    env["PYTHONPATH"] = str(REPO_ROOT)
    res = run_check(env, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    warnings = [ln for ln in res.stdout.splitlines() if "WARNING" in ln]
    if expect is None:
        assert warnings == []
    else:
        assert any(expect in ln for ln in warnings), res.stdout


def test_sigterm_right_after_ready_exits_promptly(
    redis_url, smtp_server, worker_env, worker_proc, notify_socket, tmp_path
):
    """A stop that arrives while the loops are starting must not be lost (Python 3.11 can
    drop a cancellation inside redis-py's wait_for; the worker cancels until done)."""
    env = worker_env(redis_url, smtp_server)
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    for _ in range(3):
        notify_socket.messages.clear()
        proc = worker_proc(env)
        notify_socket.wait_for("READY=1", timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


async def test_a_bug_while_handling_an_event_dead_letters_it_and_the_lane_goes_on(
    redis_url, smtp_server, monkeypatch
):
    """An unexpected exception in the per-event code (a bug) must neither kill the lane nor
    lose the event nor loop on it: the event becomes a dead letter 'internal'."""
    import asyncio

    from producer import AsyncNotifier
    from worker.deliver import Deliverer
    from worker.service import Worker
    from worker.settings import Settings

    real = Deliverer._decide

    async def buggy(self, lane, h):
        if b"trigger-bug" in h.raw:
            raise RuntimeError("boom")
        return await real(self, lane, h)

    monkeypatch.setattr(Deliverer, "_decide", buggy)
    settings = Settings(
        _env_file=None, redis_url=redis_url, smtp_host="127.0.0.1", smtp_port=smtp_server.port,
        smtp_tls="none", mail_from="alerts@example.com", mail_to=["trader@example.com"],
        concurrency=1, metrics_port=0,
    )  # fmt: skip
    worker = Worker(settings)
    task = asyncio.create_task(worker.run())
    async with AsyncNotifier(redis_url) as n:
        await n.send("trigger-bug", id="buggy-1")
        await n.send("after the bug", id="fine-1")
    await smtp_server.wait_for_async(1, timeout=10)
    r = redis.Redis.from_url(redis_url)
    for _ in range(100):
        if r.llen("notifier:dead"):
            break
        await asyncio.sleep(0.05)
    worker.stop()
    await task
    (letter,) = [json.loads(x) for x in r.lrange("notifier:dead", 0, -1)]
    assert letter["reason"] == "internal" and "boom" in letter["error"]
    assert letter["id"] == "buggy-1"
    assert [m.message["X-Notifier-Event-Id"] for m in smtp_server.messages] == ["fine-1"]
    assert r.get("notifier:sending:buggy-1") is None  # its claim is released
