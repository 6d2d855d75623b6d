"""Quiet hours of a route: non-critical events outside chosen sessions or hours are held and
go as one digest at a set time (e.g. 08:45 before the open).

A route's ``[route.quiet]`` table (NOTIFIER_ROUTES_FILE)::

    [[route]]
    strategy = "grid_*"
    kind = ["info", "fill"]
    [route.quiet]
    deliver_during = ["cn_a_share", "cn_futures_night"]  # sessions, or "HH:MM-HH:MM" (every day)
    tz = "Asia/Shanghai"       # for hours and digest_at (default: the first session's)
    digest_at = "08:45"        # default: when the next window opens
    night_end = "23:00"        # with cn_futures_night

While any of ``deliver_during`` is open, events go at once. Outside, an event is held (its
delivery: each channel's copy of a fanned-out event in that channel's own group) and goes in
one digest at the last ``digest_at`` before the next window opens, or when it opens if no
``digest_at`` comes first (the lunch break: at 13:00). With no window in ~400 days the
digest goes at the next ``digest_at`` (or in a day): a window that never opens must not
hold events for ever. Critical events and routes with ``digest = false`` are never held.

The held events use the rate limit's digest machinery (``<p>:held:<group>``, ``<p>:digests``):
a quiet group is ``<channel>.quiet-<hash of the quiet table and the recipients>``, so
:func:`is_quiet_group` tells the two kinds apart (``stats``, the digest's reason).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, time, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from .sessions import NIGHT_ENDS, Session, SessionBook, parse_clock, parse_hours, parse_zone

__all__ = ["QUIET_MARK", "Quiet", "is_quiet_group"]

QUIET_MARK = ".quiet-"  # in a digest group's name: held by quiet hours (not a rate limit)
NO_WINDOW_HOLD_S = 86400.0  # with no window in sight and no digest_at: a day at most
_EVERY_DAY = frozenset(range(7))


def is_quiet_group(group: str) -> bool:
    return QUIET_MARK in group


class Quiet(BaseModel):
    """A route's quiet hours (validated; :meth:`bind` resolves the sessions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deliver_during: Annotated[list[str], Field(min_length=1)]
    tz: str | None = None
    digest_at: str | None = None
    night_end: str | None = None

    _sessions: tuple[Session, ...] = PrivateAttr(default=())
    _tz_info: Any = PrivateAttr(default=None)
    _digest_min: int | None = PrivateAttr(default=None)

    @field_validator("deliver_during", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("digest_at")
    @classmethod
    def _clock(cls, v: str | None) -> str | None:
        if v is not None:
            parse_clock(v)
        return v

    @field_validator("night_end")
    @classmethod
    def _night_end(cls, v: str | None) -> str | None:
        if v is not None and v not in NIGHT_ENDS:
            raise ValueError(
                f"night_end {v!r} is not one of {', '.join(NIGHT_ENDS)} (cn_futures_night's "
                "close by product group)"
            )
        return v

    @field_validator("tz")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is not None:
            parse_zone(v)
        return v

    def bind(self, book: SessionBook) -> None:
        """Resolve ``deliver_during`` against the known sessions; ValueError (one line,
        without the file's name) on an unknown session, bad hours or a missing tz."""
        tz = parse_zone(self.tz) if self.tz is not None else None
        sessions: list[Session] = []
        hours: list[str] = []
        for entry in self.deliver_during:
            # hours: a session's name has no colon (and "9-17" is meant as hours too)
            if ":" in entry or (entry[:1].isdigit() and entry not in book.names()):
                parse_hours(entry)  # the message names the form
                hours.append(entry)
                continue
            session = book.get(entry, night_end=self.night_end)
            sessions.append(session)
            if tz is None and not session.always:
                tz = session.tz
        if tz is None:
            if hours or self.digest_at is not None:
                raise ValueError(
                    'tz is missing: hours and digest_at are clock times; add tz = "Asia/Shanghai" '
                    "(or another IANA name)"
                )
            tz = parse_zone("UTC")  # "always" only: never quiet, the zone never used
        for entry in hours:
            sessions.append(Session(entry, tz, [parse_hours(entry)], days=_EVERY_DAY))
        self._sessions = tuple(sessions)
        self._tz_info = tz
        self._digest_min = parse_clock(self.digest_at) if self.digest_at else None

    # ------------------------------------------------------------------ decisions
    def held_until(self, now: float) -> float | None:
        """None while one of the windows is open (send now), else when the digest goes."""
        if not self._sessions:
            raise RuntimeError("Quiet.bind() was not called")
        starts = []
        for s in self._sessions:
            if s.is_open(now):
                return None
            nxt = s.next_window(now)
            if nxt is not None:
                starts.append(nxt.start)
        opens = min(starts) if starts else None
        if self._digest_min is None:
            return opens if opens is not None else now + NO_WINDOW_HOLD_S
        if opens is None:
            return self._digest_after(now)
        # the last digest_at at or before the open, if it is still ahead
        at = self._digest_on(datetime.fromtimestamp(opens, self._tz_info).date())
        if at > opens:
            at = self._digest_on(datetime.fromtimestamp(opens, self._tz_info).date(), -1)
        return at if at > now else opens

    def _digest_on(self, day: Any, shift: int = 0) -> float:
        assert self._digest_min is not None
        d = day + timedelta(days=shift)
        clock = time(self._digest_min // 60, self._digest_min % 60)
        return datetime.combine(d, clock, self._tz_info).timestamp()

    def _digest_after(self, now: float) -> float:
        today = datetime.fromtimestamp(now, self._tz_info).date()
        at = self._digest_on(today)
        return at if at > now else self._digest_on(today, 1)

    def group(self, channel: str, recipients: Sequence[str]) -> str:
        """The digest group of this route's quiet holds for one channel and recipients."""
        key = "|".join(
            [
                ",".join(self.deliver_during),
                self.tz or "",
                self.digest_at or "",
                self.night_end or "",
                ",".join(sorted(recipients)),
            ]
        )
        return f"{channel}{QUIET_MARK}{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def reason(self, now: float, locale: str = "en") -> str:
        """Why a digest holds these events (its summary line): quiet hours until when."""
        until = datetime.fromtimestamp(now, self._tz_info).strftime("%H:%M")
        during = ", ".join(self.deliver_during)
        if locale == "zh":
            return f"静默时段至 {until}，仅在 {during} 内即时发送"
        return f"quiet hours until {until}; sent at once only during {during}"

    def describe(self) -> str:
        """One line for ``check``."""
        at = f", digest at {self.digest_at}" if self.digest_at else ", digest when one opens"
        return f"quiet outside {', '.join(self.deliver_during)}{at}"
