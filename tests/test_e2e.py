"""End to end: `notifier run` as a real subprocess, configured by environment only, between
the private redis-server and an aiosmtpd server with AUTH.

Events go in both ways a strategy sends them: through ``producer.Notifier`` and as raw JSON
with a plain Redis ``LPUSH`` (what ``redis-cli LPUSH notifier:queue '...'`` does).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
import redis

from producer import Notifier
from tests.support.helpers import MAIL_FROM, MAIL_TO, unsettled, wait_started, wait_until

USER, PASSWORD = "alerts@example.com", "abcdefghijklmnop"
RAW_SUBJECT = "止损触发 600519"
RAW_EVENT = '{"subject":"止损触发 600519","strategy":"ma_cross","data":{"price":1700.5}}'


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=15)


def assert_mail(received, *, subject: str, event_id: str | None = None) -> None:
    msg = received.message
    assert msg["Subject"] == subject
    (sender,) = msg["From"].addresses
    assert sender.display_name == "量化提醒"
    assert sender.addr_spec == "alerts@example.com"
    assert [a.addr_spec for a in msg["To"].addresses] == [MAIL_TO]
    assert received.rcpt_tos == [MAIL_TO]
    assert received.mail_from == "alerts@example.com"
    message_id = msg["Message-ID"]
    assert re.fullmatch(r"<[!-~]+@example\.com>", message_id)
    if event_id is not None:
        assert event_id in message_id
    assert msg["X-Notifier-Event-Id"] in message_id
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
    assert plain is not None and html is not None
    assert msg["X-Notifier-Event-Id"] in plain.get_content()
    assert "<html>" in html.get_content()
    assert received.data.isascii()  # encoded per RFC 2047 / base64 on the wire


@pytest.mark.parametrize("tls", ["none", "ssl", "starttls"])
def test_run_delivers_producer_and_raw_lpush_events(
    redis_url, smtp_factory, worker_env, worker_proc, tls
):
    assert MAIL_FROM.startswith("量化提醒")
    smtp = smtp_factory(tls=tls, auth={USER: PASSWORD})
    env = worker_env(redis_url, smtp, concurrency=2)
    assert env["NOTIFIER_SMTP_PASSWORD"] == PASSWORD
    proc = worker_proc(env)
    wait_started(proc)
    assert smtp.logins == 2  # both lanes warmed up: logged in before any event

    r = redis.Redis.from_url(redis_url)
    try:
        # 1. through the producer
        with Notifier(redis_url) as n:
            first = n.send("策略启动 ma_cross", strategy="ma_cross", body="运行中", data={"n": 1})
            second = n.signal("ma_cross", "600519.SH", "buy", 1700.5, 100)
        smtp.wait_for(2, 10)

        # 2. raw JSON with a plain LPUSH, timed
        pushed_at = time.time()
        r.lpush("notifier:queue", RAW_EVENT)
        messages = smtp.wait_for(3, 10)
        raw_mail = messages[2]
        assert raw_mail.received_at - pushed_at < 1.0, "the raw LPUSH took over 1 s"

        by_subject = {m.message["Subject"]: m for m in messages}
        assert set(by_subject) == {
            "策略启动 ma_cross", "[BUY] 600519.SH 100 @ 1700.50 · ma_cross", RAW_SUBJECT,
        }  # fmt: skip
        assert_mail(by_subject["策略启动 ma_cross"], subject="策略启动 ma_cross", event_id=first)
        assert_mail(
            by_subject["[BUY] 600519.SH 100 @ 1700.50 · ma_cross"],
            subject="[BUY] 600519.SH 100 @ 1700.50 · ma_cross",
            event_id=second,
        )
        assert_mail(raw_mail, subject=RAW_SUBJECT)
        raw_plain = raw_mail.message.get_body(("plain",)).get_content()
        raw_html = raw_mail.message.get_body(("html",)).get_content()
        assert "price: 1700.50" in raw_plain and "ma_cross" in raw_plain
        assert ">1700.50</td>" in raw_html
        assert (
            "运行中" in by_subject["策略启动 ma_cross"].message.get_body(("plain",)).get_content()
        )

        # nothing left behind once the acks are in
        wait_until(lambda: r.hget("notifier:counters", "delivered") == b"3", what="3 acks")
        assert unsettled(r) == {}
        assert r.llen("notifier:dead") == 0
        assert r.exists(f"notifier:sent:{first}", f"notifier:sent:{second}") == 2
        records = [json.loads(x) for x in r.lrange("notifier:deliveries", 0, -1)]
        assert {x["o"] for x in records} == {"sent"} and len(records) == 3
        assert all(x["l"] < 1.0 for x in records)
        assert smtp.connections == 2  # warm connections, no new one per message

        assert stop(proc) == 0
        assert r.scard("notifier:workers") == 0  # deregistered on the way out
        assert unsettled(r) == {}
    finally:
        r.close()
    log = proc.log_path.read_text("utf-8")  # type: ignore[attr-defined]
    assert PASSWORD not in log
    assert "stopped" in log


def test_invalid_and_duplicate_events_while_running(
    redis_url, smtp_factory, worker_env, worker_proc
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    proc = worker_proc(worker_env(redis_url, smtp, concurrency=1))
    wait_started(proc)
    r = redis.Redis.from_url(redis_url)
    try:
        r.lpush("notifier:queue", b"\xff not json")
        r.lpush("notifier:queue", '{"subject":"x","to":["stranger@example.net"]}')
        r.lpush("notifier:queue", '{"id":"same-1","subject":"once"}')
        r.lpush("notifier:queue", '{"id":"same-1","subject":"once"}')
        r.lpush("notifier:queue", '{"subject":"after the bad ones"}')
        wait_until(lambda: r.llen("notifier:dead") == 2, what="2 dead letters")
        wait_until(lambda: r.hget("notifier:counters", "duplicates_skipped") == b"1", what="dedup")
        messages = smtp.wait_for(2, 10)
        assert [m.message["Subject"] for m in messages] == ["once", "after the bad ones"]
        letters = [json.loads(x) for x in r.lrange("notifier:dead", 0, -1)]
        assert {x["reason"] for x in letters} == {"invalid"}
        errors = " | ".join(x["error"] for x in letters)
        assert "not valid UTF-8" in errors
        assert "stranger@example.net" in errors and "NOTIFIER_ALLOWED_RECIPIENTS" in errors
        wait_until(lambda: unsettled(r) == {}, what="empty processing")
        assert stop(proc) == 0
    finally:
        r.close()
    assert len(smtp.messages) == 2


def test_burst_exits_zero_once_the_queue_is_drained(
    redis_url, smtp_factory, worker_env, worker_proc
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    r = redis.Redis.from_url(redis_url)
    try:
        with Notifier(redis_url) as n:
            ids = [n.send(f"burst {i}") for i in range(5)]
        r.lpush("notifier:queue", RAW_EVENT)
        proc = worker_proc(worker_env(redis_url, smtp, concurrency=2), "--burst")
        assert proc.wait(timeout=30) == 0
        subjects = sorted(m.message["Subject"] for m in smtp.messages)
        assert subjects == sorted([*(f"burst {i}" for i in range(5)), RAW_SUBJECT])
        assert unsettled(r) == {}
        assert r.exists(*(f"notifier:sent:{i}" for i in ids)) == 5
        assert r.scard("notifier:workers") == 0
    finally:
        r.close()


def test_burst_on_an_empty_queue_exits_at_once(redis_url, smtp_factory, worker_env, worker_proc):
    smtp = smtp_factory()
    proc = worker_proc(worker_env(redis_url, smtp), "--burst")
    assert proc.wait(timeout=20) == 0
    assert smtp.messages == []


def test_run_refuses_to_start_without_mail_settings(
    redis_url, smtp_factory, worker_env, worker_proc
):
    smtp = smtp_factory()
    proc = worker_proc(worker_env(redis_url, smtp, mail_to=None))
    assert proc.wait(timeout=20) == 2
    lines = proc.log_path.read_text("utf-8").strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1
    assert "NOTIFIER_MAIL_TO" in lines[0]
