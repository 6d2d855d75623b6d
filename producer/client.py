"""The light client a strategy imports: validate an event and LPUSH it, never hang.

    from producer import Notifier
    notifier = Notifier("redis://127.0.0.1:6379/0")
    notifier.send("止损触发 600519", strategy="ma_cross", data={"price": 1700.5})
    notifier.signal("ma_cross", "600519.SH", "BUY", 1700.5, 100)

Connect and command timeouts default to 0.5 s and redis-py's own retries are off, so a dead
Redis costs a strategy at most about a second and raises :class:`NotifierUnavailable`.
"""

from __future__ import annotations

import hashlib
import os
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from .event import (
    MAX_EVENT_BYTES,
    Event,
    InvalidEvent,
    Severity,
    event_from_dict,
    new_event_id,
)
from .keys import Keys

__all__ = ["AsyncNotifier", "Notifier", "NotifierUnavailable"]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_TIMEOUT_S = 0.5


class NotifierUnavailable(ConnectionError):
    """Redis could not take the event in time; the event was not queued."""


def _build_event(
    subject: str | None,
    *,
    body: str | None,
    data: Mapping[str, Any] | None,
    strategy: str | None,
    kind: str,
    severity: Severity,
    to: Sequence[str] | None,
    id: str | None,
    ts: float | str | None,
    extra: Mapping[str, Any],
) -> Event:
    unknown = set(extra) - OPTIONAL_FIELDS
    if unknown:
        raise TypeError(
            f"unknown event field(s) {', '.join(sorted(unknown))}; known optional fields: "
            f"{', '.join(sorted(OPTIONAL_FIELDS))}"
        )
    fields: dict[str, Any] = {
        "id": id or new_event_id(),
        "ts": time.time() if ts is None else ts,
        "strategy": strategy,
        "kind": kind,
        "severity": severity,
        "subject": subject,
        "body": body,
        "data": dict(data) if data is not None else None,
        "to": list(to) if to is not None else None,
        **extra,
    }
    return event_from_dict({k: v for k, v in fields.items() if v is not None})


# Optional fields passed as keyword arguments: dedup_key="...", dedup_window_s=300, expires_s=60
OPTIONAL_FIELDS = frozenset({"dedup_key", "dedup_window_s", "expires_s"})


def _error_fields(
    strategy: str, error: BaseException | str, dedup_window_s: float | None
) -> dict[str, Any]:
    """An exception (or text) as an error event that repeats collapse into one mail."""
    if isinstance(error, BaseException):
        name = type(error).__name__
        text = f"{name}: {error}" if str(error) else name
        body = "".join(traceback.format_exception(error))[-8000:]
    else:
        name, text, body = "error", str(error), None
    first_line = " ".join(text.split())[:200]
    key = hashlib.sha256(f"{strategy}|{first_line}".encode()).hexdigest()[:24]
    fields: dict[str, Any] = {
        "subject": f"[ERROR] {first_line} · {strategy}"[:256], "body": body,
        "strategy": strategy, "kind": "error", "dedup_key": f"error:{strategy}:{key}",
    }  # fmt: skip
    if dedup_window_s is not None:
        fields["dedup_window_s"] = dedup_window_s
    return fields


def _wire(event: Event) -> tuple[str, str]:
    """The event's id (assigned if absent) and its JSON text, checked against the size limit."""
    if event.id is None:
        event = event.model_copy(update={"id": new_event_id()})
    text = event.to_json()
    size = len(text.encode())
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {size} bytes, the limit is {MAX_EVENT_BYTES} bytes")
    assert event.id is not None
    return event.id, text


def _signal_data(
    symbol: str, side: str, price: float, qty: float, extra: Mapping[str, Any]
) -> dict[str, Any]:
    return {"symbol": symbol, "side": side.upper(), "price": price, "qty": qty, **extra}


def _url(redis_url: str | None) -> str:
    return redis_url or os.environ.get("NOTIFIER_REDIS_URL") or DEFAULT_REDIS_URL


def _prefix(key_prefix: str | None) -> str:
    return key_prefix or os.environ.get("NOTIFIER_KEY_PREFIX") or "notifier"


def _options(timeout: float) -> dict[str, Any]:
    """A strategy never hangs on its notifier: short timeouts, no redis-py retries."""
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }


