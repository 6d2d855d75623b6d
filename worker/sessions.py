"""Trading sessions and trading-day calendars: when is a market open?

Two users ask, about once a second each: the watch (silence matters only while a
strategy's session is open) and quiet hours (a route holds non-critical events outside its
sessions). Both need "the open period containing t, if any" and "the next one after t", so
that is the whole surface of a :class:`Session`; a :class:`SessionBook` holds the built-in
sessions and the user's ``[[session]]`` tables and hands out one shared :class:`Session`
per name, whose per-day windows are cached.

Built-in sessions (each in its exchange's time zone):

==================  ==========================================================  =========
name                open (local time)                                           calendar
==================  ==========================================================  =========
cn_a_share          09:30-11:30, 13:00-15:00 Asia/Shanghai                      XSHG
cn_futures_day      09:00-10:15, 10:30-11:30, 13:30-15:00 Asia/Shanghai         XSHG
cn_futures_night    21:00 to ``night_end`` (23:00, 01:00 or 02:30), belongs to  XSHG
                    the next trading day (see below)
hk_equity           09:30-12:00, 13:00-16:00 Asia/Hong_Kong; half days          XHKG
                    (Christmas Eve, New Year's Eve, Lunar New Year's Eve):
                    the morning only
us_equity           09:30-16:00 America/New_York; half days (the day after      XNYS
                    Thanksgiving, Christmas Eve, 3 July): to 13:00
crypto, always      all the time: one window from -inf to +inf
==================  ==========================================================  =========

A night session belongs to the next trading day: the evening of day D has one iff D is a
trading day and nothing but non-trading weekdays-off (weekends) lies between D and the next
trading day. So Friday night exists (it opens Monday's trading day); the evening before a
holiday has none (2026-09-30 before National Day, a Friday before a Monday holiday), nor the
last evening of a holiday. The cn futures night session is the same for every product group
but its end: a rule picks it (``night_end``).

Calendars come from the financial calendars of the ``holidays`` package: XSHG (Shanghai;
the Shenzhen exchange and the futures exchanges keep the same trading days), XHKG, XNYS.
Exchanges are closed on weekends, also on the Saturdays that the State Council makes
working days. China's holidays are arranged each year by the State Council (published in
November for the next year): :attr:`Calendar.known_until` is the end of the last year whose
arrangement the installed ``holidays`` release holds (the newest year of its table of
substituted days); later years are the library's rule-based estimates, without the
substituted days off, and ``notifier check`` warns 30 days before a watched calendar runs
out (upgrade ``holidays``). XHKG and XNYS follow fixed rules (Gregorian, Easter, lunar
dates) that the library computes for any year: their ``known_until`` is None. Ad-hoc
closures (typhoons, national mourning) are known to no library: a user session's
``closed`` list names them.

User-defined sessions (the watch file's ``[[session]]`` tables)::

    [[session]]
    name = "shfe_gold_night"
    tz = "Asia/Shanghai"
    hours = ["21:00-02:30"]          # an end at or before the start ends the next day
    days = ["mon", "tue", "wed", "thu", "fri"]   # the default
    calendar = "XSHG"                # XSHG | XHKG | XNYS | none (the default: every listed day)
    belongs_to = "next"              # "same" (the default) or "next" (the night rule above)
    closed = ["2026-09-16"]          # extra closed days (a typhoon)
    open = ["2026-10-10"]            # extra open days (make-up trading days, even on a weekend)

With ``belongs_to = "next"`` the dates in ``closed`` and ``open`` name trading days: closing
2026-09-16 also removes the evening of 09-15 (which belongs to it). Half days are modelled
for the built-in hk_equity and us_equity only; a user session with a calendar trades its
full hours on a half day. Periods that touch or overlap (``"09:00-12:00", "12:00-15:00"``)
are one window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from importlib.metadata import version
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

__all__ = [
    "ALWAYS",
    "BUILTIN",
    "CALENDARS",
    "NIGHT_ENDS",
    "Calendar",
    "Period",
    "Session",
    "SessionBook",
    "Window",
    "calendar",
    "parse_hours",
    "parse_zone",
]

# How far ahead next_window looks, and how far a run of touching windows is followed.
HORIZON_DAYS = 400
# Day windows kept per session (a year and a bit: next_window across a long holiday and
# the dates of a month of evaluations, without growing for ever).
_DAY_CACHE = 512

CALENDARS = ("XSHG", "XHKG", "XNYS")
NIGHT_ENDS = ("23:00", "01:00", "02:30")
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_FULL_DAY_NAMES = {f"{d}day": d for d in ("mon", "fri", "sun")} | {
    "tuesday": "tue",
    "wednesday": "wed",
    "thursday": "thu",
    "saturday": "sat",
}
WEEKDAYS = frozenset(range(5))
_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Window:
    """One open period in unix seconds, ``start <= t < end``. The ``always`` window is
    ``(-inf, +inf)``: ``max(last_seen, window.start, ...)`` needs no special case."""

    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t < self.end


ALWAYS = Window(-math.inf, math.inf)


# ---------------------------------------------------------------------------- calendars
class Calendar:
    """An exchange's trading days: Monday to Friday except its holidays (``holidays``)."""

    __slots__ = ("_years", "half_days", "known_until", "name", "source")

    def __init__(self, name: str) -> None:
        self.name = name
        self.source = f"holidays {version('holidays')} (financial calendar {name})"
        self._years: dict[int, tuple[frozenset[date], frozenset[date]]] = {}
        empty = holidays.financial_holidays(name, years=())
        self.half_days = "half_day" in empty.supported_categories
        self.known_until = _known_until(name, empty)

    def is_trading_day(self, d: date) -> bool:
        return d.weekday() < 5 and d not in self._year(d.year)[0]

    def is_half_day(self, d: date) -> bool:
        """A shortened trading day (the exchange closes early); False on a closed day."""
        return self.is_trading_day(d) and d in self._year(d.year)[1]

    def _year(self, year: int) -> tuple[frozenset[date], frozenset[date]]:
        # one holidays object per year (~40 ms for XSHG), computed on first use
        cached = self._years.get(year)
        if cached is None:
            closed = frozenset(holidays.financial_holidays(self.name, years=year))
            half: frozenset[date] = frozenset()
            if self.half_days:
                half = frozenset(
                    holidays.financial_holidays(self.name, years=year, categories=("half_day",))
                )
            cached = self._years[year] = (closed, half)
        return cached

    def __repr__(self) -> str:
        return f"Calendar({self.name!r})"


