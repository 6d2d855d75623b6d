"""What an alert says, before any channel renders it.

Composition is two steps. :func:`build_alert` (one event) and :func:`build_digest` (many
events held by a rate limit) decide what is said: the subject line as the recipient sees it
(``[DELAYED 3m12s] [CRITICAL] ...``), severity, strategy and kind, the free text, the data
table as text, notes such as ``repeated 37× in 5 min``, the produced time and the thread
(per strategy, per local day). The results are frozen dataclasses, :class:`Alert` and
:class:`Digest`, that hold no channel's syntax. Each channel then renders them: MIME for
e-mail (``worker/compose.py``), and for IM channels plain text (:func:`as_text`,
:func:`digest_as_text`) or markdown (:func:`as_markdown`, :func:`digest_as_markdown`).
Channels with a size limit pass ``max_bytes``: the free text (or, in a digest, whole rows)
is cut first, so the subject, the data table and the event id survive; :func:`fit` cuts
any text to a number of UTF-8 bytes on a character boundary with a visible marker.

Markdown is CommonMark (what WeCom, DingTalk and Feishu's ``lark_md`` read): user text is
escaped only where it would turn into markup (:func:`escape_markdown`), so Chinese text,
``[BUY]`` and ``1700.50`` arrive exactly as written in renderers that ignore escapes too.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from producer.event import MAX_SUBJECT_CHARS, Event, Severity

__all__ = [
    "SEVERITY_LABEL",
    "TRUNCATED",
    "Alert",
    "Digest",
    "DigestRow",
    "Thread",
    "as_markdown",
    "as_text",
    "build_alert",
    "build_digest",
    "delayed_prefix",
    "digest_as_markdown",
    "digest_as_text",
    "escape_markdown",
    "event_key",
    "fit",
    "format_delay",
    "format_value",
    "render_subject",
    "repeated_note",
    "truncated_marker",
]

SEVERITY_LABEL = {"info": "INFO", "warning": "WARNING", "critical": "CRITICAL"}
# The watch's alerts (worker.watch) lead with their own tag, [SILENT] / [RECOVERED] (zh
# [失联] / [恢复]): it stays first, whatever their severity.
SELF_TAGGED_KINDS = frozenset({"silent", "recovered"})
TRUNCATED = "…(truncated)"
_TRUNCATED = {"en": TRUNCATED, "zh": "…（已截断）"}
_SPACES = re.compile(r"\s+")

Rows = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Thread:
    """The conversation an alert belongs to: one per strategy (``notifier`` when the event
    names none) and local day (``YYYYMMDD``)."""

    strategy: str
    day: str

    @property
    def key(self) -> str:
        return f"{self.strategy}/{self.day}"


@dataclass(frozen=True, slots=True)
class Alert:
    """One event's content. ``subject`` is the line as the recipient sees it, prefixes
    included; ``rows`` the data table as (label, value as text), in the event's order;
    ``produced`` the event's ``ts`` as local time text; ``key`` a hash of the event's content
    (:func:`event_key`); ``source`` the event itself, for templates that read it."""

    event_id: str
    subject: str
    severity: Severity
    strategy: str | None
    kind: str
    text: str
    rows: Rows
    notes: tuple[str, ...]
    ts: float | None
    produced: str | None
    thread: Thread
    key: str
    locale: str = "en"
    source: Event | None = field(default=None, compare=False, repr=False)

    @property
    def severity_label(self) -> str:
        return SEVERITY_LABEL[self.severity]


@dataclass(frozen=True, slots=True)
class DigestRow:
    """One event of a digest: its local time of day (``HH:MM:SS``, empty without ``ts``),
    rendered subject, text and data rows, and :func:`event_key`."""

    event_id: str
    time: str
    severity: Severity
    strategy: str | None
    kind: str
    subject: str
    text: str
    rows: Rows
    ts: float | None
    key: str


@dataclass(frozen=True, slots=True)
class Digest:
    """Many held events in one message, oldest first. ``kinds`` and ``strategies`` count the
    events (in order of first appearance); ``subject`` says the counts; ``reason`` why they
    were held (``qq: rate limit 20/min reached``); ``thread`` only when one strategy."""

    subject: str
    reason: str
    rows: tuple[DigestRow, ...]
    kinds: tuple[tuple[str, int], ...]
    strategies: tuple[tuple[str, int], ...]
    thread: Thread | None
    locale: str = "en"

    @property
    def count(self) -> int:
        return len(self.rows)


# ------------------------------------------------------------------------- the words
def _line(value: Any) -> str:
    """Any value as one line of text (headers never get CR/LF from data)."""
    return _SPACES.sub(" ", str(value)).strip()


def format_value(value: Any) -> str:
    """A data value as shown: floats with 2 decimals (``1700.50``), or 6 significant
    digits below 1 (``0.000123``); anything else as one line of text."""
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.6g}"
    if isinstance(value, str) and value.isprintable() and "  " not in value:
        return value.strip()  # the common case, without the regex
    return _line(value)


def render_subject(event: Event) -> str:
    """The subject line: the event's own exactly as sent (the contract already refuses
    control characters), or one rendered from it (at most the contract's 256 characters);
    ``[CRITICAL]`` prefixed (but for the watch's alerts, see :data:`SELF_TAGGED_KINDS`)."""
    if event.subject and not event.subject.isspace():
        subject = event.subject
    else:
        data = event.data or {}
        side, symbol = data.get("side"), data.get("symbol")
        if side is not None and symbol is not None:
            subject = f"[{_line(side).upper()}] {_line(symbol)}"
            if data.get("qty") is not None:
                subject += f" {format_value(data['qty'])}"
            if data.get("price") is not None:
                subject += f" @ {format_value(data['price'])}"
        else:
            first = (event.body or "").strip().splitlines()
            text = (
                _line(first[0])
                if first
                else ", ".join(f"{_line(k)}={_line(v)}" for k, v in list(data.items())[:4])
            )
            subject = f"[{event.kind.upper()}] {text}" if text else f"[{event.kind.upper()}]"
        if event.strategy:
            subject += f" · {event.strategy}"
        subject = _line(subject)[:MAX_SUBJECT_CHARS]
    if (
        event.severity == "critical"
        and event.kind not in SELF_TAGGED_KINDS
        and not subject.upper().startswith("[CRITICAL]")
    ):
        subject = f"[CRITICAL] {subject}"
    return subject


def format_delay(seconds: float, locale: str = "en") -> str:
    """``3m12s`` / ``3分12秒``; hours and days for long outages."""
    s = int(seconds)
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if locale == "zh":
        parts = [(d, "天"), (h, "小时"), (m, "分"), (sec, "秒")]
        return "".join(f"{v}{u}" for v, u in parts if v) or "0秒"
    parts = [(d, "d"), (h, "h"), (m, "m"), (sec, "s")]
    return "".join(f"{v}{u}" for v, u in parts if v) or "0s"


def delayed_prefix(seconds: float, locale: str = "en") -> str:
    """``[DELAYED 3m12s]`` / ``[延迟 3分12秒]``: put before the subject of a late alert."""
    if locale == "zh":
        return f"[延迟 {format_delay(seconds, 'zh')}]"
    return f"[DELAYED {format_delay(seconds)}]"


def _span(seconds: float, locale: str) -> str:
    s = max(1, round(seconds))
    if locale == "zh":
        return (
            f"{s} 秒" if s < 60 else f"{round(s / 60)} 分钟" if s < 3600 else f"{s / 3600:.1f} 小时"
        )
    return f"{s} s" if s < 60 else f"{round(s / 60)} min" if s < 3600 else f"{s / 3600:.1f} h"


def repeated_note(count: int, since: float, now: float, locale: str = "en") -> str:
    """``repeated 37× in 5 min``: the suppressed repeats of the previous window."""
    span = _span(now - since, locale)
    if locale == "zh":
        return f"此前 {span}内重复 {count} 次（已合并）"
    return f"repeated {count}× in {span}"


def truncated_marker(locale: str = "en") -> str:
    """What :func:`fit` appends in this locale: ``…(truncated)`` / ``…（已截断）``."""
    return _TRUNCATED.get(locale, TRUNCATED)


def event_key(event: Event) -> str:
    """12 hex digits that tell events apart beyond their id: a hash of ``ts`` and the
    content (subject, body, data, strategy, kind, severity). A retry or a duplicate copy
    has the same key (``_meta``, recipients and the worker's subject prefixes are left
    out); a new event that reuses an id after its sent mark expired has another."""
    identity = (
        event.ts,
        event.subject,
        event.body,
        event.data,
        event.strategy,
        event.kind,
        event.severity,
    )
    text = json.dumps(identity, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=6).hexdigest()


# ---------------------------------------------------------------------- the builders
def _rows(data: dict[str, Any] | None) -> Rows:
    return tuple((key, format_value(value)) for key, value in data.items()) if data else ()


def build_alert(
    event: Event,
    *,
    event_id: str,
    subject: str | None = None,
    notes: Sequence[str] = (),
    delayed_s: float | None = None,
    locale: str = "en",
    now: float | None = None,
) -> Alert:
    """What ``event`` says. ``subject`` replaces the rendered subject line (as given);
    ``delayed_s`` marks a late alert (``[DELAYED 3m12s]`` before the subject; the caller
    decides what is late); ``notes`` are shown above the text; ``now`` (default: the clock)
    dates the thread of an event without ``ts``."""
    if subject is None:
        subject = render_subject(event)
    if delayed_s is not None:
        subject = f"{delayed_prefix(delayed_s, locale)} {subject}"
    ts = event.ts
    if ts:
        when = datetime.fromtimestamp(ts).astimezone()
        stamp = when.strftime("%Y-%m-%d %H:%M:%S.%f|%z|%Y%m%d").split("|")
        produced: str | None = f"{stamp[0][:-3]} {stamp[1]}"
        day = stamp[2]
    else:
        produced = None
        day = datetime.fromtimestamp(time.time() if now is None else now).strftime("%Y%m%d")
    return Alert(
        event_id=event_id,
        subject=subject,
        severity=event.severity,
        strategy=event.strategy,
        kind=event.kind,
        text=event.body or "",
        rows=_rows(event.data),
        notes=tuple(notes),
        ts=ts,
        produced=produced,
        thread=Thread(event.strategy or "notifier", day),
        key=event_key(event),
        locale=locale,
        source=event,
    )


def build_digest(
    items: Sequence[tuple[str, Event]],
    *,
    reason: str = "",
    locale: str = "en",
    now: float | None = None,
) -> Digest:
    """One digest of (event id, event) pairs, oldest first, the counts in the subject
    (``[DIGEST] 37 alerts: 30 signal, 7 fill · ma_cross, grid_btc``)."""
    ordered = sorted(items, key=lambda ie: ie[1].ts or 0.0)
    kinds: dict[str, int] = {}
    strategies: dict[str, int] = {}
    rows: list[DigestRow] = []
    for event_id, ev in ordered:
        kinds[ev.kind] = kinds.get(ev.kind, 0) + 1
        if ev.strategy:
            strategies[ev.strategy] = strategies.get(ev.strategy, 0) + 1
        rows.append(
            DigestRow(
                event_id=event_id,
                time=datetime.fromtimestamp(ev.ts).strftime("%H:%M:%S") if ev.ts else "",
                severity=ev.severity,
                strategy=ev.strategy,
                kind=ev.kind,
                subject=render_subject(ev),
                text=ev.body or "",
                rows=_rows(ev.data),
                ts=ev.ts,
                key=event_key(ev),
            )
        )
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    who = ", ".join(list(strategies)[:3]) + (" …" if len(strategies) > 3 else "")
    subject = _line(f"[DIGEST] {len(rows)} alerts: {counts}" + (f" · {who}" if who else ""))
    thread = None
    if len(strategies) == 1:
        first = ordered[0][1].ts or (time.time() if now is None else now)
        thread = Thread(next(iter(strategies)), datetime.fromtimestamp(first).strftime("%Y%m%d"))
    return Digest(
        subject=subject,
        reason=reason,
        rows=tuple(rows),
        kinds=tuple(kinds.items()),
        strategies=tuple(strategies.items()),
        thread=thread,
        locale=locale,
    )


# ------------------------------------------------------------------------ byte limits
_ZWJ = "\u200d"


def _continues(char: str) -> bool:
    """True for a character that belongs to the one before it: combining marks, joiners,
    variation selectors, emoji skin tones and tag characters."""
    code = ord(char)
    return (
        char == _ZWJ
        or 0x1F3FB <= code <= 0x1F3FF
        or 0xE0020 <= code <= 0xE007F
        or unicodedata.category(char) in ("Mn", "Me", "Mc")
    )


def _cut(text: str, room: int) -> str:
    """The longest start of ``text`` of at most ``room`` UTF-8 bytes that ends between two
    characters as a person sees them (no half of an emoji sequence, flag or accent)."""
    kept = text.encode("utf-8")[: max(room, 0)].decode("utf-8", "ignore")
    end = len(kept)
    while end > 0 and end < len(text) and (_continues(text[end]) or text[end - 1] == _ZWJ):
        end -= 1
    flags = 0
    while flags < end and 0x1F1E6 <= ord(text[end - 1 - flags]) <= 0x1F1FF:
        flags += 1
    if flags % 2 and end < len(text) and 0x1F1E6 <= ord(text[end]) <= 0x1F1FF:
        end -= 1  # one regional indicator of a pair: the flag goes whole or not at all
    return text[:end]


def fit(text: str, max_bytes: int, marker: str = TRUNCATED) -> str:
    """``text`` in at most ``max_bytes`` UTF-8 bytes: unchanged when it fits, else cut
    between two characters (never inside a multi-byte character or an emoji sequence),
    trailing white space dropped, and ``marker`` appended (itself cut when even it does not
    fit)."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be 0 or more, not {max_bytes}")
    if len(text) * 4 <= max_bytes or len(text.encode("utf-8")) <= max_bytes:
        return text
    room = max_bytes - len(marker.encode("utf-8"))
    if room < 0:
        return _cut(marker, max_bytes)
    return _cut(text, room).rstrip() + marker


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _fit_alert(render: Callable[[Alert], str], alert: Alert, max_bytes: int | None) -> str:
    """Render; when too long, cut the free text so that the whole fits; the rest is cut only
    when the subject, notes and rows alone are too long."""
    out = render(alert)
    if max_bytes is None or _size(out) <= max_bytes:
        return out
    marker = truncated_marker(alert.locale)
    if alert.text:  # the longest cut of the text with which the whole fits: binary search

        def cut_to(budget: int) -> str:
            return render(replace(alert, text=fit(alert.text, budget, marker)))

        low, high = _size(marker), _size(alert.text) - 1
        while low < high:
            mid = (low + high + 1) // 2
            if _size(cut_to(mid)) <= max_bytes:
                low = mid
            else:
                high = mid - 1
        out = cut_to(low)
    if _size(out) > max_bytes:
        out = _cut(out, max_bytes - _size(marker))
        out = out[: len(out) - (len(out) - len(out.rstrip("\\"))) % 2] + marker
        out = _cut(out, max_bytes)
    return out


def _fit_digest(render: Callable[[Digest, int], str], digest: Digest, max_bytes: int | None) -> str:
    """Render all rows, else as many of the oldest as fit with a line saying how many more."""
    out = render(digest, digest.count)
    if max_bytes is None or _size(out) <= max_bytes:
        return out
    low, high = 0, digest.count - 1  # the most rows that fit: binary search
    while low < high:
        mid = (low + high + 1) // 2
        if _size(render(digest, mid)) <= max_bytes:
            low = mid
        else:
            high = mid - 1
    return fit(render(digest, low), max_bytes, truncated_marker(digest.locale))


# --------------------------------------------------------------------------- plain text
_WORDS = {
    "en": {
        "produced": "Produced",
        "event": "event",
        "alerts": "{n} alerts",
        "oldest": "oldest first",
        "more": "… and {n} more",
    },
    "zh": {
        "produced": "产生于",
        "event": "事件",
        "alerts": "{n} 条提醒",
        "oldest": "按时间先后",
        "more": "…… 另有 {n} 条",
    },
}


def _words(locale: str) -> dict[str, str]:
    return _WORDS.get(locale, _WORDS["en"])


def _headline(alert: Alert) -> str:
    return " · ".join(x for x in (alert.severity_label, alert.kind, alert.strategy) if x)


def _footer(alert: Alert) -> str:
    w = _words(alert.locale)
    event = f"{w['event']} {alert.event_id}"
    return f"{w['produced']} {alert.produced} · {event}" if alert.produced else event


def _alert_text(alert: Alert) -> str:
    blocks = [f"{alert.subject}\n{_headline(alert)}"]
    if alert.notes:
        blocks.append("\n".join(f">> {note}" for note in alert.notes))
    if alert.text:
        blocks.append(alert.text.replace("\r\n", "\n").replace("\r", "\n").strip("\n"))
    if alert.rows:
        blocks.append("\n".join(f"{key}: {value}" for key, value in alert.rows))
    blocks.append(_footer(alert))
    return "\n\n".join(blocks)


def as_text(alert: Alert, *, max_bytes: int | None = None) -> str:
    """The alert as plain text: subject, severity line, notes, text, data rows, produced
    time and event id, blank lines between. Nothing is escaped. With ``max_bytes``, the
    text is cut (with a marker) so that the whole fits."""
    return _fit_alert(_alert_text, alert, max_bytes)


def _digest_summary(digest: Digest) -> str:
    w = _words(digest.locale)
    head = w["alerts"].format(n=digest.count)
    if digest.reason:
        head += f" ({digest.reason})"
    return f"{head}, {w['oldest']}"


def _digest_line(row: DigestRow) -> str:
    who = f"{row.kind} · {row.strategy}" if row.strategy else row.kind
    when = f"{row.time} " if row.time else ""
    return f"{when}{SEVERITY_LABEL[row.severity]} {who}: {row.subject}"


def _digest_text(digest: Digest, shown: int) -> str:
    lines = [_digest_line(row) for row in digest.rows[:shown]]
    if shown < digest.count:
        lines.append(_words(digest.locale)["more"].format(n=digest.count - shown))
    return f"{digest.subject}\n{_digest_summary(digest)}\n\n" + "\n".join(lines)


def digest_as_text(digest: Digest, *, max_bytes: int | None = None) -> str:
    """The digest as plain text: subject, summary, one line per event. With ``max_bytes``,
    the newest rows give way to a line saying how many more there are."""
    return _fit_digest(_digest_text, digest, max_bytes)


# ----------------------------------------------------------------------------- markdown
_MD_INLINE = re.compile(
    r"[\\`*<|~]"  # emphasis, code, HTML and autolinks, tables, strikethrough
    r"|(?<![^\W_])_|_(?![^\W_])"  # "_" unless inside a word (a_b is never emphasis)
    r"|\](?=[(\[:])"  # "](", "][", "]:" make links and references
    r"|&(?=#?\w+;)"  # entities
)
_MD_BLOCK = r"( {0,3})([#>+=-]|\d{1,9}[.)])"  # headings, quotes, lists, setext underlines
_MD_LINE_START = re.compile("^" + _MD_BLOCK, re.MULTILINE)
_MD_NEXT_LINE = re.compile("(?<=\n)" + _MD_BLOCK)


def _escape_block(m: re.Match[str]) -> str:
    return m.group(1) + m.group(2)[:-1] + "\\" + m.group(2)[-1]


def escape_markdown(text: str, *, line_start: bool = True) -> str:
    """``text`` as CommonMark that reads back as the same text: a backslash before each
    character that would start markup (emphasis, code, links, HTML, tables, and at the
    start of a line headings, lists and quotes), and no other change (Chinese, ``[BUY]``,
    ``1700.50`` stay as they are). ``line_start=False`` for text that follows other text on
    its line (``- 1.5`` starts a list, ``x: -1.5`` does not)."""
    text = _MD_INLINE.sub(lambda m: "\\" + m.group(), text)
    return (_MD_LINE_START if line_start else _MD_NEXT_LINE).sub(_escape_block, text)


def _hard_breaks(lines: Sequence[str]) -> str:
    """Lines of one paragraph, each kept on its own line (two trailing spaces)."""
    return "  \n".join(lines)


def _alert_markdown(alert: Alert) -> str:
    def e(text: str) -> str:
        return escape_markdown(text, line_start=False)

    headline = " · ".join(e(x) for x in (alert.kind, alert.strategy) if x)
    blocks = [f"**{e(alert.subject.strip())}**", f"**{alert.severity_label}** · {headline}"]
    if alert.notes:
        blocks.append(_hard_breaks([f"> {escape_markdown(note)}" for note in alert.notes]))
    if alert.text:
        text = alert.text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
        blocks.append(_hard_breaks([escape_markdown(line) for line in text.split("\n")]))
    if alert.rows:
        blocks.append(_hard_breaks([f"**{e(k)}**: {e(v)}" for k, v in alert.rows]))
    blocks.append(escape_markdown(_footer(alert)))
    return "\n\n".join(blocks)


def as_markdown(alert: Alert, *, max_bytes: int | None = None) -> str:
    """The alert as CommonMark: the subject in bold, the severity line, notes as a quote,
    the text and the data rows (line breaks kept), produced time and event id. User text
    goes through :func:`escape_markdown`. With ``max_bytes``, as :func:`as_text`."""
    return _fit_alert(_alert_markdown, alert, max_bytes)


def _digest_markdown(digest: Digest, shown: int) -> str:
    e = escape_markdown
    lines = [f"- {e(_digest_line(row))}" for row in digest.rows[:shown]]
    title = escape_markdown(digest.subject, line_start=False)
    blocks = [f"**{title}**", e(_digest_summary(digest)), "\n".join(lines)]
    if shown < digest.count:
        blocks.append(e(_words(digest.locale)["more"].format(n=digest.count - shown)))
    return "\n\n".join(b for b in blocks if b)


def digest_as_markdown(digest: Digest, *, max_bytes: int | None = None) -> str:
    """The digest as CommonMark: bold subject, summary, a list with one item per event."""
    return _fit_digest(_digest_markdown, digest, max_bytes)


# ------------------------------------------------------------------------ for channels
def is_critical(content: Alert | Digest) -> bool:
    """A critical alert, or a digest that holds one (channels @-mention for these)."""
    if isinstance(content, Digest):
        return any(row.severity == "critical" for row in content.rows)
    return content.severity == "critical"


def text_of(content: Alert | Digest, *, max_bytes: int | None = None) -> str:
    """:func:`as_text` of an alert, :func:`digest_as_text` of a digest."""
    if isinstance(content, Digest):
        return digest_as_text(content, max_bytes=max_bytes)
    return as_text(content, max_bytes=max_bytes)


def markdown_of(content: Alert | Digest, *, max_bytes: int | None = None) -> str:
    """:func:`as_markdown` of an alert, :func:`digest_as_markdown` of a digest."""
    if isinstance(content, Digest):
        return digest_as_markdown(content, max_bytes=max_bytes)
    return as_markdown(content, max_bytes=max_bytes)
