"""Liveness: notice when a watched strategy goes quiet while its market is open.

A strategy shows it is alive with a heartbeat (``ZADD <prefix>:seen GT <time> <strategy>``,
see :meth:`producer.Notifier.heartbeat`) or with any event it sends (the worker records
those). Rules in ``NOTIFIER_WATCH_FILE`` say which strategies to watch, for how long silence
is tolerated (``grace_s``) and when silence matters (``sessions``)::

    [[watch]]
    strategy = ["ma_*", "grid_btc"]   # shell-style patterns; the first matching rule wins
    grace_s = 90
    sessions = ["cn_a_share"]         # "always" = all the time
    repeat_s = 900                    # remind while still silent (0 = once)

One silence episode per strategy::

    ok ──(session open, nothing heard for grace_s)──► silent  [SILENT]
    silent ──(still silent, repeat_s later, session open)──► silent  [SILENT] reminder
    silent ──(heard again, at any time)──► ok  [RECOVERED]

The silence clock starts at the later of the last sign of life and the session's open, so a
strategy that has not started by the open is silent ``grace_s`` after it. A strategy never
heard at all is watched only when a rule names it exactly (not by a pattern), from the first
session open after the rule was loaded (at once for ``always``).

Every worker evaluates every second; a change of state and its alert are one Lua step that
succeeds only if the state is still the one read (:meth:`worker.queue.Queue.watch_step`), so
any number of workers send one alert per change, and a worker killed mid-evaluation changed
nothing (the next evaluation, by any worker, a second later, does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from producer.event import Severity, check_addresses, event_from_dict

from .metrics import Metrics
from .queue import Queue
from .routing import EMAIL
from .sessions import Session, SessionBook, Window
from .settings import first_error, read_toml

__all__ = [
    "ALERT_ID_PREFIX",
    "Row",
    "State",
    "WatchConfig",
    "WatchRule",
    "Watcher",
    "load_watch",
    "step",
]

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
ALERT_ID_PREFIX = "watch."  # ids of the alerts the watch sends (never a sign of life)
_GLOB = frozenset("*?[")

Notice = Literal["silent", "reminder", "recovered"]


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class WatchRule(BaseModel):
    """One ``[[watch]]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    strategy: Annotated[list[str], Field(min_length=1)]
    grace_s: Annotated[float, Field(gt=0)] = 90.0
    sessions: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["always"])
    # the close of cn_futures_night for this rule's products: "23:00", "01:00" or "02:30"
    night_end: str | None = None
    repeat_s: Annotated[float, Field(ge=0)] = 900.0
    severity: Severity = "critical"
    to: Annotated[list[str], Field(min_length=1, max_length=50)] | None = None
    channels: Annotated[list[str], Field(min_length=1)] | None = None

    _lists = field_validator("strategy", "sessions", "to", "channels", mode="before")(
        classmethod(lambda cls, v: _as_list(v))
    )
    _resolved: list[Session] = PrivateAttr(default_factory=list)

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else check_addresses(v)

    @property
    def label(self) -> str:
        return self.name or ",".join(self.strategy)

    def matches(self, strategy: str) -> bool:
        return any(fnmatchcase(strategy, p) for p in self.strategy)

    @property
    def exact(self) -> list[str]:
        """The names this rule gives without a pattern (watched even if never heard)."""
        return [p for p in self.strategy if not _GLOB & set(p)]

    @property
    def session_objects(self) -> list[Session]:
        return self._resolved

    def window(self, now: float) -> Window | None:
        """The open period of this rule's sessions at ``now`` (the earliest start among the
        sessions open now), or None when none is open."""
        open_ = [w for w in (s.window_at(now) for s in self._resolved) if w is not None]
        if not open_:
            return None
        return Window(min(w.start for w in open_), max(w.end for w in open_))

    def next_open(self, now: float) -> float | None:
        starts = [w.start for w in (s.next_window(now) for s in self._resolved) if w is not None]
        return min(starts) if starts else None

    @property
    def tz(self) -> tzinfo | None:
        """The time zone to show times in: the first session's, unless it is a 24/7 one."""
        for s in self._resolved:
            if s.calendar is not None or s.name not in ("always", "crypto"):
                return s.tz
        return None


