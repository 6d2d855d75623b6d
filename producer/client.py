"""The light client a strategy imports: validate an event and LPUSH it, never hang.

    from producer import Notifier
    notifier = Notifier("redis://127.0.0.1:6379/0")  # else NOTIFIER_REDIS_URL, else env_file
    notifier.send("止损触发 600519", strategy="ma_cross", data={"price": 1700.5})
    notifier.signal(strategy="ma_cross", symbol="600519.SH", side="BUY", price=1700.5, qty=100)
    notifier.heartbeat("ma_cross")                    # a sign of life: ZADD <prefix>:seen GT
    with notifier.keepalive("ma_cross", every_s=30):  # one every 30 s (producer.keepalive)
        run_strategy()

Connect and command timeouts default to 0.5 s and redis-py's own retries are off, so a dead
Redis costs a strategy at most about a second (or ``retry_s``, when asked to keep trying).

Exceptions::

    InvalidEvent (ValueError)            the event breaks the contract; nothing was sent
    NotifierUnavailable (ConnectionError)  Redis did not confirm it took the event
    ├── NotifierRefused                  certainly not queued (refused connection, unknown
    │                                    host, or Redis answered an error: OOM, MISCONF,
    │                                    READONLY, wrong password, ...)          .queued False
    ├── NotifierTimeout (also TimeoutError)  may have been queued (no answer in time, or the
    │                                    connection broke after the command went out) .queued None
    └── NotifierNotReplicated            queued on the master, not confirmed on a replica
                                         within replica_timeout_ms (replicas=N)  .queued True

Every ``NotifierUnavailable`` of a send carries ``event`` and ``event_id``. Sending the same
event again (``notifier.send_event(exc.event)``) is safe: the worker sends one mail per id (its
``sending:<id>`` claim and ``sent:<id>`` mark turn a second copy into a no-op). A heartbeat's
error has no event (``event`` and ``event_id`` are None; its message names the strategy) and
"queued" reads "recorded"; a heartbeat again is always safe.

Acknowledged pushes: ``Notifier(..., replicas=1, replica_timeout_ms=100)`` (or
``NOTIFIER_PRODUCER_REPLICAS`` / ``NOTIFIER_PRODUCER_REPLICA_TIMEOUT_MS``) sends ``LPUSH`` and
``WAIT 1 100`` in one round trip: ``send`` returns only once that many replicas hold the
event, else raises NotifierNotReplicated. A call may then last ``timeout`` plus
``replica_timeout_ms`` plus 0.2 s (Redis ends a timed-out ``WAIT`` on its next timer tick, up
to 0.1 s late at its default ``hz 10``). Heartbeats never wait for replicas. The URL may name
a standalone Redis, a Sentinel service or a Cluster (:mod:`producer.topology`).
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import hashlib
import os
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Self, TypeVar

from redis.backoff import NoBackoff
from redis.retry import Retry

from .env import resolve
from .event import (
    MAX_EVENT_BYTES,
    Event,
    InvalidEvent,
    Severity,
    check_strategy,
    event_from_dict,
    new_event_id,
)
from .keepalive import AsyncKeepAlive, KeepAlive, running_loop
from .keys import Keys
from .redis_errors import command_not_run, explain_redis_error
from .topology import (
    REDIS_ERRORS,
    AsyncClient,
    SyncClient,
    async_client,
    describe,
    sync_client,
)

__all__ = [
    "AsyncKeepAlive",
    "AsyncNotifier",
    "KeepAlive",
    "Notifier",
    "NotifierNotReplicated",
    "NotifierRefused",
    "NotifierTimeout",
    "NotifierUnavailable",
]

DEFAULT_TIMEOUT_S = 0.5
_FIRST_PAUSE_S = 0.05  # between attempts when retrying: 0.05, 0.1, 0.2, 0.4, 0.5, 0.5 ...
_MAX_PAUSE_S = 0.5
# Redis ends a timed-out WAIT on a tick of its timer (1/hz: 0.1 s by default), so its answer
# comes up to that much after replica_timeout_ms: a reply is awaited this much longer, lest a
# short ``timeout`` turn "not confirmed on a replica" into "may or may not have been queued".
_WAIT_SLACK_S = 0.2


# ------------------------------------------------------------------------------ exceptions
class NotifierUnavailable(ConnectionError):
    """Redis did not confirm that it took the event (see the subclasses for whether it may
    have). ``event`` is the event as sent (with its id), ``event_id`` its id."""

    queued: ClassVar[bool | None] = None

    def __init__(self, message: str, *, event: Event | None = None) -> None:
        super().__init__(message)
        self.event = event
        self.event_id = event.id if event is not None else None


class NotifierRefused(NotifierUnavailable):
    """The event was certainly not queued: no connection, or Redis answered with an error."""

    queued: ClassVar[bool | None] = False


class NotifierTimeout(NotifierUnavailable, TimeoutError):
    """The event may have been queued: Redis did not answer in time (or the connection broke
    after the command went out). Sending the same event again is safe."""

    queued: ClassVar[bool | None] = None


class NotifierNotReplicated(NotifierUnavailable):
    """Acknowledged pushes (``replicas=N``): the master queued the event but fewer than N
    replicas confirmed it within ``replica_timeout_ms``. A failover now could lose it;
    sending the same event again is safe. ``replicas`` is how many did confirm."""

    queued: ClassVar[bool | None] = True

    def __init__(self, message: str, *, event: Event | None = None, replicas: int = 0) -> None:
        super().__init__(message, event=event)
        self.replicas = replicas


class _Unconfirmed(Exception):
    """WAIT answered fewer replicas than asked (internal: becomes NotifierNotReplicated)."""

    def __init__(self, confirmed: int) -> None:
        super().__init__(confirmed)
        self.confirmed = confirmed


# ------------------------------------------------------------------------ building events
# Optional fields passed as keyword arguments: dedup_key="...", dedup_window_s=300, expires_s=60
OPTIONAL_FIELDS = frozenset({"dedup_key", "dedup_window_s", "expires_s"})
_SEND_FIELDS = frozenset(
    {"subject", "body", "data", "strategy", "kind", "severity", "to", "id", "ts"}
)
_OPTIONS = frozenset({"retry_s"})
# signal()'s keywords: a keyword close to one of these is a typo, not a data field.
_SIGNAL_KEYWORDS = (
    frozenset(
        {"strategy", "symbol", "side", "price", "qty", "severity", "body", "to", "id", "ts", "data"}
    )
    | _OPTIONS
)


def _closest(name: str, candidates: Collection[str], cutoff: float) -> str | None:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=cutoff)
    return close[0] if close else None


def _unexpected(method: str, name: str, close: str | None, rest: str) -> TypeError:
    hint = f" (did you mean {close!r}?)" if close else ""
    return TypeError(f"{method}() got an unexpected keyword argument {name!r}{hint}; {rest}")


def _check_send_keywords(extra: Mapping[str, Any]) -> None:
    for name in sorted(set(extra) - OPTIONAL_FIELDS):
        fields = _SEND_FIELDS | OPTIONAL_FIELDS
        close = _closest(name, fields | _OPTIONS, cutoff=0.6)
        raise _unexpected("send", name, close, f"event fields: {', '.join(sorted(fields))}")


def _check_signal_keywords(extra: Mapping[str, Any]) -> None:
    """Other keywords of signal() are data fields, except one that looks like a typo."""
    for name in sorted(extra):
        close = _closest(name, _SIGNAL_KEYWORDS, cutoff=0.85)
        if close is not None:
            rest = f"to keep a data field of that name, pass data={{{name!r}: ...}}"
            raise _unexpected("signal", name, close, rest)


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
    _check_send_keywords(extra)
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


def _signal_data(
    *,
    symbol: str,
    side: str,
    price: float,
    qty: float,
    data: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    _check_signal_keywords(extra)
    fixed = {"symbol": symbol, "side": side.upper(), "price": price, "qty": qty}
    return {**fixed, **(data or {}), **extra}


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
        "subject": f"[ERROR] {first_line} · {strategy}"[:256],
        "body": body,
        "strategy": strategy,
        "kind": "error",
        "dedup_key": f"error:{strategy}:{key}",
    }
    if dedup_window_s is not None:
        fields["dedup_window_s"] = dedup_window_s
    return fields


def _wire(event: Event) -> tuple[Event, str, str]:
    """The event (with an id assigned if absent), its id and its JSON text, checked for size."""
    if event.id is None:
        event = event.model_copy(update={"id": new_event_id()})
    text = event.to_json()
    size = len(text.encode())
    if size > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is {size} bytes, the limit is {MAX_EVENT_BYTES} bytes")
    assert event.id is not None
    return event, event.id, text


# ------------------------------------------------------------------------------- sending
@dataclass(frozen=True, slots=True)
class _Command:
    """One command of the producer, as its errors name it."""

    not_done: str  # "event <id> was not queued"
    maybe_done: str  # "event <id> may or may not have been queued"
    again: str  # after a timeout: why doing it again is safe
    event: Event | None = None


def _queueing(event: Event) -> _Command:
    return _Command(
        not_done=f"event {event.id} was not queued",
        maybe_done=f"event {event.id} may or may not have been queued",
        again="sending it again with the same id is safe (send_event(exc.event))",
        event=event,
    )


def _beating(strategy: str) -> _Command:
    return _Command(
        not_done=f"heartbeat of {strategy!r} was not recorded",
        maybe_done=f"heartbeat of {strategy!r} may or may not have been recorded",
        again="a heartbeat again is safe (an older time never replaces a newer one)",
    )


class _Attempts:
    """The attempts of one command after the first failed: pauses, the ``retry_s`` budget,
    and the exception to raise. Another attempt starts only if, lasting as long as the
    longest so far, it still ends within the budget: a call gives up early rather than late."""

    def __init__(
        self, *, command: _Command, started: float, budget: float, url: str | None
    ) -> None:
        self.command = command
        self.started = started
        self.deadline = started + budget
        self.url = url
        self.pauses = 0
        self.longest = 0.0
        self.maybe_queued = False
        self.last: BaseException | None = None

    def failed(self, exc: BaseException, attempt_started: float) -> float | None:
        """Record a failed attempt; the pause before the next one, or None to give up."""
        now = time.monotonic()
        self.last = exc
        self.maybe_queued = self.maybe_queued or not command_not_run(exc)
        self.longest = max(self.longest, now - attempt_started)
        pause = min(_FIRST_PAUSE_S * 2**self.pauses, _MAX_PAUSE_S)
        self.pauses += 1
        return pause if now + pause + self.longest <= self.deadline else None

    def error(self) -> NotifierUnavailable:
        assert self.last is not None
        why = explain_redis_error(self.last, self.url)
        command = self.command
        if self.maybe_queued:
            return NotifierTimeout(
                f"{command.maybe_done}: {why}; {command.again}", event=command.event
            )
        return NotifierRefused(f"{command.not_done}: {why}", event=command.event)


def _options(timeout: float, wait_s: float = 0.0) -> dict[str, Any]:
    """A strategy never hangs on its notifier: short timeouts, no redis-py retries. A reply
    may take ``wait_s`` longer when it waits for replicas (``WAIT``)."""
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout + wait_s,
        "retry": Retry(NoBackoff(), 0),
    }


def _seconds(name: str, value: float, *, positive: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 if positive else value >= 0)
    ):
        need = "a number of seconds above 0" if positive else "a number of seconds, 0 or more"
        raise ValueError(f"{name}={value!r}: give {need}")
    return float(value)


ClientT = TypeVar("ClientT", SyncClient, AsyncClient)
KeepAliveT = TypeVar("KeepAliveT", KeepAlive, AsyncKeepAlive)


class _Producer(Generic[ClientT]):
    """What the sync and asyncio clients share: settings, key names, the Redis client."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        key_prefix: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry_s: float = 0.0,
        env_file: str | os.PathLike[str] | None = None,
        client: ClientT | None = None,
        replicas: int | None = None,
        replica_timeout_ms: int | None = None,
    ) -> None:
        url, prefix, self.replicas, self.replica_timeout_ms = resolve(
            redis_url=redis_url,
            key_prefix=key_prefix,
            env_file=env_file,
            replicas=replicas,
            replica_timeout_ms=replica_timeout_ms,
        )
        if client is None:
            describe(url)  # a URL that is not one is a ValueError here, not at the first send
        self.keys = Keys.for_redis(prefix, client if client is not None else url)
        self.timeout = _seconds("timeout", timeout, positive=True)
        self.retry_s = _seconds("retry_s", retry_s, positive=False)
        if self.replicas and self.keys.cluster:
            raise ValueError(
                f"replicas={self.replicas}: acknowledged pushes need a standalone or Sentinel "
                "Redis (WAIT must follow the push on the node that holds the queue); on a "
                "Cluster leave replicas at 0 (NOTIFIER_PRODUCER_REPLICAS)"
            )
        self._url = None if client is not None else url
        # Made at first use, so that a constructor never touches the network: redis-py's
        # synchronous Cluster client reads the slot map in its own constructor, and a node
        # that is down then would raise out of Notifier(...) instead of NotifierUnavailable
        # out of send (which makes the client inside its error handling).
        self._client: ClientT | None = client
        self._client_lock = threading.Lock()
        self._keepalives: list[KeepAlive | AsyncKeepAlive] = []  # stopped by close()

    def _connect(self, url: str) -> ClientT:
        raise NotImplementedError

    @property
    def _redis(self) -> ClientT:
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    assert self._url is not None  # no client given: there is a URL
                    self._client = self._connect(self._url)
                client = self._client
        return client

    @property
    def _wait_s(self) -> float:
        """How much longer than ``timeout`` a push may wait for its replicas."""
        return self.replica_timeout_ms / 1000 + _WAIT_SLACK_S if self.replicas else 0.0

    def _pushed(self, replies: list[Any]) -> None:
        """Check a ``LPUSH`` + ``WAIT`` pipeline's replies: ``_Unconfirmed`` if too few
        replicas confirmed the push."""
        confirmed = int(replies[-1])
        if confirmed < self.replicas:
            raise _Unconfirmed(confirmed)

    def _not_replicated(self, event: Event, confirmed: int) -> NotifierNotReplicated:
        return NotifierNotReplicated(
            f"event {event.id} was queued on the master, not confirmed on a replica "
            f"({confirmed} of {self.replicas} replica(s) within {self.replica_timeout_ms} ms); "
            "sending it again with the same id is safe (send_event(exc.event))",
            event=event,
            replicas=confirmed,
        )

    def _attempts(self, command: _Command, started: float, budget: float) -> _Attempts:
        return _Attempts(command=command, started=started, budget=budget, url=self._url)

    def _budget(self, retry_s: float | None) -> float:
        """How long a call may keep trying: its ``retry_s``, else the client's."""
        return self.retry_s if retry_s is None else _seconds("retry_s", retry_s, positive=False)

    def _heartbeat(self, strategy: str) -> tuple[_Command, str, dict[str, float]]:
        """What a heartbeat of ``strategy`` says and writes: its sorted set and the member
        with the time now (``ZADD ... GT``, so a late retry never moves it back)."""
        strategy = check_strategy(strategy)
        return _beating(strategy), self.keys.seen, {strategy: time.time()}

    def _keepalive_twin(self, strategy: str, every_s: float) -> tuple[str, float, Self]:
        """The checked arguments of a keep-alive and the producer it beats with: the same
        settings on a Redis client of its own, so that a frozen Redis never holds a
        connection that the strategy's own sends need. A client given as ``client=`` is
        shared (there is no URL to open another)."""
        strategy = check_strategy(strategy)
        every_s = _seconds("every_s", every_s, positive=True)
        if self._url is None:
            return strategy, every_s, self
        twin = copy.copy(self)
        twin.replicas = 0  # it only beats: the plain ``timeout`` per call, as stop() expects
        twin._client = None  # its own, made at its first beat
        twin._client_lock = threading.Lock()
        twin._keepalives = []
        return strategy, every_s, twin

    def _started(self, keepalive: KeepAliveT) -> KeepAliveT:
        self._keepalives = [k for k in self._keepalives if k.running] + [keepalive]
        return keepalive

    def _stop_keepalives(self) -> None:
        for keepalive in self._keepalives:
            keepalive.stop()