class Notifier:
    """Synchronous producer. Thread-safe (redis-py's pool); cheap to keep for the process."""

    def __init__(
        self,
        redis_url: str | None = None,
        /,
        *,
        key_prefix: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        client: redis.Redis | None = None,
    ) -> None:
        self.keys = Keys(_prefix(key_prefix))
        self._redis = client or redis.Redis.from_url(_url(redis_url), **_options(timeout))

    def send(
        self,
        subject: str | None = None,
        /,
        *,
        body: str | None = None,
        data: Mapping[str, Any] | None = None,
        strategy: str | None = None,
        kind: str = "info",
        severity: Severity = "info",
        to: Sequence[str] | None = None,
        id: str | None = None,
        ts: float | str | None = None,
        **extra: Any,
    ) -> str:
        """Queue one event and return its id. Raises InvalidEvent or NotifierUnavailable."""
        event = _build_event(
            subject, body=body, data=data, strategy=strategy, kind=kind, severity=severity,
            to=to, id=id, ts=ts, extra=extra,
        )  # fmt: skip
        return self.send_event(event)

    def send_event(self, event: Event, /) -> str:
        event_id, text = _wire(event)
        try:
            self._redis.lpush(self.keys.queue, text)
        except RedisError as exc:
            raise NotifierUnavailable(f"notifier queue unreachable: {exc}") from exc
        return event_id

    def signal(
        self,
        strategy: str,
        symbol: str,
        side: str,
        price: float,
        qty: float,
        /,
        *,
        severity: Severity = "info",
        body: str | None = None,
        to: Sequence[str] | None = None,
        **extra: Any,
    ) -> str:
        """A trade signal: ``[BUY] 600519.SH 100 @ 1700.50 · ma_cross``."""
        return self.send(
            body=body, data=_signal_data(symbol, side, price, qty, extra), strategy=strategy,
            kind="signal", severity=severity, to=to,
        )  # fmt: skip

    def error(
        self,
        strategy: str,
        error: BaseException | str,
        /,
        *,
        severity: Severity = "critical",
        dedup_window_s: float | None = 300.0,
        to: Sequence[str] | None = None,
    ) -> str:
        """An exception (with its traceback) or error text. Repeats of the same error from
        the same strategy within ``dedup_window_s`` become one mail; the next one after the
        window says how many were suppressed."""
        fields = _error_fields(strategy, error, dedup_window_s)
        subject = fields.pop("subject")
        return self.send(subject, severity=severity, to=to, **fields)

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncNotifier:
    """asyncio producer with the same interface as :class:`Notifier` (``await send(...)``)."""

    def __init__(
        self,
        redis_url: str | None = None,
        /,
        *,
        key_prefix: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        client: aredis.Redis | None = None,
    ) -> None:
        self.keys = Keys(_prefix(key_prefix))
        self._redis = client or aredis.Redis.from_url(_url(redis_url), **_options(timeout))

    async def send(
        self,
        subject: str | None = None,
        /,
        *,
        body: str | None = None,
        data: Mapping[str, Any] | None = None,
        strategy: str | None = None,
        kind: str = "info",
        severity: Severity = "info",
        to: Sequence[str] | None = None,
        id: str | None = None,
        ts: float | str | None = None,
        **extra: Any,
    ) -> str:
        event = _build_event(
            subject, body=body, data=data, strategy=strategy, kind=kind, severity=severity,
            to=to, id=id, ts=ts, extra=extra,
        )  # fmt: skip
        return await self.send_event(event)

    async def send_event(self, event: Event, /) -> str:
        event_id, text = _wire(event)
        try:
            await self._redis.lpush(self.keys.queue, text)
        except (RedisError, OSError) as exc:
            raise NotifierUnavailable(f"notifier queue unreachable: {exc}") from exc
        return event_id

    async def signal(
        self,
        strategy: str,
        symbol: str,
        side: str,
        price: float,
        qty: float,
        /,
        *,
        severity: Severity = "info",
        body: str | None = None,
        to: Sequence[str] | None = None,
        **extra: Any,
    ) -> str:
        return await self.send(
            body=body, data=_signal_data(symbol, side, price, qty, extra), strategy=strategy,
            kind="signal", severity=severity, to=to,
        )  # fmt: skip

    async def error(
        self,
        strategy: str,
        error: BaseException | str,
        /,
        *,
        severity: Severity = "critical",
        dedup_window_s: float | None = 300.0,
        to: Sequence[str] | None = None,
    ) -> str:
        fields = _error_fields(strategy, error, dedup_window_s)
        subject = fields.pop("subject")
        return await self.send(subject, severity=severity, to=to, **fields)

    async def aclose(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> AsyncNotifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
