"""Liveness: silence of watched strategies during their sessions, with an injected clock on a
real Redis (several watchers = several workers), across session boundaries."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aredis

from producer.event import parse_event
from tests.support.helpers import KEYS, FakeClock
from worker.metrics import Metrics
from worker.queue import Queue, connect
from worker.watch import ALERT_ID_PREFIX, State, Watcher, WatchRule, duration, load_watch, step

SH = ZoneInfo("Asia/Shanghai")
NY = ZoneInfo("America/New_York")
UTCZ = ZoneInfo("UTC")


def at(text: str, tz: ZoneInfo = SH) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


class Desk:
    """Watchers (one per "worker") on one Redis with one fake clock."""

    def __init__(self, client: aredis.Redis, config: Any, clock: FakeClock, n: int) -> None:
        self.redis = client
        self.clock = clock
        self.metrics = Metrics(1.0)
        self.watchers = [
            Watcher(
                Queue(client, KEYS, f"w{i}", wall_clock=clock.time),
                config,
                metrics=self.metrics if i == 0 else None,
                clock=clock.time,
            )
            for i in range(n)
        ]

    def at(self, t: float) -> None:
        self.clock.t = t

    async def beat(self, strategy: str, t: float | None = None) -> None:
        await self.redis.zadd(KEYS.seen, {strategy: self.clock.t if t is None else t}, gt=True)

    async def tick(self, t: float | None = None) -> list[str]:
        """Every watcher evaluates at once; the subjects of the alerts queued by it."""
        if t is not None:
            self.at(t)
        before = await self.redis.llen(KEYS.queue)
        await asyncio.gather(*(w.evaluate() for w in self.watchers))
        raws = await self.redis.lrange(KEYS.queue, 0, -1)
        new = raws[before:]  # RPUSH: the newest at the right end
        return [json.loads(r)["subject"] for r in new]

    async def alerts(self) -> list[dict[str, Any]]:
        return [json.loads(r) for r in await self.redis.lrange(KEYS.queue, 0, -1)]


@pytest.fixture
async def desk(redis_url: str, tmp_path: Path) -> AsyncIterator[Callable[..., Desk]]:
    clients: list[aredis.Redis] = []

    def make(toml: str, *, start: float, n: int = 1, allowed: frozenset[str] = frozenset()) -> Desk:
        path = tmp_path / "watch.toml"
        path.write_text(toml, encoding="utf-8")
        client = connect(redis_url)
        clients.append(client)
        return Desk(client, load_watch(path, allowed), FakeClock(start), n)

    yield make
    for c in clients:
        await c.aclose()


A_SHARE = """
[[watch]]
strategy = ["ma_*"]
grace_s = 90
sessions = ["cn_a_share"]
repeat_s = 0
"""


async def test_the_lunch_break_is_not_silence_and_the_afternoon_open_is(desk):
    d = desk(A_SHARE, start=at("2026-12-01T11:29:50"))
    await d.beat("ma_cross")
    assert await d.tick(at("2026-12-01T11:31:00")) == []  # heard 70 s ago; closed at 11:30
    assert await d.tick(at("2026-12-01T12:59:59")) == []  # lunch: silence does not matter
    assert await d.tick(at("2026-12-01T13:01:30")) == []  # open 13:00 + grace 90 s
    subjects = await d.tick(at("2026-12-01T13:01:31"))
    assert subjects == ["[SILENT] ma_cross: no sign of life for 1 h 31 min"]
    d.at(at("2026-12-01T13:04:00"))
    await d.beat("ma_cross")
    assert await d.tick(at("2026-12-01T13:04:01")) == [
        "[RECOVERED] ma_cross: heard again after 1 h 34 min"
    ]
    assert await d.tick(at("2026-12-01T13:05:30")) == []


async def test_a_strategy_that_has_not_started_by_the_open_is_silent_grace_after_it(desk):
    d = desk(A_SHARE, start=at("2026-11-30T15:00:00"))
    await d.beat("ma_cross")  # yesterday's close
    assert await d.tick(at("2026-12-01T09:29:00")) == []  # closed: nothing fires
    assert await d.tick(at("2026-12-01T09:31:30")) == []
    assert (await d.tick(at("2026-12-01T09:31:31")))[0].startswith("[SILENT] ma_cross")


NIGHT = """
[[watch]]
name = "gold night"
strategy = ["au_*"]
grace_s = 60
sessions = ["cn_futures_night"]
night_end = "{end}"
repeat_s = 0
"""


async def test_a_night_session_past_midnight(desk):
    d = desk(NIGHT.format(end="02:30"), start=at("2026-12-02T00:59:00"))  # Tue night
    await d.beat("au_grid")
    assert await d.tick(at("2026-12-02T01:00:00")) == []
    assert (await d.tick(at("2026-12-02T01:00:01")))[0].startswith("[SILENT] au_grid")


async def test_a_night_session_that_ends_at_one_does_not_see_silence_after_it(desk):
    d = desk(NIGHT.format(end="01:00"), start=at("2026-12-02T00:59:30"))
    await d.beat("au_grid")
    assert await d.tick(at("2026-12-02T01:00:31")) == []  # closed at 01:00
    assert await d.tick(at("2026-12-02T08:00:00")) == []
    # the next evening (Wednesday 2 Dec, a trading day before a trading day) it opens again
    assert (await d.tick(at("2026-12-02T21:01:01")))[0].startswith("[SILENT] au_grid")


async def test_no_night_session_the_evening_before_a_holiday(desk):
    # 30 Sep 2026 is a trading day, 1 Oct National Day: no night session that evening
    d = desk(NIGHT.format(end="02:30"), start=at("2026-09-30T15:00:00"))
    await d.beat("au_grid")
    for t in ("2026-09-30T21:05:00", "2026-10-01T00:30:00", "2026-10-01T02:00:00"):
        assert await d.tick(at(t)) == [], t
    # the evening before (29 Sep, the next trading day is 30 Sep) had one
    d2 = desk(NIGHT.format(end="02:30"), start=at("2026-09-29T15:00:00"))
    await d2.redis.delete(KEYS.watch, KEYS.seen)
    await d2.beat("au_grid")
    assert (await d2.tick(at("2026-09-29T21:01:01")))[0].startswith("[SILENT] au_grid")


MAKEUP = """
[[session]]
name = "makeup_morning"
tz = "Asia/Shanghai"
hours = ["09:30-11:30"]
calendar = "XSHG"
open = ["2026-10-10"]