class Notifier(_Producer[SyncClient]):
    """Synchronous producer. Thread-safe (redis-py's pool); cheap to keep for the process.

    ``Notifier(redis_url=None, *, key_prefix=None, timeout=0.5, retry_s=0.0, env_file=None)``:
    the URL and prefix come from the arguments, else ``NOTIFIER_REDIS_URL`` /
    ``NOTIFIER_KEY_PREFIX``, else ``env_file`` (or the file named by ``NOTIFIER_ENV_FILE``).
    ``retry_s`` is the default of every send's ``retry_s``.
    """

    def _connect(self, url: str) -> SyncClient:
        return sync_client(url, **_options(self.timeout, self._wait_s))

    def send(
        self,
        subject: str | None = None,
        *,
        body: str | None = None,
        data: Mapping[str, Any] | None = None,
        strategy: str | None = None,
        kind: str = "info",
        severity: Severity = "info",
        to: Sequence[str] | None = None,
        id: str | None = None,
        ts: float | str | None = None,
        retry_s: float | None = None,
        **extra: Any,
    ) -> str:
        """Queue one event and return its id. Raises InvalidEvent, or NotifierUnavailable
        (NotifierRefused / NotifierTimeout) after trying for up to ``retry_s`` seconds."""
        event = _build_event(
            subject,
            body=body,
            data=data,
            strategy=strategy,
            kind=kind,
            severity=severity,
            to=to,
            id=id,
            ts=ts,
            extra=extra,
        )
        return self.send_event(event, retry_s=retry_s)

    def send_event(self, event: Event, /, *, retry_s: float | None = None) -> str:
        budget = self._budget(retry_s)
        event, event_id, text = _wire(event)
        if not self.replicas:
            self._run(_queueing(event), lambda: self._redis.lpush(self.keys.queue, text), budget)
            return event_id

        def push() -> None:
            pipe = self._redis.pipeline(transaction=False)
            pipe.lpush(self.keys.queue, text)
            pipe.execute_command("WAIT", self.replicas, self.replica_timeout_ms)
            self._pushed(pipe.execute())

        try:
            self._run(_queueing(event), push, budget)
        except _Unconfirmed as exc:
            raise self._not_replicated(event, exc.confirmed) from None
        return event_id

    def heartbeat(self, strategy: str, *, retry_s: float | None = None) -> None:
        """Record that ``strategy`` is alive now: one ``ZADD <prefix>:seen GT <now>
        <strategy>``. Same timeouts, ``retry_s`` and errors as :meth:`send`; InvalidEvent
        if ``strategy`` is not a name (empty, several lines, over 128 characters)."""
        budget = self._budget(retry_s)
        command, key, member = self._heartbeat(strategy)
        self._run(command, lambda: self._redis.zadd(key, member, gt=True), budget)

    def keepalive(self, strategy: str, every_s: float = 30.0) -> KeepAlive:
        """Start a heartbeat of ``strategy`` at once and every ``every_s`` seconds on a
        daemon thread; ``stop()`` the handle or use it as a context manager. It never raises
        into the strategy and never delays its calls (see :mod:`producer.keepalive`)."""
        strategy, every_s, twin = self._keepalive_twin(strategy, every_s)
        keepalive = KeepAlive(
            strategy,
            every_s=every_s,
            beat=lambda: twin.heartbeat(strategy, retry_s=0),
            close=twin._close_client if twin is not self else None,
            url=self._url,
            stop_wait_s=self.timeout + 0.1,
        )
        return self._started(keepalive)

    def _run(self, command: _Command, call: Callable[[], object], budget: float) -> None:
        """``call()``, tried again while ``budget`` seconds last; NotifierUnavailable if no
        attempt worked."""
        attempts: _Attempts | None = None
        attempt_started = time.monotonic()
        while True:
            try:
                call()
                return
            except REDIS_ERRORS as exc:
                attempts = attempts or self._attempts(command, attempt_started, budget)
                pause = attempts.failed(exc, attempt_started)
            if pause is None:
                raise attempts.error() from attempts.last
            time.sleep(pause)
            attempt_started = time.monotonic()

    def signal(
        self,
        strategy: str,
        symbol: str,
        side: str,
        price: float,
        qty: float,
        *,
        severity: Severity = "info",
        body: str | None = None,
        to: Sequence[str] | None = None,
        id: str | None = None,
        ts: float | str | None = None,
        data: Mapping[str, Any] | None = None,
        retry_s: float | None = None,
        **extra: Any,
    ) -> str:
        """A trade signal: ``[BUY] 600519.SH 100 @ 1700.50 · ma_cross``. Other keywords
        (``reason="golden cross"``) and ``data`` become rows of its table."""
        fields = _signal_data(
            symbol=symbol, side=side, price=price, qty=qty, data=data, extra=extra
        )
        return self.send(
            body=body,
            data=fields,
            strategy=strategy,
            kind="signal",
            severity=severity,
            to=to,
            id=id,
            ts=ts,
            retry_s=retry_s,
        )

    def error(
        self,
        strategy: str,
        error: BaseException | str,
        *,
        severity: Severity = "critical",
        dedup_window_s: float | None = 300.0,
        to: Sequence[str] | None = None,
        retry_s: float | None = None,
    ) -> str:
        """An exception (with its traceback) or error text. Repeats of the same error from
        the same strategy within ``dedup_window_s`` become one mail; the next one after the
        window says how many were suppressed."""
        fields = _error_fields(strategy, error, dedup_window_s)
        return self.send(severity=severity, to=to, retry_s=retry_s, **fields)

    def close(self) -> None:
        """Stop this client's keep-alives and close its connections."""
        self._stop_keepalives()
        self._close_client()

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncNotifier(_Producer[AsyncClient]):
    """asyncio producer with the same interface as :class:`Notifier` (``await send(...)``)."""

    def _connect(self, url: str) -> AsyncClient:
        return async_client(url, **_options(self.timeout, self._wait_s))

    async def send(
        self,
        subject: str | None = None,
        *,
        body: str | None = None,
        data: Mapping[str, Any] | None = None,
        strategy: str | None = None,
        kind: str = "info",
        severity: Severity = "info",
        to: Sequence[str] | None = None,
        id: str | None = None,
        ts: float | str | None = None,
        retry_s: float | None = None,
        **extra: Any,
    ) -> str:
        event = _build_event(
            subject,
            body=body,
            data=data,
            strategy=strategy,
            kind=kind,
            severity=severity,
            to=to,
            id=id,
            ts=ts,
            extra=extra,
        )
        return await self.send_event(event, retry_s=retry_s)

    async def send_event(self, event: Event, /, *, retry_s: float | None = None) -> str:
        budget = self._budget(retry_s)
        event, event_id, text = _wire(event)
        if not self.replicas:
            await self._run(
                _queueing(event), lambda: self._redis.lpush(self.keys.queue, text), budget
            )
            return event_id

        async def push() -> None:
            pipe = self._redis.pipeline(transaction=False)
            pipe.lpush(self.keys.queue, text)
            pipe.execute_command("WAIT", self.replicas, self.replica_timeout_ms)
            self._pushed(await pipe.execute())

        try:
            await self._run(_queueing(event), push, budget)
        except _Unconfirmed as exc:
            raise self._not_replicated(event, exc.confirmed) from None
        return event_id

    async def heartbeat(self, strategy: str, *, retry_s: float | None = None) -> None:
        """Record that ``strategy`` is alive now (see :meth:`Notifier.heartbeat`)."""
        budget = self._budget(retry_s)
        command, key, member = self._heartbeat(strategy)
        await self._run(command, lambda: self._redis.zadd(key, member, gt=True), budget)

    def keepalive(self, strategy: str, every_s: float = 30.0) -> AsyncKeepAlive:
        """Start a heartbeat of ``strategy`` at once and every ``every_s`` seconds in a task
        on the running event loop; ``stop()`` the handle, or use it in ``async with`` (which
        also waits for the task to end) or ``with``. Call it from a coroutine."""
        running_loop()  # before a client is made for it
        strategy, every_s, twin = self._keepalive_twin(strategy, every_s)

        async def beat() -> None:
            await twin.heartbeat(strategy, retry_s=0)

        keepalive = AsyncKeepAlive(
            strategy,
            every_s=every_s,
            beat=beat,
            close=twin._aclose_client if twin is not self else None,
            url=self._url,
        )
        return self._started(keepalive)

    async def _run(
        self, command: _Command, call: Callable[[], Awaitable[object]], budget: float
    ) -> None:
        """``await call()``, tried again while ``budget`` seconds last (see Notifier._run)."""
        attempts: _Attempts | None = None
        attempt_started = time.monotonic()
        while True:
            try:
                await call()
                return
            except REDIS_ERRORS as exc:
                attempts = attempts or self._attempts(command, attempt_started, budget)
                pause = attempts.failed(exc, attempt_started)
            if pause is None:
                raise attempts.error() from attempts.last
            await asyncio.sleep(pause)
            attempt_started = time.monotonic()

    async def signal(
        self,
        strategy: str,
        symbol: str,
        side: str,
        price: float,
        qty: float,
        *,
        severity: Severity = "info",
        body: str | None = None,
        to: Sequence[str] | None = None,
        id: str | None = None,
        ts: float | str | None = None,
        data: Mapping[str, Any] | None = None,
        retry_s: float | None = None,
        **extra: Any,
    ) -> str:
        fields = _signal_data(
            symbol=symbol, side=side, price=price, qty=qty, data=data, extra=extra
        )
        return await self.send(
            body=body,
            data=fields,
            strategy=strategy,
            kind="signal",
            severity=severity,
            to=to,
            id=id,
            ts=ts,
            retry_s=retry_s,
        )

    async def error(
        self,
        strategy: str,
        error: BaseException | str,
        *,
        severity: Severity = "critical",
        dedup_window_s: float | None = 300.0,
        to: Sequence[str] | None = None,
        retry_s: float | None = None,
    ) -> str:
        fields = _error_fields(strategy, error, dedup_window_s)
        return await self.send(severity=severity, to=to, retry_s=retry_s, **fields)

    async def aclose(self) -> None:
        """Stop this client's keep-alives (their tasks are cancelled) and close its
        connections."""
        self._stop_keepalives()
        await self._aclose_client()

    async def _aclose_client(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncNotifier:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
