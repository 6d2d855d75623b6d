"""Liveness end to end, with real processes: a strategy process keeps a heartbeat, is killed,
three ``notifier run`` workers (one killed -9 mid-episode) send one ``[SILENT]`` mail within
``grace_s`` + 2 s, reminders on time, and one ``[RECOVERED]`` within 2 s of its return."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.helpers import EMPTY, KEYS, PREFIX, kill9, leftovers, rclient, wait_until

GRACE_S = 2.0
REPEAT_S = 3.0
BEAT_S = 0.2

STRATEGY = textwrap.dedent(
    """
    import sys, time
    from producer import Notifier
    n = Notifier(sys.argv[1], key_prefix=sys.argv[2])
    n.keepalive("ma_cross", every_s=float(sys.argv[3]))
    print("beating", flush=True)
    time.sleep(3600)
    """
)


def _strategy(redis_url: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", STRATEGY, redis_url, PREFIX, str(BEAT_S)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=(tmp_path / "strategy.log").open("ab"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.timeout(60)
def test_silence_reminder_and_recovery_by_mail_with_three_workers_one_killed(
    worker_proc, worker_env, smtp_server, redis_url, tmp_path
):
    watch = tmp_path / "watch.toml"
    watch.write_text(
        f"""
[[watch]]
strategy = ["ma_cross"]
grace_s = {GRACE_S}
sessions = ["always"]
repeat_s = {REPEAT_S}
""",
        encoding="utf-8",
    )
    r = rclient(redis_url)
    env = worker_env(redis_url, smtp_server, watch_file=watch, heartbeat_ttl_s=3)
    workers = [worker_proc(env) for _ in range(3)]
    strategy = _strategy(redis_url, tmp_path)
    try:
        wait_until(lambda: r.zscore(KEYS.seen, "ma_cross") is not None, 10, "first heartbeat")
        time.sleep(1.0)  # a few beats while the workers watch: no alert
        assert not smtp_server.messages

        kill9(strategy)
        stopped = time.time()
        last_seen = float(r.zscore(KEYS.seen, "ma_cross"))

        def subjects(word: str) -> list[tuple[float, str]]:
            return [
                (m.received_at, str(m.message["Subject"]))
                for m in smtp_server.messages
                if word in str(m.message["Subject"])
            ]

        wait_until(lambda: subjects("[SILENT]"), GRACE_S + 5, "[SILENT] mail")
        silent_at, silent_subject = subjects("[SILENT]")[0]
        assert silent_subject.startswith("[SILENT] ma_cross: no sign of life")
        assert silent_at - last_seen <= GRACE_S + 2.0, silent_at - last_seen

        # Mid-episode, but not mid-send: a worker killed between the SMTP server's 250 and
        # its ack has that mail sent again by another (at-least-once, as for every event),
        # which is not what this test is about (one alert decided per episode).
        wait_until(lambda: leftovers(r) == EMPTY, 5, "the [SILENT] mail settled")
        kill9(workers[0])  # the other two carry on
        killed_at = time.time()
        wait_until(lambda: len(subjects("still silent")) >= 2, REPEAT_S * 2 + 8, "reminders")
        reminders = subjects("still silent")
        # each reminder within 5 s of when it was due (the kill delays none by more)
        assert reminders[0][0] - (silent_at + REPEAT_S) <= 5.0
        assert reminders[1][0] - (reminders[0][0] + REPEAT_S) <= 5.0

        strategy = _strategy(redis_url, tmp_path)
        wait_until(lambda: float(r.zscore(KEYS.seen, "ma_cross")) > last_seen, 10, "beat")
        resumed = float(r.zscore(KEYS.seen, "ma_cross"))
        wait_until(lambda: subjects("[RECOVERED]"), 5, "[RECOVERED] mail")
        recovered_at, recovered_subject = subjects("[RECOVERED]")[0]
        assert recovered_subject.startswith("[RECOVERED] ma_cross: heard again after")
        assert recovered_at - resumed <= 2.0, recovered_at - resumed
        time.sleep(1.5)  # nothing more comes
        assert len(subjects("[RECOVERED]")) == 1
        assert len(subjects("no sign of life")) == 1  # one [SILENT] for the episode
        ids = [m.message["X-Notifier-Event-Id"] for m in smtp_server.messages]
        assert len(ids) == len(set(ids))
        assert all(p.poll() is None for p in workers[1:])

        print()
        print("timeline of one silence episode (seconds after the strategy's last beat):")
        print(f"  {0.0:6.2f}  last heard (strategy killed -9 at {stopped - last_seen:+.2f})")
        print(f"  {silent_at - last_seen:6.2f}  {silent_subject}")
        print(f"  {killed_at - last_seen:6.2f}  worker 1 of 3 killed -9")
        for t, s in reminders:
            print(f"  {t - last_seen:6.2f}  {s}")
        print(f"  {resumed - last_seen:6.2f}  heard again")
        print(f"  {recovered_at - last_seen:6.2f}  {recovered_subject}")
    finally:
        if strategy.poll() is None:
            kill9(strategy)
        r.close()