class _WatchFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    watch: list[WatchRule] = Field(default_factory=list)
    session: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """The validated watch file: its rules and the sessions they (and routes) may name."""

    path: Path
    rules: list[WatchRule]
    sessions: SessionBook

    def rule_for(self, strategy: str) -> WatchRule | None:
        for r in self.rules:
            if r.matches(strategy):
                return r
        return None

    def named(self) -> list[str]:
        """Strategies named exactly by some rule (each watched even before it is heard)."""
        out: dict[str, None] = {}
        for r in self.rules:
            for name in r.exact:
                if self.rule_for(name) is r:
                    out[name] = None
        return list(out)

    def check_channels(self, known: Iterable[str]) -> None:
        names = set(known) | {EMAIL}
        for r in self.rules:
            for name in r.channels or ():
                if name not in names:
                    raise ValueError(
                        f"NOTIFIER_WATCH_FILE={self.path}: watch rule {r.label!r}: no channel "
                        f"named {name!r}; known: {', '.join(sorted(names))} "
                        "(NOTIFIER_CHANNELS_FILE)"
                    )


def _explain(exc: ValidationError, raw: dict[str, Any]) -> str:
    """The first mistake of the file, as a person would say it."""
    loc, msg, err = first_error(exc)
    parts = loc.split(".")
    if parts[0] in ("watch", "session") and len(parts) == 1:
        return f"{parts[0]}: use [[{parts[0]}]] tables (one per rule), not [{parts[0]}]"
    if parts[0] != "watch" or len(parts) < 2 or not parts[1].isdigit():
        if err.get("type") == "extra_forbidden":
            return f"unknown table {loc!r}: the file holds [[watch]] and [[session]] tables"
        return f"{loc}: {msg}"
    index = int(parts[1])
    table = raw["watch"][index] if isinstance(raw.get("watch"), list) else {}
    name = table.get("name") or table.get("strategy") if isinstance(table, dict) else None
    shown = ",".join(name) if isinstance(name, list) else name
    label = f"watch rule {index + 1}" + (f" ({shown})" if shown else "")
    key = ".".join(parts[2:3])
    if err.get("type") == "extra_forbidden":
        keys = ", ".join(WatchRule.model_fields)
        return f"{label}: unknown key {key!r}; a rule takes {keys}"
    return f"{label}: {key}: {msg}"


def load_watch(path: Path, allowed: frozenset[str]) -> WatchConfig:
    """Parse and validate the watch file; ValueError with one line on what is wrong."""
    where = f"NOTIFIER_WATCH_FILE={path}"
    raw = read_toml(path, "NOTIFIER_WATCH_FILE")
    try:
        parsed = _WatchFile.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{where}: {_explain(exc, raw)}") from None
    book = SessionBook.load(parsed.session, where)
    for r in parsed.watch:
        try:
            r._resolved = [book.get(n, night_end=r.night_end) for n in r.sessions]
        except ValueError as exc:
            raise ValueError(f"{where}: watch rule {r.label!r}: {exc}") from None
        outside = sorted(a for a in r.to or () if a not in allowed)
        if outside:
            raise ValueError(
                f"{where}: watch rule {r.label!r}: {', '.join(outside)} not allowed: add them "
                "to NOTIFIER_ALLOWED_RECIPIENTS"
            )
    return WatchConfig(path, parsed.watch, book)


# ------------------------------------------------------------------------------ the rule
@dataclass(frozen=True, slots=True)
class State:
    """One strategy's watch state, as kept in ``<prefix>:watch`` (JSON)."""

    state: Literal["ok", "silent"] = "ok"
    episode: int = 0  # silence episodes so far
    since: float | None = None  # when the current episode began (its silence deadline)
    heard: float | None = None  # the last sign of life before it (None: never heard)
    alerts: int = 0  # [SILENT] alerts of the episode (the first and the reminders)
    next: float | None = None  # when the next reminder is due
    watched_from: float | None = None  # a never-heard named strategy: first evaluated then

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_json(cls, text: str | None) -> State:
        if not text:
            return cls()
        try:
            raw = json.loads(text)
            return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError):
            return cls()  # unreadable: start over (the next evaluation rewrites it)