[[watch]]
strategy = ["ma_*"]
grace_s = 90
sessions = ["makeup_morning"]
repeat_s = 0
"""


async def test_a_make_up_trading_day_opens_a_saturday(desk):
    d = desk(MAKEUP, start=at("2026-10-09T11:00:00"))
    await d.beat("ma_cross")
    assert await d.tick(at("2026-10-17T10:00:00")) == []  # an ordinary Saturday: closed
    d2 = desk(MAKEUP, start=at("2026-10-09T11:00:00"))
    assert (await d2.tick(at("2026-10-10T09:31:31")))[0].startswith("[SILENT] ma_cross")


US = """
[[watch]]
strategy = ["spx_*"]
grace_s = 90
sessions = ["us_equity"]
repeat_s = 0
"""


async def test_the_us_open_follows_daylight_saving_time(desk):
    # Friday 6 Mar 2026 (EST): the open is 14:30 UTC; Monday 9 Mar (EDT): 13:30 UTC
    d = desk(US, start=at("2026-03-05T21:00:00", UTCZ))
    await d.beat("spx_mm")
    assert await d.tick(at("2026-03-06T13:32:00", UTCZ)) == []
    assert (await d.tick(at("2026-03-06T14:31:31", UTCZ)))[0].startswith("[SILENT] spx_mm")
    d.at(at("2026-03-06T21:00:00", UTCZ))
    await d.beat("spx_mm")
    assert (await d.tick())[0].startswith("[RECOVERED]")
    assert await d.tick(at("2026-03-09T13:31:30", UTCZ)) == []
    assert (await d.tick(at("2026-03-09T13:31:31", UTCZ)))[0].startswith("[SILENT] spx_mm")


NAMED = """
[[watch]]
strategy = ["ma_cross", "ma_*"]
grace_s = 90
sessions = ["cn_a_share"]
repeat_s = 0
"""


async def test_a_named_strategy_never_heard_is_watched_from_the_next_open(desk):
    d = desk(NAMED, start=at("2026-12-01T10:00:00"))  # the rule is loaded mid-session
    assert await d.tick() == []
    assert await d.tick(at("2026-12-01T11:29:00")) == []  # not this session
    assert await d.tick(at("2026-12-01T13:01:30")) == []
    subjects = await d.tick(at("2026-12-01T13:01:31"))
    assert subjects == ["[SILENT] ma_cross: no sign of life for 1 min"]
    # ma_other matches only a pattern and was never heard: not watched
    assert "ma_other" not in await d.redis.hkeys(KEYS.watch)
    d.at(at("2026-12-01T13:10:00"))
    await d.beat("ma_cross")
    assert await d.tick() == ["[RECOVERED] ma_cross: heard for the first time after 10 min"]


ALWAYS = """
[[watch]]
strategy = ["btc_*"]
grace_s = 30
sessions = ["always"]
repeat_s = 600
"""


async def test_reminders_every_repeat_s_and_one_recovery(desk):
    d = desk(ALWAYS, start=1_900_000_000.0)
    await d.beat("btc_grid")
    t0 = d.clock.t
    assert await d.tick(t0 + 30) == []
    assert await d.tick(t0 + 31) == ["[SILENT] btc_grid: no sign of life for 31 s"]
    assert await d.tick(t0 + 630) == []
    assert await d.tick(t0 + 631) == ["[SILENT] btc_grid: still silent after 10 min (reminder 1)"]
    assert await d.tick(t0 + 1231) == ["[SILENT] btc_grid: still silent after 20 min (reminder 2)"]
    d.at(t0 + 1300)
    await d.beat("btc_grid")
    assert await d.tick() == ["[RECOVERED] btc_grid: heard again after 21 min"]
    assert await d.tick(t0 + 1330) == []
    assert await d.tick(t0 + 1331) == ["[SILENT] btc_grid: no sign of life for 31 s"]
    st = State.from_json(await d.redis.hget(KEYS.watch, "btc_grid"))
    assert st.episode == 2 and st.alerts == 1


async def test_reminders_wait_for_the_session_to_open_again(desk):
    toml = A_SHARE.replace("repeat_s = 0", "repeat_s = 600")
    d = desk(toml, start=at("2026-12-01T14:50:00"))
    await d.beat("ma_cross")
    assert (await d.tick(at("2026-12-01T14:51:31")))[0].startswith("[SILENT]")
    for t in ("2026-12-01T15:01:31", "2026-12-01T20:00:00", "2026-12-02T09:31:00"):
        assert await d.tick(at(t)) == [], t  # closed, then within grace of the open
    assert await d.tick(at("2026-12-02T09:31:30")) == [
        "[SILENT] ma_cross: still silent after 18 h 41 min (reminder 1)"
    ]


async def test_three_workers_evaluating_at_once_send_one_alert_per_change(desk):
    d = desk(ALWAYS, start=1_900_000_000.0, n=3)
    await d.beat("btc_a")
    await d.beat("btc_b")
    t0 = d.clock.t
    timeline = []
    for dt in range(0, 1400, 7):
        if dt == 350:
            d.at(t0 + dt)
            await d.beat("btc_a")
        timeline += await d.tick(t0 + dt)
    kinds = sorted(s.split(":")[0] for s in timeline)
    # a: silent, back, silent again, a reminder; b: silent and two reminders
    assert kinds == sorted(
        ["[SILENT] btc_a", "[RECOVERED] btc_a", "[SILENT] btc_a", "[SILENT] btc_a"]
        + ["[SILENT] btc_b"] * 3
    )
    ids = [a["id"] for a in await d.alerts()]
    assert len(ids) == len(set(ids)) == 7
    assert sum(len(w.sent) for w in d.watchers) == 7


async def test_a_worker_that_dies_mid_evaluation_neither_loses_nor_repeats(desk, monkeypatch):
    d = desk(ALWAYS, start=1_900_000_000.0, n=2)
    await d.beat("btc_grid")
    dying, other = d.watchers

    async def killed(*args: Any, **kwargs: Any) -> bool:
        raise asyncio.CancelledError  # the process dies before its step reaches Redis

    monkeypatch.setattr(dying.queue, "watch_step", killed)
    d.at(d.clock.t + 31)
    with pytest.raises(asyncio.CancelledError):
        await dying.evaluate()
    assert await d.redis.llen(KEYS.queue) == 0  # nothing half-done
    d.at(d.clock.t + 1)  # the next evaluation, by the other worker, a second later
    await other.evaluate()
    await other.evaluate()
    alerts = await d.alerts()
    assert [a["subject"] for a in alerts] == ["[SILENT] btc_grid: no sign of life for 32 s"]


async def test_the_alert_carries_what_a_person_needs(desk, redis_url):
    toml = """