def _known_until(name: str, empty: holidays.HolidayBase) -> date | None:
    """The last day whose holidays are officially known, from the library's own data.

    XSHG: China's State Council arranges each year's holidays and the days off they swap
    with weekends; the library keeps them as a table of special (substituted) holidays by
    year, so the newest year in that table is the last year it knows. The others are
    rule-based (None)."""
    if name != "XSHG":
        return None
    table: dict[int, Any] = getattr(empty, "special_public_holidays", {})
    return date(max(table), 12, 31) if table else None


_CALENDAR_CACHE: dict[str, Calendar] = {}


def calendar(name: str) -> Calendar:
    """The shared calendar named ``name`` (one of :data:`CALENDARS`)."""
    if name not in CALENDARS:
        raise ValueError(f"no calendar named {name!r}; known: {', '.join(CALENDARS)}")
    cal = _CALENDAR_CACHE.get(name)
    if cal is None:
        cal = _CALENDAR_CACHE[name] = Calendar(name)
    return cal


# ---------------------------------------------------------------------------- periods
@dataclass(frozen=True, slots=True)
class Period:
    """Local clock times in minutes after midnight; ``end <= start`` ends the next day."""

    start: int
    end: int

    @property
    def overnight(self) -> bool:
        return self.end <= self.start

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def parse_clock(text: str) -> int:
    """``"HH:MM"`` -> minutes after midnight; ValueError naming the form otherwise."""
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", text)
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ValueError(f'{text!r} is not a time of day; write "HH:MM", e.g. "08:45"')
    return int(m.group(1)) * 60 + int(m.group(2))