def step(
    now: float,
    rule: WatchRule,
    window: Window | None,
    last_seen: float | None,
    st: State,
) -> tuple[State, Notice | None]:
    """The next state of one strategy and the alert that change sends (pure)."""
    if st.state == "silent":
        if last_seen is not None and (st.heard is None or last_seen > st.heard):
            return replace(st, state="ok", since=None, next=None, alerts=0, heard=None), (
                "recovered"
            )
        if window is None or not rule.repeat_s:
            return st, None
        due = max(st.next if st.next is not None else now, window.start + rule.grace_s)
        if now >= due:
            return replace(st, alerts=st.alerts + 1, next=now + rule.repeat_s), "reminder"
        return st, None
    if window is None:
        return st, None
    if last_seen is None:
        if st.watched_from is None:
            return st, None
        if math.isinf(window.end):
            base = max(window.start, st.watched_from)
        elif window.start < st.watched_from:
            return st, None  # named mid-session: watched from the next open
        else:
            base = window.start
    else:
        base = max(last_seen, window.start)
    deadline = base + rule.grace_s
    if now <= deadline:
        return st, None
    return (
        State(
            state="silent",
            episode=st.episode + 1,
            since=deadline,
            heard=last_seen,
            alerts=1,
            next=now + rule.repeat_s if rule.repeat_s else None,
            watched_from=st.watched_from,
        ),
        "silent",
    )


# ------------------------------------------------------------------------------ the view
@dataclass(frozen=True, slots=True)
class Row:
    """One watched strategy as ``notifier watch`` shows it."""

    strategy: str
    rule: str
    session_open: bool
    last_seen: float | None
    state: Literal["ok", "silent", "off-session", "waiting"]
    since: float | None  # silent: since when; ok: last seen; off-session: the next open
    episode: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ the alerts
_TEXT = {
    "en": {
        "silent": "[SILENT] {s}: no sign of life for {d}",
        "reminder": "[SILENT] {s}: still silent after {d} (reminder {n})",
        "recovered": "[RECOVERED] {s}: heard again after {d}",
        "first": "[RECOVERED] {s}: heard for the first time after {d}",
        "strategy": "strategy",
        "rule": "rule",
        "silent for": "silent for",
        "last seen": "last seen",
        "heard again": "heard again",
        "last event": "last event",
        "sessions": "sessions",
        "never": "never",
        "body_silent": "{s} has sent no heartbeat and no event for {d} while {w} is open "
        "(grace {g}). Check the process, its logs and its connection to Redis.",
        "body_recovered": "{s} is alive again: silent for {d}.",
    },
    "zh": {
        "silent": "[失联] {s}:已 {d} 无信号",
        "reminder": "[失联] {s}:仍无信号,已 {d}(第 {n} 次提醒)",
        "recovered": "[恢复] {s}:已恢复,失联 {d}",
        "first": "[恢复] {s}:首次收到信号,等待了 {d}",
        "strategy": "策略",
        "rule": "规则",
        "silent for": "失联时长",
        "last seen": "最后信号",
        "heard again": "恢复时间",
        "last event": "最后事件",
        "sessions": "交易时段",
        "never": "从未",
        "body_silent": "{s} 在 {w} 交易时段内已 {d} 没有心跳也没有事件(宽限 {g})。"
        "请检查进程、日志及其与 Redis 的连接。",
        "body_recovered": "{s} 已恢复,失联 {d}。",
    },
}


def duration(seconds: float, locale: str = "en") -> str:
    """``45 s``, ``2 min``, ``1 h 5 min`` (zh: ``45 秒``, ``2 分钟``, ``1 小时 5 分钟``)."""
    s = max(0, round(seconds))
    zh = locale == "zh"
    if s < 60:
        return f"{s} 秒" if zh else f"{s} s"
    m = s // 60
    if m < 60:
        return f"{m} 分钟" if zh else f"{m} min"
    h, m = divmod(m, 60)
    if h < 48:
        if zh:
            return f"{h} 小时" + (f" {m} 分钟" if m else "")
        return f"{h} h" + (f" {m} min" if m else "")
    d, h = divmod(h, 24)
    if zh:
        return f"{d} 天" + (f" {h} 小时" if h else "")
    return f"{d} d" + (f" {h} h" if h else "")