[[watch]]
strategy = ["ma_*"]
grace_s = 90
sessions = ["cn_a_share"]
severity = "warning"
to = ["desk@example.com"]
"""
    d = desk(toml, start=at("2026-12-01T10:00:00"), allowed=frozenset({"desk@example.com"}))
    await d.beat("ma_cross")
    await d.redis.hset(
        KEYS.last, "ma_cross", json.dumps({"subject": "止损触发 600519", "ts": d.clock.t})
    )
    await d.tick(at("2026-12-01T10:05:00"))
    (alert,) = await d.alerts()
    event = parse_event(json.dumps(alert).encode())
    assert event.id is not None and event.id.startswith(ALERT_ID_PREFIX)
    assert event.kind == "silent" and event.severity == "warning"
    assert event.strategy == "ma_cross" and event.to == ["desk@example.com"]
    assert event.data is not None
    assert event.data["last seen"] == "2026-12-01 10:00:00 CST"
    assert event.data["last event"] == "止损触发 600519"
    assert event.data["silent for"] == "5 min"
    assert "cn_a_share" in (event.body or "")


async def test_chinese_alerts_and_one_copy_per_channel(desk, redis_url, tmp_path):
    toml = ALWAYS + 'channels = ["wecom", "email"]\n'
    path = tmp_path / "w.toml"
    path.write_text(toml)
    config = load_watch(path, frozenset())
    clock = FakeClock(1_900_000_000.0)
    client = connect(redis_url)
    try:
        w = Watcher(
            Queue(client, KEYS, "w1", wall_clock=clock.time), config, locale="zh", clock=clock.time
        )
        await client.zadd(KEYS.seen, {"btc_grid": clock.t})
        clock.advance(45)
        await w.evaluate()
        raws = [json.loads(r) for r in await client.lrange(KEYS.queue, 0, -1)]
    finally:
        await client.aclose()
    assert sorted(r["_meta"]["channel"] for r in raws) == ["email", "wecom"]
    assert {r["id"] for r in raws} == {raws[0]["id"]}  # one delivery per channel, one id
    assert raws[0]["subject"] == "[失联] btc_grid:已 45 秒 无信号"
    assert "失联时长" in raws[0]["data"]


async def test_metrics_show_last_seen_and_silence(desk):
    d = desk(ALWAYS, start=1_900_000_000.0)
    await d.beat("btc_grid")
    await d.tick(d.clock.t + 31)
    reg = d.metrics.registry
    assert (
        reg.get_sample_value(
            "notifier_strategy_last_seen_timestamp_seconds", {"strategy": "btc_grid"}
        )
        == 1_900_000_000.0
    )
    assert reg.get_sample_value("notifier_strategy_silent", {"strategy": "btc_grid"}) == 1
    d.at(d.clock.t + 5)
    await d.beat("btc_grid")
    await d.tick()
    assert reg.get_sample_value("notifier_strategy_silent", {"strategy": "btc_grid"}) == 0


def test_step_is_pure_and_never_alerts_outside_a_session():
    rule = WatchRule(strategy=["x"], grace_s=10)
    st = State()
    assert step(100.0, rule, None, 0.0, st) == (st, None)
    silent, notice = step(100.0, rule, _Window(0.0, 200.0), 0.0, st)
    assert notice == "silent" and silent.since == 10.0 and silent.heard == 0.0
    assert step(150.0, rule, None, 0.0, silent)[1] is None  # closed: no reminder
    assert step(150.0, rule, None, 120.0, silent)[1] == "recovered"  # heard: any time


class _Window:
    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end


def test_durations_read_naturally():
    assert [duration(x) for x in (0, 59.6, 61, 3599, 3600, 3660, 49 * 3600)] == [
        "0 s",
        "1 min",
        "1 min",
        "59 min",
        "1 h",
        "1 h 1 min",
        "2 d 1 h",
    ]
    assert duration(3660, "zh") == "1 小时 1 分钟"


# ------------------------------------------------------------------ signs of life from events
async def test_a_strategys_events_are_signs_of_life_but_silence_alerts_are_not(
    make_rig, smtp_server, tmp_path
):
    path = tmp_path / "watch.toml"
    path.write_text(ALWAYS)
    clock = FakeClock(1_900_000_000.0)
    rig = make_rig(smtp_server, clock, watch_file=path)
    await rig.push(rig.event("e1", strategy="btc_grid", subject="开仓 BTC"))
    await rig.run_queue()
    await rig.core.watcher.flush()
    assert await rig.redis.zscore(KEYS.seen, "btc_grid") == clock.t
    assert json.loads(await rig.redis.hget(KEYS.last, "btc_grid"))["subject"] == "开仓 BTC"
    clock.advance(31)
    await rig.core.watcher.evaluate()  # queues [SILENT] btc_grid (strategy btc_grid)
    await rig.run_queue()
    await rig.core.watcher.flush()
    assert await rig.redis.zscore(KEYS.seen, "btc_grid") == clock.t - 31  # not a sign of life
    subjects = [str(m.message["Subject"]) for m in smtp_server.messages]
    assert any("[SILENT] btc_grid" in s for s in subjects), subjects
    # an old event retried late moves nothing back
    await rig.core.watcher.queue.record_seen({"btc_grid": (clock.t - 100, "old")})
    assert await rig.redis.zscore(KEYS.seen, "btc_grid") == clock.t - 31


# ------------------------------------------------------------------ the view and the file
def _cli(monkeypatch, redis_url: str, path: Path, *args: str) -> int:
    from worker.cli import main

    monkeypatch.setenv("NOTIFIER_REDIS_URL", redis_url)
    monkeypatch.setenv("NOTIFIER_KEY_PREFIX", KEYS.prefix)
    monkeypatch.setenv("NOTIFIER_WATCH_FILE", str(path))
    return main(["watch", "--env-file", "/dev/null", *args])


def test_notifier_watch_shows_the_table_and_exits_3_when_one_is_silent(
    monkeypatch, capsys, redis_url, r, tmp_path
):
    import time

    path = tmp_path / "watch.toml"
    path.write_text(ALWAYS + NAMED.replace("cn_a_share", "always"))
    now = time.time()
    r.zadd(KEYS.seen, {"btc_ok": now - 5, "btc_dead": now - 300, "other": now})
    code = _cli(monkeypatch, redis_url, path)
    out = capsys.readouterr().out
    assert code == 3
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == {"btc_ok", "btc_dead", "ma_cross"}  # "other" is not watched
    assert " ok " in lines["btc_ok"] and " silent " in lines["btc_dead"]
    assert " waiting " in lines["ma_cross"] and "never" in lines["ma_cross"]
    code = _cli(monkeypatch, redis_url, path, "--json")
    rows = {
        json.loads(x)["strategy"]: json.loads(x) for x in capsys.readouterr().out.split("\n") if x
    }
    assert rows["btc_dead"]["state"] == "silent" and rows["btc_dead"]["session_open"] is True
    assert code == 3
    assert _cli(monkeypatch, redis_url, path, "--forget", "btc_dead") == 0
    assert "forgot 1 of 1 strategy" in capsys.readouterr().out
    assert _cli(monkeypatch, redis_url, path) == 0


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("[[watch]]\nstrategy = ['x']\nsessions = ['cn_a_shar']\n", "cn_a_share"),
        ("[[watch]]\nstrategy = ['x']\nsessions = ['cn_futures_night']\n", "night_end"),
        ("[[watch]]\nstrategy = ['x']\ngrace_s = 0\n", "grace_s"),
        ("[[watch]]\nstrategy = ['x']\ngrace = 5\n", "grace"),
        ("[[watch]]\nsessions = ['always']\n", "strategy"),
        ("[[watch]]\nstrategy = ['x']\nto = ['boss@example.com']\n", "ALLOWED_RECIPIENTS"),
        ("[[watch]]\nstrategy = ['x']\nseverity = 'urgent'\n", "severity"),
        ("[[watch]\n", "not valid TOML"),
    ],
)
def test_a_wrong_watch_file_is_one_line_naming_the_setting(tmp_path, toml, says):
    path = tmp_path / "watch.toml"
    path.write_text(toml)
    with pytest.raises(ValueError) as info:
        load_watch(path, frozenset())
    message = str(info.value)
    assert message.startswith(f"NOTIFIER_WATCH_FILE={path}: "), message
    assert says in message and "\n" not in message


def test_check_shows_the_watch_and_warns_before_a_calendar_runs_out(
    monkeypatch, capsys, redis_url, smtp_server, tmp_path
):
    import datetime as dt

    from worker.cli import main

    path = tmp_path / "watch.toml"
    path.write_text(A_SHARE)
    monkeypatch.setenv("NOTIFIER_REDIS_URL", redis_url)
    monkeypatch.setenv("NOTIFIER_WATCH_FILE", str(path))
    monkeypatch.setenv("NOTIFIER_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("NOTIFIER_SMTP_PORT", str(smtp_server.port))
    monkeypatch.setenv("NOTIFIER_SMTP_TLS", "none")
    monkeypatch.setenv("NOTIFIER_MAIL_FROM", "alerts@example.com")
    monkeypatch.setenv("NOTIFIER_MAIL_TO", "me@example.com")
    main(["check", "--env-file", "/dev/null"])
    out = capsys.readouterr().out
    config = load_watch(path, frozenset())
    (cal,) = config.sessions.calendars_in_use(["cn_a_share"]).values()
    assert cal.known_until is not None
    assert (
        f"watch      ok: 1 rule(s) from {path}, sessions cn_a_share; holidays known: "
        f"XSHG to {cal.known_until.isoformat()}" in out
    )
    expected = config.sessions.calendar_warnings(["cn_a_share"], dt.date.today())
    assert (
        (f"watch      WARNING: {expected[0]}" in out)
        if expected
        else "watch      WARNING" not in out
    )


def test_the_example_watch_file_of_the_readme_is_valid():
    from tests.support.helpers import REPO_ROOT

    config = load_watch(REPO_ROOT / "deploy/examples/watch.toml", frozenset())
    assert [r.label for r in config.rules] == [
        "A-share",
        "precious metals",
        "ferrous",
        "market maker",
    ]
    assert config.named() == ["mm_600519"]
    gold = config.rule_for("au_main")
    assert gold is not None
    # a Tuesday night at 02:00 (belongs to Wednesday 2 Dec): gold is open, rebar closed
    night = at("2026-12-02T02:00:00")
    assert gold.window(night) is not None
    ferrous = config.rule_for("rb_trend")
    assert ferrous is not None and ferrous.window(night) is None