def parse_hours(text: str) -> Period:
    """``"HH:MM-HH:MM"`` -> a :class:`Period`; ValueError naming the form otherwise."""
    m = _HOURS.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(
            f'hours {text!r} is not "HH:MM-HH:MM"; write e.g. "09:30-11:30" '
            '(an end at or before the start ends the next day: "21:00-02:30")'
        )
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(
            f"hours {text!r}: a time is out of range; hours 00-23, minutes 00-59 "
            '(midnight is "00:00")'
        )
    return Period(h1 * 60 + m1, h2 * 60 + m2)


def parse_zone(text: Any) -> ZoneInfo:
    """An IANA time zone; ValueError naming the form otherwise."""
    try:
        if not isinstance(text, str) or not text or text != text.strip():
            raise ValueError
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f'tz {text!r} is not a known time zone; use an IANA name such as "Asia/Shanghai", '
            '"Asia/Hong_Kong" or "America/New_York"'
        ) from None


# ---------------------------------------------------------------------------- sessions
class Session:
    """When one market (or one user-defined schedule) is open.

    The windows of each day are computed once and cached; :meth:`window_at` remembers its
    last answer and the span it holds for (the open window, or the gap up to the next
    one), so calling it every second for every watched strategy costs a comparison."""

    def __init__(
        self,
        name: str,
        tz: ZoneInfo,
        periods: Iterable[Period] = (),
        *,
        calendar: Calendar | None = None,
        days: frozenset[int] = WEEKDAYS,
        belongs_to_next: bool = False,
        extra_closed: frozenset[date] = frozenset(),
        extra_open: frozenset[date] = frozenset(),
        half_day_close: int | None = None,
        always: bool = False,
    ) -> None:
        self.name = name
        self.tz = tz
        self.calendar = calendar
        self.periods = tuple(periods)
        self.days = days
        self.belongs_to_next = belongs_to_next
        self.extra_closed = extra_closed  # the user's closed dates
        self.extra_open = extra_open  # the user's open dates (make-up trading days)
        self.half_day_close = half_day_close
        self.always = always
        self._day_cache: dict[date, tuple[Window, ...]] = {}
        self._memo: tuple[float, float, Window | None] | None = None

    def __repr__(self) -> str:
        return f"Session({self.name!r})"

    def describe(self) -> str:
        """One line for people: hours, time zone, days."""
        if self.always:
            return "all the time"
        hours = ", ".join(str(p) for p in self.periods)
        if self.calendar is not None:
            days = f"{self.calendar.name} trading days"
        elif self.days == WEEKDAYS:
            days = "Monday to Friday"
        else:
            days = ", ".join(DAY_NAMES[d] for d in sorted(self.days))
        night = " (the evening before; none before a holiday)" if self.belongs_to_next else ""
        return f"{hours} {self.tz.key} on {days}{night}"

    # ------------------------------------------------------------------ days
    def is_open_day(self, d: date) -> bool:
        """Whether ``d`` is one of this session's trading days (its windows belong to it)."""
        if d in self.extra_open:
            return True
        if d in self.extra_closed or d.weekday() not in self.days:
            return False
        return self.calendar is None or self.calendar.is_trading_day(d)

    def _has_evening(self, d: date) -> bool:
        """belongs_to = next: the evening of ``d`` opens the next trading day, so it exists
        iff ``d`` trades and only days off by the week (not holidays) lie in between."""
        if not self.is_open_day(d):
            return False
        for i in range(1, 31):
            nxt = d + timedelta(days=i)
            if self.is_open_day(nxt):
                return True
            if nxt.weekday() in self.days:  # a listed day that is closed: a holiday
                return False
        return False

    def _windows_of(self, day: date) -> tuple[Window, ...]:
        """The windows whose local start falls on ``day`` (merged when they touch)."""
        cached = self._day_cache.get(day)
        if cached is not None:
            return cached
        if len(self._day_cache) >= _DAY_CACHE:
            self._day_cache.clear()
        out: list[Window] = []
        active = self._has_evening(day) if self.belongs_to_next else self.is_open_day(day)
        if active:
            close = None
            if (
                self.half_day_close is not None
                and self.calendar is not None
                and self.calendar.is_half_day(day)
            ):
                close = self.half_day_close
            for p in self.periods:
                end_min = p.end
                if close is not None and not p.overnight:
                    if p.start >= close:
                        continue
                    end_min = min(end_min, close)
                start = self._unix(day, p.start)
                end = self._unix(day + timedelta(days=1) if p.overnight else day, end_min)
                if end > start:
                    out.append(Window(start, end))
        result = tuple(_merge(out))
        self._day_cache[day] = result
        return result

    def _unix(self, day: date, minutes: int) -> float:
        return datetime.combine(day, time(minutes // 60, minutes % 60), self.tz).timestamp()

    def _date(self, t: float) -> date:
        return datetime.fromtimestamp(t, self.tz).date()

    # ------------------------------------------------------------------ windows
    def _raw_at(self, t: float) -> Window | None:
        day = self._date(t)
        for d in (day - timedelta(days=1), day):
            for w in self._windows_of(d):
                if w.start <= t < w.end:
                    return w
        return None

    def _grow(self, w: Window) -> Window:
        """``w`` with every window that touches or overlaps it, on either side (bounded)."""
        start, end = w.start, w.end
        for _ in range(HORIZON_DAYS):
            before = self._raw_at(start - 1e-6) if start > -math.inf else None
            if before is None or before.start >= start:
                break
            start = before.start
        for _ in range(HORIZON_DAYS):
            after = self._raw_at(end)
            if after is None or after.end <= end:
                break
            end = after.end
        return w if (start, end) == (w.start, w.end) else Window(start, end)

    def window_at(self, t: float) -> Window | None:
        """The open period containing ``t`` (``start <= t < end``), or None when closed."""
        if self.always:
            return ALWAYS
        memo = self._memo
        if memo is not None and memo[0] <= t < memo[1]:
            return memo[2]
        w = self._raw_at(t)
        if w is not None:
            w = self._grow(w)
            self._memo = (w.start, w.end, w)
            return w
        nxt = self.next_window(t)
        # closed from t to the next open (or, with none in sight, for an hour)
        self._memo = (t, nxt.start if nxt is not None else t + 3600.0, None)
        return None

    def next_window(self, t: float) -> Window | None:
        """The first open period that starts after ``t`` (a later one if ``t`` is in a
        period it touches); None for an always-open session or none within ~400 days."""
        if self.always:
            return None
        day = self._date(t) - timedelta(days=1)
        for i in range(HORIZON_DAYS + 2):
            for w in self._windows_of(day + timedelta(days=i)):
                if w.start <= t:
                    continue
                grown = self._grow(w)
                if grown.start > t:
                    return grown
                t = grown.end  # part of the period open at t: look past its end
        return None

    def is_open(self, t: float) -> bool:
        return self.window_at(t) is not None


def _merge(windows: list[Window]) -> list[Window]:
    out: list[Window] = []
    for w in sorted(windows, key=lambda w: w.start):
        if out and w.start <= out[-1].end:
            if w.end > out[-1].end:
                out[-1] = Window(out[-1].start, w.end)
        else:
            out.append(w)
    return out


# ---------------------------------------------------------------------------- the book
_SHANGHAI = "Asia/Shanghai"


def _builtin_specs() -> dict[str, dict[str, Any]]:
    return {
        "cn_a_share": {
            "tz": _SHANGHAI,
            "hours": ["09:30-11:30", "13:00-15:00"],
            "calendar": "XSHG",
        },
        "cn_futures_day": {
            "tz": _SHANGHAI,
            "hours": ["09:00-10:15", "10:30-11:30", "13:30-15:00"],
            "calendar": "XSHG",
        },
        # the hours come from night_end (SessionBook.get)
        "cn_futures_night": {"tz": _SHANGHAI, "calendar": "XSHG", "belongs_to": "next"},
        "hk_equity": {
            "tz": "Asia/Hong_Kong",
            "hours": ["09:30-12:00", "13:00-16:00"],
            "calendar": "XHKG",
            "half_day_close": "12:00",
        },
        "us_equity": {
            "tz": "America/New_York",
            "hours": ["09:30-16:00"],
            "calendar": "XNYS",
            "half_day_close": "13:00",
        },
        "crypto": {"always": True},
        "always": {"always": True},
    }


BUILTIN = tuple(_builtin_specs())
_KEYS = ("name", "tz", "hours", "days", "calendar", "belongs_to", "closed", "open")


class SessionBook:
    """The sessions a rule may name: the built-in ones and the user's ``[[session]]``
    tables. :meth:`get` hands out one shared :class:`Session` per (name, night end), so
    every rule that names a session shares its cache."""

    def __init__(self, user: Mapping[str, Session] | None = None) -> None:
        self._user = dict(user or {})
        self._made: dict[tuple[str, str | None], Session] = {}

    @classmethod
    def builtin(cls) -> SessionBook:
        return cls()

    @classmethod
    def load(cls, raw: list[dict[str, Any]], where: str) -> SessionBook:
        """Validate the ``[[session]]`` tables; ValueError with one line
        (``{where}: session {name!r}: ...``) on the first mistake."""
        if not isinstance(raw, list):
            raise ValueError(
                f"{where}: session must be a list of tables: write each as [[session]]"
            )
        user: dict[str, Session] = {}
        for i, table in enumerate(raw):
            if not isinstance(table, dict):
                raise ValueError(f"{where}: session #{i + 1} is not a table: write [[session]]")
            name = table.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(
                    f"{where}: session #{i + 1}: name {name!r} is missing or not a name; "
                    'write e.g. name = "shfe_gold_night" (letters, digits, _ . -)'
                )
            if name in BUILTIN:
                raise ValueError(
                    f"{where}: session {name!r}: that is a built-in session "
                    f"({', '.join(BUILTIN)}); give yours another name"
                )
            if name in user:
                raise ValueError(
                    f"{where}: session {name!r}: defined twice; keep one [[session]] of it"
                )
            try:
                user[name] = _user_session(name, table)
            except ValueError as exc:
                raise ValueError(f"{where}: session {name!r}: {exc}") from None
        return cls(user)

    def names(self) -> list[str]:
        return [*BUILTIN, *self._user]

    def get(self, name: str, *, night_end: str | None = None) -> Session:
        """The session named ``name``. ``night_end`` picks cn_futures_night's close (one of
        :data:`NIGHT_ENDS`) and is ignored for the other sessions."""
        if name != "cn_futures_night":
            night_end = None
        key = (name, night_end)
        made = self._made.get(key)
        if made is not None:
            return made
        if name in self._user:
            session = self._user[name]
        elif name == "cn_futures_night":
            if night_end not in NIGHT_ENDS:
                got = "is not set" if night_end is None else f"{night_end!r} is not one of them"
                raise ValueError(
                    "session 'cn_futures_night' ends at 23:00, 01:00 or 02:30 by product group "
                    f'and night_end {got}: set night_end = "23:00", "01:00" or "02:30" in the rule'
                )
            spec = {**_builtin_specs()[name], "hours": [f"21:00-{night_end}"]}
            session = _user_session(name, spec)
        elif name in BUILTIN:
            spec = _builtin_specs()[name]
            session = (
                Session(name, ZoneInfo("UTC"), always=True)
                if spec.get("always")
                else _user_session(name, spec)
            )
        else:
            raise ValueError(
                f"no session named {name!r}; known: {', '.join(self.names())} "
                "(or define it in a [[session]] table of NOTIFIER_WATCH_FILE)"
            )
        self._made[key] = session
        return session

    def calendars_in_use(self, names: Iterable[str]) -> dict[str, Calendar]:
        """{calendar name: calendar} of the sessions named (unknown names are skipped: the
        rules were validated already)."""
        out: dict[str, Calendar] = {}
        for name in names:
            try:
                # night_end does not change the calendar; any valid one will do
                cal = self.get(name, night_end=NIGHT_ENDS[0]).calendar
            except ValueError:
                continue
            if cal is not None:
                out[cal.name] = cal
        return out

    def calendar_warnings(
        self, names: Iterable[str], today: date, *, within_days: int = 30
    ) -> list[str]:
        """One line per calendar of these sessions whose officially known holidays end
        within ``within_days`` of ``today`` (``notifier check``)."""
        lines = []
        for cal in self.calendars_in_use(names).values():
            if cal.known_until is None or cal.known_until - today > timedelta(days=within_days):
                continue
            ran = "ran out on" if cal.known_until < today else "run out on"
            lines.append(
                f"calendar {cal.name}: the holidays that {cal.source} knows {ran} "
                f"{cal.known_until.isoformat()}; later days use rule-based estimates without "
                "the substituted days off: upgrade holidays (pip install -U holidays) once "
                "the next year's arrangement is published"
            )
        return lines


def _user_session(name: str, table: Mapping[str, Any]) -> Session:
    """One session from its table (the built-ins use the same keys, plus ``half_day_close``);
    ValueError with what is wrong and how to fix it."""
    extra = sorted(set(table) - {*_KEYS, "half_day_close"})
    if extra:
        raise ValueError(
            f"unknown key {extra[0]!r}; a session has {', '.join(_KEYS)} (see the README)"
        )
    if "tz" not in table:
        raise ValueError('tz is missing; add e.g. tz = "Asia/Shanghai"')
    tz = parse_zone(table["tz"])
    hours = table.get("hours")
    if isinstance(hours, str):
        hours = [hours]
    if not isinstance(hours, list) or not hours:
        raise ValueError(
            'hours is missing or empty; add e.g. hours = ["09:30-11:30", "13:00-15:00"]'
        )
    periods = [parse_hours(h) for h in hours]
    days_raw = table.get("days", list(DAY_NAMES[:5]))
    if isinstance(days_raw, str):
        days_raw = [days_raw]
    if not isinstance(days_raw, list) or not days_raw:
        raise ValueError('days is empty; list days such as ["mon", "tue", "wed", "thu", "fri"]')
    days = set()
    for d in days_raw:
        key = d.strip().lower() if isinstance(d, str) else None
        key = _FULL_DAY_NAMES.get(key, key) if key is not None else None
        if key not in DAY_NAMES:
            raise ValueError(f"days: {d!r} is not a day; use {', '.join(DAY_NAMES)}")
        days.add(DAY_NAMES.index(key))
    cal_name = table.get("calendar", "none")
    cal = None
    if not isinstance(cal_name, str) or cal_name.upper() not in (*CALENDARS, "NONE"):
        raise ValueError(
            f"calendar {cal_name!r} is not known; use {', '.join(CALENDARS)} or none "
            "(XSHG also serves Shenzhen and the futures exchanges)"
        )
    if cal_name.upper() != "NONE":
        cal = calendar(cal_name.upper())
    belongs = table.get("belongs_to", "same")
    if belongs not in ("same", "next"):
        raise ValueError(
            f'belongs_to {belongs!r} is not "same" or "next" ("next": an evening period '
            "opens the next trading day, as the cn futures night sessions do)"
        )
    closed = _dates(table.get("closed", []), "closed")
    opened = _dates(table.get("open", []), "open")
    both = sorted(closed & opened)
    if both:
        raise ValueError(f"{both[0].isoformat()} is both in closed and in open; keep one")
    half = table.get("half_day_close")
    return Session(
        name,
        tz,
        periods,
        calendar=cal,
        days=frozenset(days),
        belongs_to_next=belongs == "next",
        extra_closed=closed,
        extra_open=opened,
        half_day_close=parse_clock(half) if isinstance(half, str) else None,
    )


def _dates(raw: Any, key: str) -> frozenset[date]:
    if not isinstance(raw, list):
        raw = [raw]
    out = set()
    for v in raw:
        if isinstance(v, date) and not isinstance(v, datetime):
            out.add(v)
            continue
        try:
            if not isinstance(v, str):
                raise ValueError
            out.add(date.fromisoformat(v.strip()))
        except ValueError:
            raise ValueError(
                f'{key}: {v!r} is not a date; write "YYYY-MM-DD", e.g. "2026-09-16"'
            ) from None
    return frozenset(out)
