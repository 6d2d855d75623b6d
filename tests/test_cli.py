"""The `notifier` command (worker/cli.py), run as a real subprocess (``python -m worker``)
with its settings in the environment and an empty working directory (no ``.env``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.support.helpers import REPO_ROOT, queued

USER, PASSWORD = "alerts@example.com", "abcdefghijklmnop"
RAW_EVENT = '{"subject":"止损触发 600519","strategy":"ma_cross","data":{"price":1700.5}}'


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip().splitlines()

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"


@pytest.fixture
def notifier(tmp_path: Path):
    """``notifier(*args, env=..., input=...)``: run the command, return a Result."""

    def run(*args: str, env: dict[str, str], input: str | None = None) -> Result:
        full = {"PATH": os.environ.get("PATH", os.defpath), **env}
        full["PYTHONPATH"] = str(REPO_ROOT)
        proc = subprocess.run(
            [sys.executable, "-m", "worker", *args],
            cwd=tmp_path,
            env=full,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=30,
        )
        return Result(proc)

    return run


@pytest.fixture
def env(redis_url) -> dict[str, str]:
    return {"NOTIFIER_REDIS_URL": redis_url}


# -- push --------------------------------------------------------------------------------------


def test_push_subject_and_data(notifier, env, r):
    res = notifier(
        "push", "止损触发 600519", "--strategy", "ma_cross", "--data", "price=1700.5",
        "--data", "qty=100", "--data", "side=BUY", "--data", "ok=true", "--data", "note=null",
        "--severity", "critical", "--kind", "order", env=env,
    )  # fmt: skip
    assert res.code == 0, res
    event_id = res.out.strip()
    (e,) = queued(r)
    assert e.id == event_id and len(event_id) == 32
    assert e.subject == "止损触发 600519"
    assert e.strategy == "ma_cross"
    assert e.data == {"price": 1700.5, "qty": 100, "side": "BUY", "ok": True, "note": None}
    assert (e.severity, e.kind) == ("critical", "order")
    assert e.ts is not None and abs(e.ts - time.time()) < 30


def test_push_json_and_custom_prefix(notifier, env, r):
    res = notifier("push", "--json", RAW_EVENT, env={**env, "NOTIFIER_KEY_PREFIX": "team"})
    assert res.code == 0, res
    (e,) = queued(r, "team")
    assert e.subject == "止损触发 600519"
    assert e.data == {"price": 1700.5}
    assert e.id == res.out.strip()  # an id is assigned so the caller can follow it
    assert r.llen("notifier:queue") == 0


def test_push_json_and_body_from_stdin(notifier, env, r):
    assert notifier("push", "--json", "-", env=env, input=RAW_EVENT).code == 0
    assert (
        notifier("push", "--body", "-", "--id", "b-1", env=env, input="第一行\n第二行\n").code == 0
    )
    first, second = queued(r)
    assert first.subject == "止损触发 600519"
    assert second.id == "b-1" and second.body == "第一行\n第二行\n"


def test_push_to_recipients(notifier, env, r):
    res = notifier("push", "s", "--to", "A@example.com", "--to", "b@example.com", env=env)
    assert res.code == 0, res
    assert queued(r)[0].to == ["a@example.com", "b@example.com"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["push"], "at least one of subject, body, data"),
        (["push", "a\nBcc: x@example.com"], "subject: "),
        (["push", "s", "--data", "novalue"], "--data 'novalue': use KEY=VALUE"),
        (["push", "s", "--to", "not-an-address"], "not a plain address"),
        (["push", "s", "--id", "has space"], "id: "),
        (["push", "--json", "[1, 2]"], "event must be a JSON object, got list"),
        (["push", "--json", "{oops"], "event is not JSON"),
        (["push", "--json", '{"v":2,"subject":"s"}'], "contract version 2"),
        (["push", "--json", '{"subject":"s","data":{"a":NaN}}'], "NaN is not valid JSON"),
        (["push", "--json", json.dumps({"body": "x" * 70000})], "limit is 65536 bytes"),
        (["push", "--body", "x" * 70000], "limit is 65536 bytes"),
    ],
)
def test_push_invalid_is_exit_2_and_one_line(notifier, env, r, args, words):
    res = notifier(*args, env=env)
    assert res.code == 2, res
    assert len(res.err_lines) == 1, res
    assert res.err_lines[0].startswith("notifier push: ")
    assert words in res.err
    assert "Traceback" not in res.err
    assert res.out == ""
    assert r.llen("notifier:queue") == 0


def test_push_redis_unreachable(notifier, refused_redis_url):
    t0 = time.monotonic()
    res = notifier("push", "s", env={"NOTIFIER_REDIS_URL": refused_redis_url})
    assert res.code == 1, res
    assert len(res.err_lines) == 1
    line = res.err_lines[0]
    assert line.startswith(f"notifier push: Redis at {refused_redis_url} unreachable")
    assert "NOTIFIER_REDIS_URL" in line
    assert time.monotonic() - t0 < 10


def test_bad_setting_is_exit_2_and_names_it(notifier, env):
    res = notifier("push", "s", env={**env, "NOTIFIER_KEY_PREFIX": "bad prefix"})
    assert res.code == 2, res
    assert res.err_lines == [res.err.strip()]
    assert res.err.startswith("notifier push: NOTIFIER_KEY_PREFIX: ")


def test_dotenv_in_the_working_directory_is_read(notifier, redis_url, r, tmp_path):
    (tmp_path / ".env").write_text(f"NOTIFIER_REDIS_URL={redis_url}\nNOTIFIER_KEY_PREFIX=dot\n")
    res = notifier("push", "from .env", env={})
    assert res.code == 0, res
    assert queued(r, "dot")[0].subject == "from .env"


# -- check -------------------------------------------------------------------------------------


def test_check_good_settings(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(tls="ssl", auth={USER: PASSWORD})
    res = notifier("check", env=worker_env(redis_url, smtp))
    assert res.code == 0, res
    assert "settings   ok: SMTP 127.0.0.1:" in res.out
    assert "from 量化提醒 <alerts@example.com>" in res.out  # readable, not RFC 2047
    assert "redis      ok: " in res.out
    (smtp_line,) = [x for x in res.out.splitlines() if x.startswith("smtp ")]
    assert smtp_line.startswith(f"smtp       ok: 127.0.0.1:{smtp.port} (ssl): connect ")
    assert " ms, TLS " in smtp_line and "login" in smtp_line and smtp_line.endswith(f"as {USER}")
    assert "FAIL" not in res.out
    assert PASSWORD not in res.out + res.err
    assert smtp.logins == 1
    assert smtp.transactions == 0 and smtp.messages == []  # sends nothing


def test_check_wrong_password(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(tls="ssl", auth={USER: "the-real-one"})
    res = notifier(
        "check", env=worker_env(redis_url, smtp, smtp_provider="qq", smtp_password=PASSWORD)
    )
    assert res.code == 1, res
    assert "redis      ok: " in res.out
    (line,) = [x for x in res.out.splitlines() if x.startswith("smtp ")]
    assert line.startswith(f"smtp       FAIL (configuration) 127.0.0.1:{smtp.port} (ssl): 535")
    assert "授权码" in line
    assert PASSWORD not in res.out + res.err


def test_check_untrusted_certificate(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(tls="starttls", auth={USER: PASSWORD})
    res = notifier("check", env=worker_env(redis_url, smtp, smtp_ca_file=None))
    assert res.code == 1, res
    assert (
        f"smtp       FAIL (configuration) 127.0.0.1:{smtp.port} (starttls): TLS failure" in res.out
    )


def test_check_missing_recipients_and_dead_redis(
    notifier, smtp_factory, worker_env, refused_redis_url
):
    smtp = smtp_factory(auth={USER: PASSWORD})
    res = notifier("check", env=worker_env(refused_redis_url, smtp, mail_to=None))
    assert res.code == 1, res
    assert "settings   FAIL: NOTIFIER_MAIL_TO: not set" in res.out
    assert "redis      FAIL: Redis at" in res.out and "unreachable" in res.out
    assert "smtp       ok: " in res.out
    assert PASSWORD not in res.out + res.err


def test_check_invalid_setting_is_exit_2(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory()
    res = notifier("check", env=worker_env(redis_url, smtp, smtp_port="smtp"))
    assert res.code == 2, res
    assert len(res.err_lines) == 1
    assert res.err.startswith("notifier check: NOTIFIER_SMTP_PORT: ")
    assert "(got 'smtp')" in res.err
    assert res.out == ""


# -- send-test ---------------------------------------------------------------------------------


def test_send_test_prints_the_timing_breakdown(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(tls="ssl", auth={USER: PASSWORD})
    res = notifier("send-test", "--to", "me@example.com", env=worker_env(redis_url, smtp))
    assert res.code == 0, res
    assert res.out.startswith("sent to me@example.com: 250")
    for label in ("connect", "TLS", "login", "send", "total"):
        assert any(
            line.strip().startswith(label) and " ms" in line for line in res.out.splitlines()
        ), label
    (mail,) = smtp.wait_for(1, 5)
    assert mail.rcpt_tos == ["me@example.com"]
    assert mail.message["Subject"] == "notifier send-test 测试邮件"
    assert mail.message["From"].addresses[0].display_name == "量化提醒"
    assert PASSWORD not in res.out + res.err


def test_send_test_failure_is_one_line(notifier, redis_url, smtp_factory, worker_env):
    smtp = smtp_factory(auth={USER: "other"})
    env = worker_env(redis_url, smtp, smtp_password=PASSWORD)
    res = notifier("send-test", "--to", "me@example.com", env=env)
    assert res.code == 1, res
    assert res.out.strip().splitlines() == [res.out.strip()]
    assert res.out.startswith("send-test FAIL (configuration): 535")
    assert PASSWORD not in res.out + res.err
    assert smtp.messages == []


def test_send_test_requires_to(notifier, env):
    res = notifier("send-test", env=env)
    assert res.code == 2
    assert "--to" in res.err


# -- dead letters ------------------------------------------------------------------------------


def seed_dead(r: redis.Redis) -> None:
    now = time.time()
    letters = [
        {"event": '{"id":"e1","subject":"one","_meta":{"attempts":8}}', "id": "e1",
         "reason": "exhausted", "error": "gave up after 8 attempts", "attempts": 8,
         "failed_at": now - 60},
        {"event": "not json at all", "id": "", "reason": "invalid",
         "error": "event is not JSON", "attempts": 0, "failed_at": now - 30},
        {"event": '{"id":"e3","subject":"三"}', "id": "e3", "reason": "permanent",
         "error": "refused by the SMTP server: 550 no such user", "attempts": 1,
         "failed_at": now},
    ]  # fmt: skip
    for letter in letters:
        r.lpush("notifier:dead", json.dumps(letter, ensure_ascii=False))


def test_dead_list(notifier, env, r):
    seed_dead(r)
    res = notifier("dead", "list", env=env)
    assert res.code == 0, res
    assert "e3  [permanent] refused by the SMTP server: 550 no such user" in res.out
    assert "<no id>  [invalid]" in res.out
    ids = [m.group(1) for m in re.finditer(r"(?m)\b(e\d)  \[", res.out)]
    assert ids == ["e3", "e1"]  # newest first (a hex handle may hold "e1": match the id column)
    assert res.out.strip().endswith("3 shown, 3 in total")
    res = notifier("dead", "list", "--json", "--limit", "2", env=env)
    rows = [json.loads(line) for line in res.out.splitlines()]
    assert [row["id"] for row in rows] == ["e3", ""]


def test_dead_replay_one_by_id(notifier, env, r):
    seed_dead(r)
    res = notifier("dead", "replay", "--id", "e1", env=env)
    assert res.code == 0, res
    assert res.out.strip() == "replayed 1 event(s)"
    (e,) = queued(r)
    assert e.id == "e1"
    assert e.meta is not None and e.meta.replayed and e.attempts == 0  # attempts reset
    assert r.llen("notifier:dead") == 2


def test_dead_replay_all_skips_what_is_not_json(notifier, env, r):
    seed_dead(r)
    res = notifier("dead", "replay", "--all", env=env)
    assert res.code == 0, res
    assert "kept " in res.out and "(no id): still invalid (event is not JSON" in res.out
    assert res.out.strip().endswith(
        "replayed 2 event(s); 1 still invalid, kept as dead letters (see `notifier dead list`)"
    )
    assert sorted(e.id for e in queued(r)) == ["e1", "e3"]
    assert r.llen("notifier:dead") == 1


def test_dead_replay_unknown_id(notifier, env, r):
    seed_dead(r)
    res = notifier("dead", "replay", "--id", "nope", env=env)
    assert res.code == 1
    assert res.err_lines == [
        "notifier dead: no dead letter with id or handle nope (see `notifier dead list`)"
    ]
    assert r.llen("notifier:dead") == 3


def test_dead_purge(notifier, env, r):
    seed_dead(r)
    res = notifier("dead", "purge", "--yes", env=env)
    assert res.code == 0, res
    assert res.out.strip() == "purged 3 dead letter(s)"
    assert r.llen("notifier:dead") == 0


def test_dead_redis_unreachable(notifier, refused_redis_url):
    res = notifier("dead", "list", env={"NOTIFIER_REDIS_URL": refused_redis_url})
    assert res.code == 1
    assert len(res.err_lines) == 1 and "unreachable" in res.err


# -- stats ---------------------------------------------------------------------------------------


def seed_deliveries(r: redis.Redis, latencies: list[float]) -> None:
    """Outcome records as workers write them: LPUSH in time order, newest first."""
    now = time.time()
    records = [{"t": now - 7200, "o": "sent", "id": "old", "l": 9.0}]
    for i, latency in enumerate(latencies):
        records.append({"t": now - 5 + i * 0.01, "o": "sent", "id": f"e{i}", "l": latency,
                        "w": 0.001, "s": latency / 2, "m": "pipelining"})  # fmt: skip
    records.append({"t": now - 1, "o": "retry", "id": "x", "reason": "transient"})
    records.append({"t": now, "o": "dead", "id": "y", "reason": "invalid"})
    for record in records:
        r.lpush("notifier:deliveries", json.dumps(record))
    r.hset("notifier:counters", mapping={"delivered": len(latencies) + 1, "dead": 1})
    r.lpush("notifier:queue", RAW_EVENT)


def test_stats_json(notifier, env, r):
    seed_deliveries(r, [0.01, 0.02, 0.03, 1.5])
    res = notifier("stats", "--json", env=env)
    assert res.code == 0, res
    st = json.loads(res.out)
    assert st["delivered"] == 4  # the two-hour-old record is outside the 15 min window
    assert st["retried"] == 1 and st["dead"] == 1 and st["dead_reasons"] == {"invalid": 1}
    assert st["depths"] == {"queue": 1, "retry": 0, "dead": 0, "processing": 0, "held": 0}
    lat = st["latency"]
    assert lat["count"] == 4
    assert lat["p50_s"] == 0.02 and lat["max_s"] == 1.5
    assert lat["within_target"] == 0.75 and lat["target_s"] == 1.0
    assert st["lifetime"] == {"delivered": 5, "dead": 1}


def test_stats_text(notifier, env, r):
    seed_deliveries(r, [0.01, 0.02])
    res = notifier("stats", env=env)
    assert res.code == 0, res
    assert "delivered 2, retried 1, dead 1" in res.out
    assert "depths: queue 1, retry 0, dead 0, processing 0" in res.out
    assert "100.00% within 1 s" in res.out


def test_stats_window(notifier, env, r):
    seed_deliveries(r, [0.01])
    st = json.loads(notifier("stats", "--json", "--window", "3h", env=env).out)
    assert st["delivered"] == 2 and st["window_s"] == 3 * 3600


def test_stats_slo(notifier, env, r):
    seed_deliveries(r, [0.01, 0.02, 0.03, 1.5])
    res = notifier("stats", "--json", "--slo", "0.99", env=env)
    assert res.code == 3, res
    assert "SLO breached: 75.00% within target < 99.00%" in res.err
    assert json.loads(res.out)["latency"]["within_target"] == 0.75
    assert notifier("stats", "--slo", "0.75", env=env).code == 0
    # another target moves the share
    assert (
        notifier("stats", "--slo", "0.99", env={**env, "NOTIFIER_LATENCY_TARGET_S": "2"}).code == 0
    )


def test_stats_with_no_deliveries(notifier, env):
    res = notifier("stats", "--slo", "0.99", env=env)
    assert res.code == 0, res
    assert "latency: no deliveries in the window" in res.out


def test_stats_redis_unreachable(notifier, refused_redis_url):
    res = notifier("stats", "--json", env={"NOTIFIER_REDIS_URL": refused_redis_url})
    assert res.code == 1
    assert res.err_lines == [res.err.strip()]
    assert res.err.startswith(f"notifier stats: Redis at {refused_redis_url} unreachable")
    assert res.out == ""


# -- usage ------------------------------------------------------------------------------------


def test_no_command_is_usage_error(notifier):
    res = notifier(env={})
    assert res.code == 2
    assert "usage: notifier" in res.err


def test_in_process_main_push(redis_url, r, monkeypatch, tmp_path, capsys):
    from worker.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NOTIFIER_REDIS_URL", redis_url)
    monkeypatch.delenv("NOTIFIER_KEY_PREFIX", raising=False)
    assert main(["push", "--json", RAW_EVENT]) == 0
    event_id = capsys.readouterr().out.strip()
    assert queued(r)[0].id == event_id
    assert main(["push"]) == 2
    assert capsys.readouterr().err.startswith("notifier push: invalid event: ")


def test_push_trading_fields(notifier, env, r):
    res = notifier("push", "feed down", "--dedup-key", "feed", "--dedup-window-s", "120",
                   "--expires-s", "30", env=env)  # fmt: skip
    assert res.code == 0, res
    (raw,) = r.lrange("notifier:queue", 0, -1)
    ev = json.loads(raw)
    assert (ev["dedup_key"], ev["dedup_window_s"], ev["expires_s"]) == ("feed", 120.0, 30.0)
    assert ev["id"] == res.out.strip()


def test_stats_watch_refreshes(env, r, tmp_path):
    seed_deliveries(r, [0.01])
    full = {"PATH": os.environ.get("PATH", os.defpath), **env, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "stats", "--json", "--watch", "0.2"],
        cwd=tmp_path, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 10  # the start-up (imports) may be slow on a loaded machine
    try:
        assert proc.stdout is not None
        while len([ln for ln in lines if "{" in ln]) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()  # a snapshot every 0.2 s: never blocks for long
            if not line:
                break
            lines.append(line)
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=5)
    out = "".join(lines) + rest
    snapshots = [json.loads(ln[ln.index("{") :]) for ln in out.splitlines() if "{" in ln]
    assert len(snapshots) >= 3, out
    assert snapshots[2]["at"] - snapshots[0]["at"] < 1.0, out  # refreshed every 0.2 s
    assert all(st["delivered"] == 1 for st in snapshots)
