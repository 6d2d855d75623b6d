"""The wire contract: one event, JSON in UTF-8, one per element of ``<prefix>:queue``.

The worker imports this module to parse what it fetches; the producer uses it to refuse bad
events before they reach Redis. Limits (see README, "The event"):

* the whole event is at most 64 KiB of JSON (``MAX_EVENT_BYTES``);
* ``subject`` at most 256 characters, a single line; ``strategy``, ``kind`` and ``id`` are
  single-line too (they end up in headers);
* ``to`` at most 50 plain addresses (``local@domain``, ASCII);
* ``data`` is a flat object: string keys, scalar JSON values (string, number, bool, null);
* at least one of ``subject``, ``body``, ``data``.

Unknown fields are ignored, so a newer producer can talk to an older worker. ``_meta`` is
reserved for the worker (attempt count and last error of a retried event).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_RECIPIENTS",
    "MAX_SUBJECT_CHARS",
    "Event",
    "InvalidEvent",
    "Meta",
    "Severity",
    "check_addresses",
    "check_strategy",
    "new_event_id",
    "parse_event",
    "valid_address",
]

CONTRACT_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
MAX_SUBJECT_CHARS = 256
MAX_RECIPIENTS = 50
MAX_ID_CHARS = 128
MAX_STRATEGY_CHARS = 128
MAX_DATA_FIELDS = 100
MAX_WINDOW_S = 7 * 24 * 3600.0

Severity = Literal["info", "warning", "critical"]
Scalar = StrictStr | StrictInt | StrictFloat | StrictBool | None

# Single-line fields: no control characters at all (CR/LF would let text become a header).
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85\ud800-\udfff]")
# Body text: lines and tabs are fine; other controls (NUL, ESC, ...) are not.
# (and no lone surrogates anywhere: JSON can escape one, UTF-8 cannot carry it)
_BODY_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
_ID = re.compile(r"[\x21-\x7e]{1,128}")


class InvalidEvent(ValueError):
    """The event breaks the contract; ``reason`` says how, in words a person can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def valid_address(address: str) -> bool:
    """True for a plain ASCII ``local@domain`` address (no display name, no brackets)."""
    return len(address) <= 254 and _ADDRESS.fullmatch(address) is not None


def check_addresses(addresses: list[str]) -> list[str]:
    """Lower-cased addresses; ValueError naming the first that is not a plain address."""
    for address in addresses:
        if not valid_address(address):
            raise ValueError(f"{address[:80]!r} is not a plain address like name@example.com")
    return [a.lower() for a in addresses]


def new_event_id() -> str:
    """A fresh event id: 32 hex characters, safe in a Message-ID."""
    return uuid.uuid4().hex