def when(t: float | None, tz: tzinfo | None, locale: str = "en") -> str:
    if t is None:
        return _TEXT[locale]["never"]
    dt = datetime.fromtimestamp(t, tz or UTC) if tz else datetime.fromtimestamp(t).astimezone()
    return dt.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def alert_events(
    notice: Notice,
    strategy: str,
    rule: WatchRule,
    old: State,
    new: State,
    *,
    now: float,
    last_seen: float | None,
    last_event: dict[str, Any] | None,
    locale: str,
) -> list[str]:
    """The alert of one change, as event JSON: one event, or one per channel of the rule."""
    t = _TEXT.get(locale, _TEXT["en"])
    tz = rule.tz
    sessions = ", ".join(rule.sessions)
    subject_of = (last_event or {}).get("subject")
    if notice == "recovered":
        # never heard before: since the session opened (the episode's start less the grace)
        began = old.heard if old.heard is not None else (old.since or now) - rule.grace_s
        length = duration((last_seen or now) - began, locale)
        subject = t["first" if old.heard is None else "recovered"].format(s=strategy, d=length)
        body = t["body_recovered"].format(s=strategy, d=length)
        data = {
            t["strategy"]: strategy,
            t["rule"]: rule.label,
            t["silent for"]: length,
            t["last seen"]: when(old.heard, tz, locale),
            t["heard again"]: when(last_seen, tz, locale),
        }
        number = "r"
    else:
        began = new.heard if new.heard is not None else (new.since or now) - rule.grace_s
        length = duration(now - began, locale)
        key = "silent" if notice == "silent" else "reminder"
        subject = t[key].format(s=strategy, d=length, n=new.alerts - 1)
        body = t["body_silent"].format(
            s=strategy, d=length, w=sessions, g=duration(rule.grace_s, locale)
        )
        data = {
            t["strategy"]: strategy,
            t["rule"]: rule.label,
            t["silent for"]: length,
            t["last seen"]: when(new.heard, tz, locale),
            t["sessions"]: sessions,
        }
        number = str(new.alerts)
    if subject_of:
        data[t["last event"]] = str(subject_of)[:200]
    digest = hashlib.sha256(strategy.encode()).hexdigest()[:12]
    fields: dict[str, Any] = {
        "id": f"{ALERT_ID_PREFIX}{digest}.{new.episode}.{number}",
        "ts": now,
        "strategy": strategy,
        "kind": "recovered" if notice == "recovered" else "silent",
        "severity": rule.severity,
        "subject": subject[:256],
        "body": body,
        "data": data,
    }
    if rule.to:
        fields["to"] = list(rule.to)
    event = event_from_dict(fields)
    if not rule.channels:
        return [event.to_json()]
    return [event.with_meta(channel=name).to_json() for name in rule.channels]


# ------------------------------------------------------------------------------ the watcher
@dataclass(slots=True)
class _Pending:
    marks: dict[str, tuple[float, str | None]] = field(default_factory=dict)


