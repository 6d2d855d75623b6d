"""Sessions and trading-day calendars (worker/sessions.py), all with explicit timestamps: the
lunch break, night sessions past midnight (01:00, 02:30, Friday night into Saturday), no night
session before a holiday, make-up and typhoon days, the US DST changes, next_window across a
weekend and the Spring Festival, known_until, half days, and the one-line errors of
[[session]] tables."""

from __future__ import annotations

import math
import time
from datetime import date, datetime
from importlib.metadata import version
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from worker.sessions import ALWAYS, SessionBook, Window, calendar

SH = ZoneInfo("Asia/Shanghai")
HK = ZoneInfo("Asia/Hong_Kong")
NY = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")
BOOK = SessionBook.builtin()
WHERE = "NOTIFIER_WATCH_FILE=/etc/notifier/watch.toml"


def at(text: str, tz: ZoneInfo = SH) -> float:
    """'2026-06-01 09:30' in ``tz`` -> unix seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=tz).timestamp()


def win(start: str, end: str, tz: ZoneInfo = SH) -> Window:
    return Window(at(start, tz), at(end, tz))


def night(end: str):
    return BOOK.get("cn_futures_night", night_end=end)


def user(**table: Any):
    return SessionBook.load([{"name": "mine", "tz": "Asia/Shanghai", **table}], WHERE).get("mine")


# ---------------------------------------------------------------------------- day sessions
def test_a_share_lunch_break_is_closed() -> None:
    s = BOOK.get("cn_a_share")
    morning = win("2026-06-01 09:30", "2026-06-01 11:30")
    assert s.window_at(at("2026-06-01 09:29:59")) is None
    assert s.window_at(at("2026-06-01 09:30")) == morning
    assert s.window_at(at("2026-06-01 11:29:59")) == morning
    assert s.window_at(at("2026-06-01 11:30")) is None
    assert not s.is_open(at("2026-06-01 12:15"))
    assert s.next_window(at("2026-06-01 12:15")) == win("2026-06-01 13:00", "2026-06-01 15:00")
    assert s.is_open(at("2026-06-01 13:00"))
    assert not s.is_open(at("2026-06-01 15:00"))


def test_futures_day_session_has_its_morning_break() -> None:
    s = BOOK.get("cn_futures_day")
    assert s.window_at(at("2026-06-01 10:00")) == win("2026-06-01 09:00", "2026-06-01 10:15")
    assert s.window_at(at("2026-06-01 10:20")) is None
    assert s.next_window(at("2026-06-01 10:20")) == win("2026-06-01 10:30", "2026-06-01 11:30")
    assert s.next_window(at("2026-06-01 11:45")) == win("2026-06-01 13:30", "2026-06-01 15:00")


def test_next_window_across_a_weekend() -> None:
    s = BOOK.get("cn_a_share")
    friday_close = at("2026-06-05 15:00")
    assert s.next_window(friday_close) == win("2026-06-08 09:30", "2026-06-08 11:30")
    assert not s.is_open(at("2026-06-06 10:00"))  # Saturday


def test_spring_festival_2026_and_the_weekend_workdays_stay_closed() -> None:
    s = BOOK.get("cn_a_share")
    # the last trading day before the holiday is Friday 13 Feb; trading resumes Tue 24 Feb
    assert s.next_window(at("2026-02-13 15:00")) == win("2026-02-24 09:30", "2026-02-24 11:30")
    # Saturday 14 Feb and 28 Feb are State Council make-up working days, not trading days
    for day in ("2026-02-14", "2026-02-28"):
        assert not s.is_open(at(f"{day} 10:00"))
    assert not s.is_open(at("2024-02-09 10:00"))  # CNY eve 2024: a workday, yet closed
    assert s.is_open(at("2024-02-08 10:00"))


# ---------------------------------------------------------------------------- night sessions
def test_night_session_to_0100_crosses_midnight() -> None:
    s = night("01:00")
    tuesday_night = win("2026-06-02 21:00", "2026-06-03 01:00")
    assert s.window_at(at("2026-06-02 20:59:59")) is None
    assert s.window_at(at("2026-06-02 23:30")) == tuesday_night
    assert s.window_at(at("2026-06-03 00:59:59")) == tuesday_night
    assert s.window_at(at("2026-06-03 01:00")) is None
    assert s.next_window(at("2026-06-03 01:00")) == win("2026-06-03 21:00", "2026-06-04 01:00")


def test_friday_night_session_runs_into_saturday_0230() -> None:
    s = night("02:30")
    friday_night = win("2026-06-05 21:00", "2026-06-06 02:30")
    assert s.window_at(at("2026-06-06 02:00")) == friday_night  # Saturday, 02:00
    assert s.window_at(at("2026-06-06 02:30")) is None
    # Saturday and Sunday evenings have none: next is Monday evening
    assert s.next_window(at("2026-06-06 02:30")) == win("2026-06-08 21:00", "2026-06-09 02:30")


def test_night_session_ending_2300() -> None:
    s = night("23:00")
    assert s.window_at(at("2026-06-02 22:59")) == win("2026-06-02 21:00", "2026-06-02 23:00")
    assert not s.is_open(at("2026-06-02 23:00"))


def test_no_night_session_before_national_day() -> None:
    s = night("02:30")
    assert s.is_open(at("2026-09-29 22:00"))  # opens Wednesday 30 Sep's trading day
    assert not s.is_open(at("2026-09-30 22:00"))  # the eve of the holiday: none
    assert not s.is_open(at("2026-10-01 01:00"))
    # National Day runs to Wed 7 Oct (Sat 10 Oct is a workday, not a trading day): the
    # first night session is the evening of Thursday 8 Oct
    assert s.next_window(at("2026-09-30 15:00")) == win("2026-10-08 21:00", "2026-10-09 02:30")


def test_no_night_session_before_a_monday_holiday_nor_on_its_evening() -> None:
    s = night("23:00")
    assert not s.is_open(at("2026-04-03 21:30"))  # Friday before Mon 6 Apr (Qingming)
    assert not s.is_open(at("2026-04-06 21:30"))  # the holiday's own evening
    assert s.next_window(at("2026-04-03 15:00")) == win("2026-04-07 21:00", "2026-04-07 23:00")
    assert not s.is_open(at("2026-06-18 21:30"))  # Thursday before Fri 19 Jun (Dragon Boat)
    assert s.is_open(at("2026-06-17 21:30"))


def test_night_session_needs_its_end() -> None:
    with pytest.raises(ValueError, match='set night_end = "23:00", "01:00" or "02:30" in the rule'):
        BOOK.get("cn_futures_night")
    with pytest.raises(ValueError, match="'22:00' is not one of them"):
        BOOK.get("cn_futures_night", night_end="22:00")
    # night_end means nothing to the other sessions, and the same session object is shared
    assert BOOK.get("cn_a_share", night_end="23:00") is BOOK.get("cn_a_share")
    assert night("01:00") is night("01:00") and night("01:00") is not night("02:30")


# ---------------------------------------------------------------------------- user sessions
def test_make_up_trading_day_via_open() -> None:
    s = user(hours=["09:30-11:30"], calendar="XSHG", open=["2026-10-10"])
    saturday = at("2026-10-10 10:00")
    assert s.is_open(saturday)
    assert not BOOK.get("cn_a_share").is_open(saturday)
    assert not s.is_open(at("2026-10-17 10:00"))  # any other Saturday
    assert s.next_window(at("2026-10-09 12:00")) == win("2026-10-10 09:30", "2026-10-10 11:30")


def test_typhoon_closed_date() -> None:
    s = SessionBook.load(
        [
            {
                "name": "hk_typhoon",
                "tz": "Asia/Hong_Kong",
                "hours": ["09:30-12:00", "13:00-16:00"],
                "calendar": "XHKG",
                "closed": ["2026-09-16"],
            }
        ],
        WHERE,
    ).get("hk_typhoon")
    assert not s.is_open(at("2026-09-16 10:00", HK))
    assert s.is_open(at("2026-09-15 10:00", HK)) and s.is_open(at("2026-09-17 10:00", HK))
    assert s.next_window(at("2026-09-15 16:00", HK)) == win(
        "2026-09-17 09:30", "2026-09-17 12:00", HK
    )


def test_closed_date_of_a_night_session_removes_the_evening_before() -> None:
    s = user(hours=["21:00-02:30"], calendar="XSHG", belongs_to="next", closed=["2026-09-16"])
    assert s.is_open(at("2026-09-14 22:00"))
    assert not s.is_open(at("2026-09-15 22:00"))  # it belonged to 16 Sep
    assert not s.is_open(at("2026-09-16 22:00"))  # 16 Sep did not trade
    assert s.is_open(at("2026-09-17 22:00"))


def test_user_session_without_calendar_uses_its_days() -> None:
    s = user(hours="10:00-11:00", days=["sat", "Sunday"])
    assert s.is_open(at("2026-06-06 10:30")) and s.is_open(at("2026-06-07 10:30"))
    assert not s.is_open(at("2026-06-08 10:30"))
    assert not user(hours="10:00-11:00").is_open(at("2026-06-06 10:30"))  # mon-fri default


def test_touching_periods_are_one_window() -> None:
    s = user(hours=["09:00-12:00", "12:00-15:00"])
    w = win("2026-06-01 09:00", "2026-06-01 15:00")
    assert s.window_at(at("2026-06-01 10:00")) == w
    assert s.window_at(at("2026-06-01 13:00")) == w
    # next_window from inside the run skips its second half
    assert s.next_window(at("2026-06-01 10:00")) == win("2026-06-02 09:00", "2026-06-02 15:00")


# ---------------------------------------------------------------------------- other markets
def test_us_equity_open_follows_daylight_saving_time() -> None:
    s = BOOK.get("us_equity")

    def opens(day: str) -> datetime:
        w = s.next_window(at(f"{day} 00:00", NY))
        assert w is not None
        return datetime.fromtimestamp(w.start, UTC)

    # spring forward on Sunday 2026-03-08: 14:30 UTC on Friday, 13:30 UTC on Monday
    assert opens("2026-03-06") == datetime(2026, 3, 6, 14, 30, tzinfo=UTC)
    assert opens("2026-03-09") == datetime(2026, 3, 9, 13, 30, tzinfo=UTC)
    # fall back on Sunday 2026-11-01
    assert opens("2026-10-30") == datetime(2026, 10, 30, 13, 30, tzinfo=UTC)
    assert opens("2026-11-02") == datetime(2026, 11, 2, 14, 30, tzinfo=UTC)
    # and across the change weekend itself
    friday_close = at("2026-03-06 16:00", NY)
    assert s.next_window(friday_close) == win("2026-03-09 09:30", "2026-03-09 16:00", NY)
    assert s.next_window(friday_close).end - s.next_window(friday_close).start == 6.5 * 3600


def test_half_days_are_modelled_for_hong_kong_and_new_york() -> None:
    hk, us = BOOK.get("hk_equity"), BOOK.get("us_equity")
    assert hk.window_at(at("2026-12-24 11:00", HK)) == win(
        "2026-12-24 09:30", "2026-12-24 12:00", HK
    )
    assert not hk.is_open(at("2026-12-24 13:30", HK))
    assert hk.is_open(at("2026-12-23 13:30", HK))
    assert us.window_at(at("2026-11-27 12:00", NY)) == win(
        "2026-11-27 09:30", "2026-11-27 13:00", NY
    )
    assert not us.is_open(at("2026-11-27 13:30", NY))
    assert not us.is_open(at("2026-11-26 12:00", NY))  # Thanksgiving


def test_always_and_crypto_are_one_endless_window() -> None:
    for name in ("always", "crypto"):
        s = BOOK.get(name)
        assert s.window_at(at("2026-06-06 03:00")) == ALWAYS
        assert s.is_open(0.0)
        assert s.next_window(at("2026-06-06 03:00")) is None
    assert ALWAYS.start == -math.inf and ALWAYS.end == math.inf


# ---------------------------------------------------------------------------- calendars
def test_known_until_comes_from_the_library() -> None:
    xshg = calendar("XSHG")
    assert xshg.known_until is not None
    assert (xshg.known_until.month, xshg.known_until.day) == (12, 31)
    if version("holidays").startswith("0.109"):
        assert xshg.known_until == date(2026, 12, 31)
    assert xshg.source == f"holidays {version('holidays')} (financial calendar XSHG)"
    assert calendar("XNYS").known_until is None and calendar("XHKG").known_until is None
    assert BOOK.get("cn_futures_night", night_end="02:30").calendar is xshg


def test_check_warns_30_days_before_a_watched_calendar_runs_out() -> None:
    end = calendar("XSHG").known_until
    assert end is not None
    names = ["cn_a_share", "cn_futures_night", "us_equity", "always"]
    assert set(BOOK.calendars_in_use(names)) == {"XSHG", "XNYS"}
    assert BOOK.calendar_warnings(names, date.fromordinal(end.toordinal() - 31)) == []
    lines = BOOK.calendar_warnings(names, date.fromordinal(end.toordinal() - 30))
    assert len(lines) == 1 and "XSHG" in lines[0] and end.isoformat() in lines[0]
    assert "pip install -U holidays" in lines[0]
    assert BOOK.calendar_warnings(["us_equity", "hk_equity"], end) == []


# ---------------------------------------------------------------------------- the book
def ok(**extra: Any) -> dict[str, Any]:
    return {"tz": "Asia/Shanghai", "hours": ["09:30-11:30"], **extra}


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"hours": ["09:30-11:30"]}, 'tz is missing; add e.g. tz = "Asia/Shanghai"'),
        (ok(tz="Shanghai"), "'Shanghai' is not a known time zone"),
        ({"tz": "Asia/Shanghai"}, "hours is missing or empty"),
        (ok(hours=["9.30-11.30"]), 'is not "HH:MM-HH:MM"'),
        (ok(hours=["09:30-24:00"]), 'midnight is "00:00"'),
        (ok(days=["mon", "fri-day"]), "days: 'fri-day' is not a day"),
        (ok(calendar="SSE"), "calendar 'SSE' is not known; use XSHG, XHKG, XNYS or none"),
        (ok(belongs_to="previous"), 'belongs_to \'previous\' is not "same" or "next"'),
        (ok(closed=["16/09/2026"]), "closed: '16/09/2026' is not a date"),
        (ok(closed=["2026-09-16"], open=["2026-09-16"]), "2026-09-16 is both in closed and in"),
        (ok(hour="x"), "unknown key 'hour'"),
    ],
)
def test_a_bad_session_table_is_one_clear_line(table: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError) as info:
        SessionBook.load([{"name": "mine", **table}], WHERE)
    msg = str(info.value)
    assert msg.startswith(f"{WHERE}: session 'mine': ") and "\n" not in msg
    assert says in msg


def test_session_names_are_checked() -> None:
    with pytest.raises(ValueError, match="'cn_a_share': that is a built-in session"):
        SessionBook.load([ok(name="cn_a_share")], WHERE)
    with pytest.raises(ValueError, match="'x': defined twice"):
        SessionBook.load([ok(name="x"), ok(name="x")], WHERE)
    with pytest.raises(ValueError, match="session #1: name None is missing"):
        SessionBook.load([ok()], WHERE)
    book = SessionBook.load([ok(name="x")], WHERE)
    assert book.names()[-1] == "x" and "cn_a_share" in book.names()
    with pytest.raises(ValueError, match=r"no session named 'y'; known: cn_a_share, .*, x"):
        book.get("y")


def test_every_second_for_a_hundred_strategies_is_cheap() -> None:
    """One shared session per name: 100 rules x one call a second for a trading day,
    through the lunch break (a cold cache included)."""
    s = SessionBook.builtin().get("cn_a_share")
    t0 = at("2026-06-01 09:00")
    began = time.perf_counter()
    opened = 0
    for second in range(0, 7 * 3600):
        t = t0 + second
        for _ in range(100):
            opened += s.window_at(t) is not None
    took = time.perf_counter() - began
    assert opened == 100 * 4 * 3600  # 09:30-11:30 and 13:00-15:00
    assert took < 3.0, took
