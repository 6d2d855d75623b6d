"""Waiting out Redis: one guard around every operation of :class:`worker.queue.Queue`.

An operation that fails because Redis is down, loading, full (OOM), failing to persist
(MISCONF), a replica (READONLY) or in an election is retried with back-off until it works,
logged once per outage with what Redis said and what to do, and once more when Redis is
back. Anything else Redis answers (a script error, NOPERM) is a bug or a permission problem
and is raised. The loop that waits stays alive for the systemd watchdog: each task names
itself with :func:`running_as` and the guard beats for it while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TypeVar

from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError

from producer import topology
from producer.redis_errors import RedisProblem, classify_redis_error, explain_redis_error

__all__ = ["REDIS_ERRORS", "RedisGuard", "running_as"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
# (the cluster client's RedisClusterException, which no node answering raises, is one;
# asyncio's TimeoutError is the builtin one, an OSError)
REDIS_ERRORS = topology.REDIS_ERRORS
_PERMANENT = frozenset({RedisProblem.OTHER, RedisProblem.NO_PERMISSION})
_DOWN = frozenset({RedisProblem.UNREACHABLE, RedisProblem.HOST_NOT_FOUND, RedisProblem.TIMEOUT})
_LOOP: ContextVar[str | None] = ContextVar("notifier_loop", default=None)


def running_as(loop: str) -> None:
    """Name the current task's loop (for the watchdog beats while it waits for Redis)."""
    _LOOP.set(loop)


def waits_out(exc: BaseException) -> bool:
    """Will waiting fix it (Redis down, loading, full, not persisting, a replica, a Cluster
    electing a master or moving a slot: CLUSTERDOWN, MASTERDOWN, TRYAGAIN, a slot no node
    serves)?"""
    if isinstance(exc, ClusterDownError | TryAgainError | SlotNotCoveredError):
        return True
    return classify_redis_error(exc) not in _PERMANENT


class RedisGuard:
    """Runs Redis operations, waiting out what a wait fixes.

    The worker's clients make no retries of their own (:func:`worker.queue.connect`): every
    failed try comes here and counts in ``errors`` (after a lost reply the fetch loop
    returns to the queue what it did not receive: ``Worker._reconcile``). A connection
    found broken or refused at once (Redis restarted, a Sentinel failover, an idle
    connection that the server closed) is tried once more at once, on a new connection,
    unlogged; a try that failed after waiting is not (that wait was an outage). Then tries
    back off from 0.2 s up to ``max_delay_s`` (``urgent_delay_s`` for the heartbeat) and the
    outage is logged once. When an operation reaches Redis again after it was
    unreachable, every operation waiting to try again tries at once: the worker follows a
    new master as soon as its heartbeat (retried at least every second) reaches it, not at
    the end of each loop's back-off.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        beat: Callable[[str], None] | None = None,
        max_delay_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis_url = redis_url
        self._beat = beat
        self.max_delay_s = max_delay_s
        self.urgent_delay_s = max_delay_s  # the heartbeat's cap (a quarter of its TTL)
        self._clock = clock
        self.errors = 0  # operations that failed and were retried (fetch reconciles on it)
        self._down_since: float | None = None
        self._unreachable = False  # a try found Redis unreachable since the last that worked
        self._back_at: float | None = None  # when an operation last worked after an outage
        self._back: asyncio.Event | None = None  # set when an operation works again

    async def __call__(
        self, op: Callable[[], Awaitable[T]], what: str, *, urgent: bool = False
    ) -> T:
        delay = 0.2
        cap = self.urgent_delay_s if urgent else self.max_delay_s
        loop = _LOOP.get()
        failing_since: float | None = None
        while True:
            if loop is not None and self._beat is not None:
                self._beat(loop)
            started = self._clock()
            try:
                result = await op()
            except REDIS_ERRORS as exc:
                if not waits_out(exc):
                    raise
                self.errors += 1
                problem = classify_redis_error(exc)
                self._unreachable = self._unreachable or problem in _DOWN
                first = failing_since is None
                failing_since = started if failing_since is None else failing_since
                if first and problem == RedisProblem.UNREACHABLE and self._clock() - started < 0.5:
                    continue  # found broken at once: once more at once, on a new connection
                if self._down_since is None:
                    self._down_since = failing_since
                    self._log(exc, what)
                await self._pause(delay)
                delay = min(delay * 2, cap)
                continue
            if self._unreachable or self._down_since is not None:
                self._back_at = self._clock()  # (see answered_for)
            if self._unreachable:  # Redis answers again: wake the operations waiting for it
                self._unreachable = False
                if self._back is not None:
                    self._back.set()
                    self._back = None
            if self._down_since is not None:
                logger.warning(
                    "Redis reachable again after %.1f s", self._clock() - self._down_since
                )
                self._down_since = None
            return result

    def answered_for(self, seconds: float) -> bool:
        """Has Redis answered for at least ``seconds`` since the last outage this guard saw
        ended (True if it saw none)? After an outage longer than the heartbeat TTL every
        worker's heartbeat has lapsed, the living ones' too: the keeper waits a TTL before
        taking any worker for dead, so that those that are alive have renewed theirs (each
        within a quarter TTL) and keep their in-flight events. Without the wait, the first
        worker back would return them to the queue while their owners were still sending
        them, and the events would be sent twice. False during an outage: call it inside the
        guarded operation (a try that waited through the outage asks again)."""
        if self._unreachable or self._down_since is not None:
            return False  # an outage now: after it, its end counts
        return self._back_at is None or self._clock() - self._back_at >= seconds

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if another operation works again meanwhile."""
        if self._back is None:
            self._back = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._back.wait(), seconds)

    def _log(self, exc: BaseException, what: str) -> None:
        text = explain_redis_error(exc, self.redis_url)
        if classify_redis_error(exc) in _DOWN:
            logger.error("Redis unreachable during %s: %s; retrying", what, text)
        else:
            logger.error("Redis refused %s: %s; retrying until it accepts it", what, text)