def _single_line(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(
            f"{what} must be a single line without control characters (CR, LF, ...) or unpaired surrogates"
        )
    return value


def check_strategy(strategy: object) -> str:
    """A strategy name as a heartbeat gives it (the key of its sign of life): a non-empty
    single line of at most 128 characters, like an event's ``strategy``. InvalidEvent, with
    one line saying what to give, otherwise."""
    shown = repr(strategy) if len(repr(strategy)) <= 40 else repr(strategy)[:39] + "…"
    if not isinstance(strategy, str):
        why = f"is a {type(strategy).__name__}, not a name"
    elif not strategy:
        why = "is empty"
    elif len(strategy) > MAX_STRATEGY_CHARS:
        why = f"is {len(strategy)} characters long"
    elif _CONTROL.search(strategy):
        why = "has a control character (CR, LF, ...) or an unpaired surrogate"
    else:
        return strategy
    raise InvalidEvent(
        f"strategy {shown} {why}: give the strategy's name, 1 to {MAX_STRATEGY_CHARS}"
        " characters on one line"
    )


class Meta(BaseModel):
    """Worker-owned bookkeeping that travels with a retried event (field ``_meta``)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    attempts: StrictInt = Field(default=0, ge=0)
    last_error: StrictStr | None = None
    first_seen: StrictFloat | StrictInt | None = None
    replayed: StrictBool = False
    note: StrictStr | None = None  # "repeated 37× in 5 min", kept for the retries of that mail
    # the one channel this copy is the delivery for (set when an event fans out to several)
    channel: StrictStr | None = None


class Event(BaseModel):
    """One alert, as a strategy sends it."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True, frozen=True)

    v: StrictInt = CONTRACT_VERSION
    id: StrictStr | None = None
    ts: float | None = None
    strategy: Annotated[StrictStr, Field(max_length=MAX_STRATEGY_CHARS)] | None = None
    kind: Annotated[StrictStr, Field(min_length=1, max_length=64)] = "info"
    severity: Severity = "info"
    subject: Annotated[StrictStr, Field(max_length=MAX_SUBJECT_CHARS)] | None = None
    body: StrictStr | None = None
    data: dict[str, Scalar] | None = None
    to: Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_RECIPIENTS)] | None = None
    # Optional since contract v1.1 (older events stay valid; older workers ignore them):
    dedup_key: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None
    dedup_window_s: Annotated[float, Field(gt=0, le=MAX_WINDOW_S)] | None = None
    expires_s: Annotated[float, Field(gt=0, le=MAX_WINDOW_S)] | None = None
    meta: Meta | None = Field(default=None, alias="_meta")

    @field_validator("v")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != CONTRACT_VERSION:
            raise ValueError(
                f"contract version {v} is not supported by this worker (it speaks v"
                f"{CONTRACT_VERSION}); upgrade the worker, then replay the dead letter"
            )
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not _ID.fullmatch(v):
            raise ValueError(
                f"must be 1 to {MAX_ID_CHARS} printable ASCII characters without spaces"
            )
        return v

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError("must be unix seconds or an ISO-8601 time, not a boolean")
        if isinstance(v, int | float):
            ts = float(v)
        elif isinstance(v, str):
            try:
                when = datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(
                    "must be unix seconds or an ISO-8601 time such as 2026-11-25T09:30:00+08:00"
                ) from None
            # A time without an offset is the worker's local time, like the strategy's clock.
            ts = when.timestamp() if when.tzinfo else when.astimezone().timestamp()
        else:
            raise ValueError("must be unix seconds or an ISO-8601 time")
        if not math.isfinite(ts) or ts < 0:
            raise ValueError("must be a finite, positive unix time")
        if ts >= 1e11:
            raise ValueError(
                f"{ts:.0f} looks like milliseconds; send unix seconds (e.g. time.time())"
            )
        return ts

    @field_validator("dedup_window_s", "expires_s", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> Any:
        if isinstance(v, bool) or (v is not None and not isinstance(v, int | float)):
            raise ValueError("must be a number of seconds")
        return v

    @field_validator("strategy", "kind", "subject", "dedup_key")
    @classmethod
    def _line(cls, v: str | None) -> str | None:
        return None if v is None else _single_line(v, "this field")

    @field_validator("body")
    @classmethod
    def _body(cls, v: str | None) -> str | None:
        if v is not None and _BODY_CONTROL.search(v):
            raise ValueError(
                "must not contain control characters (other than newline and tab) or unpaired"
                " surrogates"
            )
        return v

    @field_validator("data", mode="before")
    @classmethod
    def _data_flat(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key, value in v.items():
                if not (value is None or isinstance(value, str | int | float | bool)):
                    raise ValueError(
                        f"value of {str(key)[:40]!r} is a {type(value).__name__}: data is a flat"
                        " table of strings, numbers, true/false or null"
                    )
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        if len(v) > MAX_DATA_FIELDS:
            raise ValueError(f"at most {MAX_DATA_FIELDS} fields")
        for key, value in v.items():
            if not key or len(key) > 64:
                raise ValueError("keys must be 1 to 64 characters")
            _single_line(key, f"key {key[:20]!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"value of {key!r} must be a finite number")
            if isinstance(value, str) and _BODY_CONTROL.search(value):
                raise ValueError(f"value of {key!r} must not contain control characters")
        return v

    @field_validator("to")
    @classmethod
    def _to(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        return list(dict.fromkeys(check_addresses(v)))

    @model_validator(mode="after")
    def _has_content(self) -> Self:
        if self.subject is None and self.body is None and not self.data:
            raise ValueError("an event needs at least one of subject, body, data")
        return self

    # ----------------------------------------------------------------- JSON in and out
    def to_json(self) -> str:
        """Compact JSON (UTF-8 text, not ASCII-escaped) as it goes on the queue."""
        return self.model_dump_json(by_alias=True, exclude_none=True)

    def with_meta(self, **changes: Any) -> Event:
        meta = (self.meta or Meta()).model_copy(update=changes)
        return self.model_copy(update={"meta": meta})

    @property
    def attempts(self) -> int:
        return self.meta.attempts if self.meta else 0


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "event"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts[:5]) + (f" (+{len(parts) - 5} more)" if len(parts) > 5 else "")


def parse_event(raw: bytes | str) -> Event:
    """Parse one queue element; raise :class:`InvalidEvent` with a readable reason."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {len(data)} bytes, the limit is {MAX_EVENT_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"event is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"event is not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"event must be a JSON object, got {type(obj).__name__}")
    return event_from_dict(obj)


def event_from_dict(obj: dict[str, Any]) -> Event:
    try:
        return Event.model_validate(obj)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc)) from None
