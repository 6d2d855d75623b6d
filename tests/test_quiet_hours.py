"""Quiet hours of a route (worker/quiet.py, worker/deliver.py, worker/settle.py, `stats`), with
an injected clock: held outside the route's sessions, sent at once inside, critical and
digest = false never held, one digest at digest_at (or when the next window opens) holding
every held event, each channel's copy in its own group, what `stats` shows, and the one-line
errors of a bad [route.quiet] table."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.support.helpers import (
    KEYS,
    REPO_ROOT,
    FakeClock,
    clean_env,
    delivered,
    ids_in,
    is_digest,
    text_of,
)
from tests.support.list_channel import ListChannel, ListChannelSettings
from worker.cli import _held_line, _held_view
from worker.quiet import Quiet, is_quiet_group
from worker.routing import load_routes
from worker.sessions import SessionBook

SH = ZoneInfo("Asia/Shanghai")
ALLOWED = frozenset({"me@example.com"})
QUIET_A_SHARE = """
[[route]]
name = "grid info"
strategy = "grid_*"
[route.quiet]
deliver_during = ["cn_a_share"]
digest_at = "08:45"

[[route]]
name = "grid loud"
strategy = "loud_*"
digest = false
"""


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=SH).timestamp()


def hhmm(t: float) -> str:
    return datetime.fromtimestamp(t, SH).strftime("%Y-%m-%d %H:%M")


@pytest.fixture(autouse=True)
def _no_notifier_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env(monkeypatch, tmp_path)


def routes_file(tmp_path: Path, text: str = QUIET_A_SHARE) -> Path:
    path = tmp_path / "routes.toml"
    path.write_text(text, encoding="utf-8")
    return path


def quiet(**table: Any) -> Quiet:
    q = Quiet.model_validate(table)
    q.bind(SessionBook.builtin())
    return q


async def digest_groups(rig) -> dict[str, float]:
    return {
        g.decode(): due for g, due in await rig.redis.zrange(KEYS.digests, 0, -1, withscores=True)
    }


# ---------------------------------------------------------------------------- the decision
def test_when_the_digest_goes() -> None:
    a_share = quiet(deliver_during=["cn_a_share"], digest_at="08:45")
    assert a_share.held_until(at("2026-06-01 10:00")) is None  # open: send now
    # the lunch break: no 08:45 comes before the 13:00 open
    assert hhmm(a_share.held_until(at("2026-06-01 12:00"))) == "2026-06-01 13:00"
    assert hhmm(a_share.held_until(at("2026-06-01 20:00"))) == "2026-06-02 08:45"
    # Friday evening: 08:45 on Monday, not on Saturday
    assert hhmm(a_share.held_until(at("2026-06-05 16:00"))) == "2026-06-08 08:45"
    # the Spring Festival: the morning trading resumes
    assert hhmm(a_share.held_until(at("2026-02-13 16:00"))) == "2026-02-24 08:45"
    # between 08:45 and the open: when it opens
    assert hhmm(a_share.held_until(at("2026-06-02 09:00"))) == "2026-06-02 09:30"
    # without digest_at: when the next window opens, any of them
    desk = quiet(deliver_during=["cn_a_share", "cn_futures_night"], night_end="02:30")
    assert desk.held_until(at("2026-06-02 01:00")) is None  # Monday's night session
    assert hhmm(desk.held_until(at("2026-06-01 15:30"))) == "2026-06-01 21:00"
    assert hhmm(desk.held_until(at("2026-06-02 03:00"))) == "2026-06-02 09:30"
    # hours, every day, in tz
    hours = quiet(deliver_during=["08:00-22:00"], tz="Asia/Shanghai")
    assert hours.held_until(at("2026-06-06 21:59")) is None
    assert hhmm(hours.held_until(at("2026-06-06 23:00"))) == "2026-06-07 08:00"
    assert quiet(deliver_during=["always"]).held_until(at("2026-06-06 23:00")) is None


def test_groups_tell_quiet_holds_from_rate_limits() -> None:
    q = quiet(deliver_during=["cn_a_share"])
    group = q.group("email", ["me@example.com"])
    assert group.startswith("email.quiet-") and is_quiet_group(group)
    assert q.group("desk", ["me@example.com"]).startswith("desk.quiet-")
    assert q.group("email", ["x@example.com"]) != group  # per recipients
    assert not is_quiet_group("qq.0123456789abcdef")


# ---------------------------------------------------------------------------- delivering
async def test_held_outside_the_session_sent_at_once_inside(make_rig, smtp_server, tmp_path):
    clock = FakeClock(at("2026-06-01 10:00"))  # Monday morning session
    rig = make_rig(smtp_server, clock, routes_file=routes_file(tmp_path))
    await rig.deliver(rig.event("q1", strategy="grid_btc"))
    assert set(delivered(smtp_server)) == {"q1"}

    clock.advance(2 * 3600)  # 12:00, the lunch break
    await rig.deliver(rig.event("q2", strategy="grid_btc"))
    await rig.deliver(rig.event("other", strategy="ma_cross"))  # a route without quiet hours
    assert set(delivered(smtp_server)) == {"q1", "other"}
    ((group, due),) = (await digest_groups(rig)).items()
    assert is_quiet_group(group) and hhmm(due) == "2026-06-01 13:00"
    assert [o.status for o in rig.outcomes if o.event_id == "q2"] == ["held"]

    clock.advance(3600 - 1)
    assert await rig.run_digest() is False
    clock.advance(1)  # 13:00
    assert await rig.run_digest() is True
    (digest,) = [m for m in smtp_server.messages if is_digest(m)]
    assert ids_in(digest) == ["q2"]
    assert "quiet hours until 13:00" in text_of(digest)
    assert "rate limit" not in text_of(digest)
    # the held event's latency runs from the digest, not from 12:00
    (done,) = [o for o in rig.outcomes if o.event_id == "q2" and o.status == "digest"]
    assert done.latency < 1.0
    assert await rig.leftovers() == {}


async def test_critical_and_digest_false_are_never_held(make_rig, smtp_server, tmp_path):
    clock = FakeClock(at("2026-06-01 20:00"))
    rig = make_rig(smtp_server, clock, routes_file=routes_file(tmp_path))
    await rig.deliver(
        rig.event("c1", strategy="grid_btc", severity="critical"),
        rig.event("w1", strategy="grid_btc", severity="warning"),
        rig.event("l1", strategy="loud_x"),
    )
    assert set(delivered(smtp_server)) == {"c1", "l1"}
    ((_group, due),) = (await digest_groups(rig)).items()
    assert hhmm(due) == "2026-06-02 08:45"


async def test_the_digest_goes_at_digest_at_with_every_held_event(
    make_rig, smtp_server, tmp_path, caplog
):
    clock = FakeClock(at("2026-06-05 16:00"))  # Friday after the close
    rig = make_rig(smtp_server, clock, routes_file=routes_file(tmp_path), locale="zh")
    for i, step in enumerate((0, 6 * 3600, 20 * 3600, 24 * 3600)):  # into Sunday
        clock.advance(step)
        await rig.deliver(rig.event(f"h{i}", strategy=f"grid_{i % 2}", kind="fill"))
    assert delivered(smtp_server) == {}
    groups = await digest_groups(rig)
    assert len(groups) == 1 and hhmm(next(iter(groups.values()))) == "2026-06-08 08:45"
    assert (await rig.queue.depths()).held == 4

    clock.t = at("2026-06-08 08:44:59")
    assert await rig.run_digest() is False
    clock.t = at("2026-06-08 08:45")
    with caplog.at_level("WARNING", logger="worker.deliver"):
        assert await rig.run_digest() is True
    assert await rig.run_digest() is False
    (digest,) = smtp_server.messages
    assert is_digest(digest) and ids_in(digest) == ["h0", "h1", "h2", "h3"]
    assert "静默时段至 08:45" in text_of(digest)
    assert not [r for r in caplog.records if "SLOW" in r.getMessage()]  # chosen, not slow
    assert await rig.leftovers() == {}


async def test_each_channel_copy_waits_in_its_own_group(make_rig, smtp_server, tmp_path):
    desk = ListChannel(ListChannelSettings(name="desk"), priority=0)
    path = routes_file(
        tmp_path,
        '[default]\nchannels = ["email", "desk"]\n'
        '[default.quiet]\ndeliver_during = ["09:00-17:00"]\ntz = "Asia/Shanghai"\n',
    )
    clock = FakeClock(at("2026-06-06 18:00"))  # hours: every day, Saturday too
    rig = make_rig(smtp_server, clock, channels=[desk], routes_file=path)
    await rig.deliver(rig.event("f1"), rig.event("f2"))
    assert delivered(smtp_server) == {} and desk.sent == []
    groups = await digest_groups(rig)
    assert sorted(g.split(".quiet-")[0] for g in groups) == ["desk", "email"]
    assert {hhmm(due) for due in groups.values()} == {"2026-06-07 09:00"}

    clock.t = at("2026-06-07 09:00")
    assert await rig.run_digest() and await rig.run_digest()
    (mail,) = smtp_server.messages
    assert sorted(ids_in(mail)) == ["f1", "f2"]  # (the same ts)
    ((_to, text),) = desk.sent
    assert "[DIGEST] 2 alerts" in text and "quiet hours until 09:00" in text
    # inside the hours both go at once, one delivery each
    await rig.deliver(rig.event("f3"))
    assert "f3" in delivered(smtp_server) and len(desk.sent) == 2
    assert await rig.leftovers() == {}


async def test_stats_shows_what_is_held_and_why(make_rig, smtp_server, tmp_path):
    clock = FakeClock(at("2026-06-01 20:00"))
    rig = make_rig(smtp_server, clock, routes_file=routes_file(tmp_path), smtp_rate_per_minute=1)
    await rig.deliver(rig.event("s1", strategy="grid_btc"), rig.event("s2", strategy="grid_a"))
    # a rate-limited group beside it: ma_cross has no quiet hours, 1/min
    await rig.deliver(rig.event("r1", strategy="ma_cross"), rig.event("r2", strategy="ma_cross"))
    assert set(delivered(smtp_server)) == {"r1"}
    clock.advance(600)
    views = await _held_view(rig.queue, clock.time())
    by_why = {v["why"]: v for v in views}
    assert set(by_why) == {"quiet hours", "rate limit"}
    q = by_why["quiet hours"]
    assert (q["account"], q["events"], q["oldest_age_s"]) == ("email", 2, 600.0)
    assert hhmm(q["due_at"]) == "2026-06-02 08:45"
    assert q["due_in_s"] == at("2026-06-02 08:45") - clock.time()
    assert by_why["rate limit"]["events"] == 1
    assert views[0]["why"] == "rate limit"  # soonest first
    line = _held_line(q)
    assert line.startswith("held for a digest: e-mail: 2 event(s), oldest 10m00s, sent at ")
    assert line.endswith("(in 12h35m) (quiet hours)")
    assert _held_line(by_why["rate limit"]).endswith("(rate limit)")


# ---------------------------------------------------------------------------- the routes file
@pytest.mark.parametrize(
    ("quiet_table", "says"),
    [
        ('deliver_during = ["cn_ashare"]', "no session named 'cn_ashare'; known: cn_a_share"),
        ('deliver_during = ["cn_futures_night"]', 'set night_end = "23:00", "01:00" or "02:30"'),
        ('deliver_during = ["cn_a_share"]\ndigest_at = "8.45"', '"HH:MM", e.g. "08:45"'),
        ('deliver_during = ["9-17"]', 'is not "HH:MM-HH:MM"'),
        ('deliver_during = ["09:00-17:00"]', "tz is missing: hours and digest_at are clock"),
        ('deliver_during = ["cn_a_share"]\ntz = "Beijing"', "'Beijing' is not a known time zone"),
        ("deliver_during = []", "deliver_during"),
        ('deliver_during = "cn_a_share"\nnight_end = "22:00"', "night_end '22:00' is not one of"),
        ('deliver_during = ["cn_a_share"]\ndigest = "08:45"', "digest"),
    ],
)
def test_a_bad_quiet_table_is_one_clear_line(tmp_path, quiet_table: str, says: str) -> None:
    path = routes_file(tmp_path, f'[[route]]\nname = "grid"\n[route.quiet]\n{quiet_table}\n')
    with pytest.raises(ValueError) as info:
        load_routes(path, ALLOWED, SessionBook.builtin())
    msg = str(info.value)
    assert msg.startswith(f"NOTIFIER_ROUTES_FILE={path}: ") and "\n" not in msg, msg
    assert says in msg, msg


def test_quiet_needs_digests_and_knows_user_sessions(tmp_path) -> None:
    path = routes_file(
        tmp_path,
        '[[route]]\nname = "x"\ndigest = false\n[route.quiet]\ndeliver_during = "always"\n',
    )
    with pytest.raises(ValueError, match="route 'x': quiet hours hold events for a digest"):
        load_routes(path, ALLOWED, SessionBook.builtin())
    mine = routes_file(tmp_path, '[default]\n[default.quiet]\ndeliver_during = ["gold_night"]\n')
    with pytest.raises(ValueError, match="route 'default': quiet: no session named 'gold_night'"):
        load_routes(mine, ALLOWED, SessionBook.builtin())
    book = SessionBook.load(
        [{"name": "gold_night", "tz": "Asia/Shanghai", "hours": "21:00-02:30",
          "calendar": "XSHG", "belongs_to": "next"}],
        "NOTIFIER_WATCH_FILE=w.toml",
    )  # fmt: skip
    routes = load_routes(mine, ALLOWED, book)
    assert routes.default is not None and routes.default.quiet is not None
    assert routes.default.quiet.held_until(at("2026-06-05 23:00")) is None  # Friday night
    assert hhmm(routes.default.quiet.held_until(at("2026-06-06 10:00"))) == "2026-06-08 21:00"


def test_the_example_routes_file_is_valid() -> None:
    path = REPO_ROOT / "deploy/examples/routes.toml"
    allowed = frozenset({"desk@example.com", "me@example.com", "fills@example.com"})
    routes = load_routes(path, allowed, SessionBook.builtin())
    (quiet_route,) = [r for r in routes.all() if r.quiet is not None]
    assert quiet_route.quiet.held_until(at("2026-06-01 22:30")) is None  # the night session
    assert hhmm(quiet_route.quiet.held_until(at("2026-06-01 23:30"))) == "2026-06-02 08:45"