class Watcher:
    """Records signs of life from the events this worker handles, and (with a watch file)
    evaluates every watched strategy once a second."""

    def __init__(
        self,
        queue: Queue,
        config: WatchConfig | None,
        *,
        metrics: Metrics | None = None,
        locale: str = "en",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.config = config
        self.metrics = metrics
        self.locale = locale
        self.clock = clock
        self._pending = _Pending()
        self._wake = asyncio.Event()
        self._labels: set[str] = set()
        self.sent: list[tuple[str, Notice]] = []  # (strategy, notice) this watcher sent

    # ---------------------------------------------------------------- signs of life
    def saw(self, event_id: str, strategy: str, ts: float, subject: str | None) -> None:
        """An event of ``strategy`` produced at ``ts``: recorded at once, off the lane (the
        watch's own alerts name the silent strategy and are no sign of life)."""
        if event_id.startswith(ALERT_ID_PREFIX):
            return
        ts = min(ts, self.clock())
        cur = self._pending.marks.get(strategy)
        if cur is None or ts >= cur[0]:
            self._pending.marks[strategy] = (ts, subject)
        self._wake.set()

    async def flush(self) -> None:
        marks, self._pending.marks = self._pending.marks, {}
        self._wake.clear()
        if marks:
            try:
                await self.queue.record_seen(marks)
            except Exception:
                for s, mark in marks.items():  # keep them for the next try
                    self._pending.marks.setdefault(s, mark)
                raise

    # ---------------------------------------------------------------- evaluation
    def _watched(self, seen: dict[str, float], states: dict[str, str]) -> list[str]:
        assert self.config is not None
        names = dict.fromkeys([*self.config.named(), *seen, *states])
        return [n for n in names if self.config.rule_for(n) is not None]

    async def evaluate(self) -> list[Row]:
        """One pass: change the state of every watched strategy that needs it (sending its
        alert), update the metrics; the rows of the view."""
        if self.config is None:
            return []
        now = self.clock()
        seen, states = await self.queue.watch_snapshot()
        rows = []
        for name in self._watched(seen, states):
            rule = self.config.rule_for(name)
            assert rule is not None
            text = states.get(name)
            st = State.from_json(text)
            last = min(seen[name], now) if name in seen else None
            window = rule.window(now)
            if text is None and last is None:
                # a named strategy never heard: watched from now on (see step)
                st = State(watched_from=now)
                if not await self.queue.watch_step(name, "", st.to_json()):
                    continue
                text = st.to_json()
            new, notice = step(now, rule, window, last, st)
            if notice is not None:
                lasts = await self.queue.last_events([name])
                alerts = alert_events(
                    notice,
                    name,
                    rule,
                    st,
                    new,
                    now=now,
                    last_seen=last,
                    last_event=lasts.get(name),
                    locale=self.locale,
                )
                if await self.queue.watch_step(name, text or "", new.to_json(), alerts):
                    self.sent.append((name, notice))
                    self._log(notice, name, rule, new, now, last)
                else:
                    new = st  # another worker changed it first: its alert went out
            rows.append(_row(name, rule, window, last, new, now))
        self._export(rows)
        return rows

    def view(self, seen: dict[str, float], states: dict[str, str]) -> list[Row]:
        """The rows without changing anything (``notifier watch``): a strategy that would
        fall silent now shows as silent even if no worker is running to say so."""
        if self.config is None:
            return []
        now = self.clock()
        rows = []
        for name in self._watched(seen, states):
            rule = self.config.rule_for(name)
            assert rule is not None
            st = State.from_json(states.get(name))
            last = min(seen[name], now) if name in seen else None
            if last is None and st.watched_from is None:
                st = State(watched_from=now)
            window = rule.window(now)
            new, _ = step(now, rule, window, last, st)
            rows.append(_row(name, rule, window, last, new, now))
        return rows

    def _log(
        self,
        notice: Notice,
        name: str,
        rule: WatchRule,
        st: State,
        now: float,
        last: float | None,
    ) -> None:
        if notice == "recovered":
            logger.info("watch: %s heard again (rule %r), [RECOVERED] queued", name, rule.label)
        else:
            logger.warning(
                "watch: %s silent for %.0f s (rule %r, last seen %s), %s queued",
                name,
                now - (last if last is not None else (st.since or now) - rule.grace_s),
                rule.label,
                when(last, rule.tz),
                "[SILENT]" if notice == "silent" else f"reminder {st.alerts - 1}",
            )

    def _export(self, rows: Sequence[Row]) -> None:
        if self.metrics is None:
            return
        names = set()
        for row in rows:
            names.add(row.strategy)
            if row.last_seen is not None:
                self.metrics.strategy_last_seen.labels(row.strategy).set(row.last_seen)
            self.metrics.strategy_silent.labels(row.strategy).set(1 if row.state == "silent" else 0)
        for gone in self._labels - names:
            for gauge in (self.metrics.strategy_last_seen, self.metrics.strategy_silent):
                with contextlib.suppress(KeyError):
                    gauge.remove(gone)
        self._labels = names

    async def run(self, stopping: asyncio.Event, *, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Flush signs of life as they come; evaluate every ``interval_s`` (the service's
        loop; Redis errors are waited out by the queue's guard)."""
        next_eval = 0.0
        while not stopping.is_set():
            # nothing to evaluate without a watch file: wait for signs of life only (a
            # timeout of 0 here made an idle worker spin at half a core)
            due = interval_s if self.config is None else next_eval - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(max(0.0, due), interval_s))
            try:
                await self.flush()
                if self.config is not None and time.monotonic() >= next_eval:
                    next_eval = time.monotonic() + interval_s
                    await self.evaluate()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("watch: evaluation failed; trying again in %.0f s", interval_s)
                await asyncio.sleep(interval_s)


def _row(
    name: str, rule: WatchRule, window: Window | None, last: float | None, st: State, now: float
) -> Row:
    if st.state == "silent":
        return Row(name, rule.label, window is not None, last, "silent", st.since, st.episode)
    if window is None:
        return Row(name, rule.label, False, last, "off-session", rule.next_open(now), st.episode)
    if last is None:
        return Row(name, rule.label, True, None, "waiting", st.watched_from, st.episode)
    return Row(name, rule.label, True, last, "ok", last, st.episode)
