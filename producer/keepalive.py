"""Keep-alives: a strategy's heartbeat at once and then every ``every_s`` seconds, in the
background, so that notifier hears from a strategy that has nothing to say.

    with notifier.keepalive("ma_cross", every_s=30):          # Notifier: a daemon thread
        run_strategy()

    async with anotifier.keepalive("ma_cross", every_s=30):   # AsyncNotifier: a task
        await run_strategy()

Both handles also have ``stop()`` (idempotent), for a strategy class that starts the
keep-alive in ``on_init`` and stops it in ``on_stop``; the asyncio handle works with plain
``with`` too (``stop()`` cancels the task; ``async with`` also waits until it has ended).

What a keep-alive promises the strategy:

* It never raises into it. A heartbeat that fails (Redis down, frozen, full, ...) is logged
  once when the outage starts, with what Redis said and what to do, retried every
  ``min(every_s, 5)`` seconds, and logged once more when a heartbeat is recorded again.
* It never delays the strategy's own calls: it beats on a Redis client of its own with the
  producer's short timeouts, so a frozen Redis holds none of the connections (nor any lock)
  that the strategy's sends need, and costs it no more than their own timeout.
* It stops with the process: the thread is a daemon (the interpreter does not wait for it,
  even while a heartbeat hangs on a frozen Redis) and the task ends with its loop.
  ``stop()`` on the thread waits for it at most about the client's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from .redis_errors import explain_redis_error

__all__ = ["OUTAGE_RETRY_S", "AsyncKeepAlive", "KeepAlive", "running_loop"]

logger = logging.getLogger(__name__)

OUTAGE_RETRY_S = 5.0  # while heartbeats fail, the next try comes after min(every_s, this)


def running_loop() -> asyncio.AbstractEventLoop:
    """The loop an asyncio keep-alive's task runs on; RuntimeError in one line without one."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "AsyncNotifier.keepalive() starts a task on the running event loop: call it from "
            "a coroutine (Notifier.keepalive() starts a thread instead)"
        ) from None


class _Beats:
    """What the two kinds of keep-alive share: counting beats, and one log line at each
    end of an outage. Each method returns the pause before the next heartbeat."""

    def __init__(self, strategy: str, every_s: float, url: str | None) -> None:
        self.strategy = strategy
        self.every_s = every_s
        self.url = url
        self.recorded = 0
        self.failing_since: float | None = None

    def ok(self) -> float:
        self.recorded += 1
        if self.failing_since is not None:
            logger.warning(
                "keep-alive of %r: heartbeats recorded again after %.1f s",
                self.strategy,
                time.monotonic() - self.failing_since,
            )
            self.failing_since = None
        return self.every_s

    def failed(self, exc: Exception) -> float:
        pause = min(self.every_s, OUTAGE_RETRY_S)
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            # NotifierUnavailable is a ConnectionError; anything else would be a bug here
            why = (
                explain_redis_error(exc, self.url)
                if isinstance(exc, ConnectionError)
                else f"{type(exc).__name__}: {exc}"
            )
            logger.warning(
                "keep-alive of %r: heartbeat failed: %s; trying again every %g s",
                self.strategy,
                why,
                pause,
            )
        return pause


class _Handle:
    """The read-only state of a keep-alive."""

    _beats: _Beats

    @property
    def strategy(self) -> str:
        return self._beats.strategy

    @property
    def every_s(self) -> float:
        return self._beats.every_s

    @property
    def beats(self) -> int:
        """Heartbeats recorded so far."""
        return self._beats.recorded

    @property
    def failing(self) -> bool:
        """True from a failed heartbeat until one is recorded again."""
        return self._beats.failing_since is not None


class KeepAlive(_Handle):
    """Heartbeats on a daemon thread (made by ``Notifier.keepalive``)."""

    def __init__(
        self,
        strategy: str,
        *,
        every_s: float,
        beat: Callable[[], None],
        close: Callable[[], None] | None,
        url: str | None,
        stop_wait_s: float,
    ) -> None:
        self._beats = _Beats(strategy, every_s, url)
        self._beat = beat
        self._close = close
        self._stop_wait_s = stop_wait_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"notifier-keepalive-{strategy}", daemon=True
        )
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                began = time.monotonic()
                try:
                    self._beat()
                    pause = self._beats.ok()
                except Exception as exc:  # never into the strategy: logged, tried again
                    pause = self._beats.failed(exc)
                self._stopping.wait(max(0.0, pause - (time.monotonic() - began)))
        finally:
            if self._close is not None:
                with contextlib.suppress(Exception):
                    self._close()

    def stop(self) -> None:
        """Stop beating. Returns when the thread has ended, or, if a heartbeat hangs on a
        frozen Redis, after about the client's timeout: the thread then ends by itself once
        that heartbeat times out."""
        self._stopping.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(self._stop_wait_s)

    def __enter__(self) -> KeepAlive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AsyncKeepAlive(_Handle):
    """Heartbeats in a task on the running event loop (made by ``AsyncNotifier.keepalive``)."""

    def __init__(
        self,
        strategy: str,
        *,
        every_s: float,
        beat: Callable[[], Awaitable[None]],
        close: Callable[[], Awaitable[None]] | None,
        url: str | None,
    ) -> None:
        loop = running_loop()
        self._beats = _Beats(strategy, every_s, url)
        self._beat = beat
        self._close = close
        self._task = loop.create_task(self._run(), name=f"notifier-keepalive-{strategy}")

    @property
    def running(self) -> bool:
        return not self._task.done()

    async def _run(self) -> None:
        try:
            while True:
                began = time.monotonic()
                try:
                    await self._beat()
                    pause = self._beats.ok()
                except Exception as exc:  # never into the strategy: logged, tried again
                    pause = self._beats.failed(exc)
                await asyncio.sleep(max(0.0, pause - (time.monotonic() - began)))
        finally:  # cancelled by stop(), or by the loop's end
            if self._close is not None:
                with contextlib.suppress(Exception):
                    await self._close()

    def stop(self) -> None:
        """Stop beating: cancels the task (at once, even mid-heartbeat)."""
        self._task.cancel()

    async def wait_stopped(self) -> None:
        """``stop()``, then wait until the task has ended and closed its Redis client."""
        self.stop()
        await asyncio.wait([self._task])

    def __enter__(self) -> AsyncKeepAlive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> AsyncKeepAlive:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.wait_stopped()
