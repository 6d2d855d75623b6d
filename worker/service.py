"""The daemon's lifecycle: start, the loops, signals, graceful stop, systemd notify/watchdog.

Tasks of one worker process::

    fetch      queue -> processing (Lua batch when deep, BLMOVE when empty) -> lanes
    lane x N   one event or digest at a time (worker.deliver) on the lane's warm connection
    scheduler  due retries -> front of the queue; due digests -> a lane
    keeper     heartbeat, recovery of dead workers' events, gauges, idle connections
    watch      strategies' signs of life; silence alerts (NOTIFIER_WATCH_FILE), every 1 s
    master     Sentinel only: follows a new master at once (worker.queue.follow_master)
    watchdog   systemd STATUS= and WATCHDOG=1 while the loops above make progress

Stop (SIGTERM/SIGINT, or :meth:`Worker.stop`): stop fetching, let in-flight sends finish
within ``SHUTDOWN_GRACE_S``, cancel what is left, return everything unsent to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from producer.topology import Kind, describe

from .core import build_core
from .errors import ConfigurationError, SendError
from .outage import REDIS_ERRORS, RedisGuard, running_as
from .queue import connect, follow_master
from .sdnotify import ProgressMonitor, SystemdNotifier, watchdog_interval
from .settings import Settings
from .settle import Outcome

__all__ = ["Outcome", "Worker", "run"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
FOREIGN_QUEUE_CHECK_S = 60.0


@dataclass(slots=True)
class _EventJob:
    raw: bytes
    fetched_at: float
    epoch: int = 0  # the worker's registration it was fetched under


@dataclass(slots=True)
class _DigestJob:
    group: str
    raws: list[bytes]
    epoch: int = 0


class Worker:
    READY_WAIT_S = 30.0

    def __init__(
        self,
        settings: Settings,
        *,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.settings = settings
        self.monitor = ProgressMonitor()
        self.guard = RedisGuard(settings.redis_url, beat=self.monitor.beat)
        core = build_core(
            settings, guard=self.guard, on_outcome=on_outcome, on_retry=self._wake_scheduler
        )
        self.core = core
        self.keys, self.redis, self.queue = core.keys, core.redis, core.queue
        self.channels, self.metrics, self.deliverer = core.channels, core.metrics, core.deliverer
        self.all_channels = [*core.channels, *core.others]
        self._blocking_redis = connect(settings.redis_url)
        self.systemd = SystemdNotifier()
        # Every loop must show progress well within systemd's watchdog interval: no wait in
        # a loop is longer than a quarter of it (nor than 1 s).
        watchdog = watchdog_interval()
        self._tick = min(1.0, watchdog / 4) if watchdog else 1.0
        self.started_at = time.time()
        self._work: asyncio.Queue[_EventJob | _DigestJob | None] = asyncio.Queue()
        # What this worker holds of its processing list (fetched, not yet settled): after a
        # lost reply on the fetch path the rest is returned to the queue (reconcile).
        self._held: Counter[bytes] = Counter()
        self._reconciled_at = 0  # the guard's error count at the last reconcile
        self._free = asyncio.Semaphore(settings.concurrency)
        self._inflight = 0
        self._stop = asyncio.Event()
        self._retry_added = asyncio.Event()
        self._burst = False
        self._metrics_server: Any = None
        # Bumped when this worker learns that another one took it for dead (its heartbeat
        # lapsed) and returned its processing list to the queue: jobs fetched before are no
        # longer its own.
        self._epoch = 0
        self._registered = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self._foreign_checked = -1e9

    @property
    def counts(self) -> dict[str, int]:
        return self.deliverer.counts

    def _wake_scheduler(self) -> None:
        self._retry_added.set()

    @property
    def paused(self) -> bool:
        """Every channel is paused on a configuration error: nothing can be sent."""
        return self.deliverer.all_paused

    # ================================================================== lifecycle
    def stop(self) -> None:
        """Ask the worker to stop (idempotent; safe from a signal handler)."""
        if not self._stop.is_set():
            logger.info("stopping: no new work; finishing in-flight sends")
            self._stop.set()

    async def run(self, *, burst: bool = False, install_signals: bool = False) -> int:
        """Run until stopped (or, with ``burst``, until nothing is left to do). Returns 0."""
        self._burst = burst
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        try:
            if await self._unless_stopped(self._start()):
                await self._serve()
        finally:
            await self._shutdown()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        return 0

    async def _unless_stopped(self, work: Awaitable[None]) -> bool:
        """Run ``work`` unless a stop comes first (a signal while start-up waits for Redis
        or SMTP): then cancel it and return False."""
        task = asyncio.ensure_future(work)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([task, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            await _cancel(stop_wait)
            task.result()
            return not self._stop.is_set()
        await _cancel(task, stop_wait)
        return False

    async def _start(self) -> None:
        s = self.settings
        await self.queue.ping()
        await self.queue.heartbeat(self._info())
        self._registered = True
        # renewed from now on, also while the first SMTP login waits (up to READY_WAIT_S)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        moved = await self.queue.recover(including_self=True)
        for wid, n in moved.items():
            logger.warning("recovered %d in-flight event(s) of worker %s", n, wid)
        self._metrics_server = self.metrics.serve(s.metrics_host, s.metrics_port)
        await self._first_login()
        self._warm_task = asyncio.create_task(self._warm_channels(), name="warm")
        self.metrics.connections.set(self._open_connections())
        logger.info(
            "worker %s started: %s:%s (%s), %d lane(s), queue %s%s",
            s.worker_id,
            s.smtp_host,
            s.smtp_port,
            s.smtp_tls,
            s.concurrency,
            self.keys.queue,
            f", failover {', '.join(c.name for c in self.channels[1:])}"
            if len(self.channels) > 1
            else "",
        )

    async def _first_login(self) -> None:
        """READY=1 once the primary account logs in, or once it is paused on a configuration
        error; an unreachable server is retried for up to READY_WAIT_S, then READY anyway
        (degraded: events wait in the queue) so that systemd does not kill a healthy worker.
        Failover accounts connect on demand."""
        primary = self.channels[0]
        deadline = time.monotonic() + self.READY_WAIT_S
        delay = 0.5
        while True:
            errors = await primary.warm_up()
            config = [e for e in errors if isinstance(e, ConfigurationError)]
            if config:
                primary.health.failed(config[0])
                self.metrics.paused.set(1 if self.paused else 0)
                reason = str(config[0])
                await self.queue.set_paused(reason)
                self.systemd.ready(f"PAUSED: SMTP configuration error: {reason}")
                return
            if primary.open_connections or self._stop.is_set():
                for e in errors:
                    logger.warning("SMTP warm-up: %s (reconnecting on demand)", e)
                if primary.open_connections:
                    # a login works: a pause flag left by a worker with wrong settings is stale
                    await self.queue.set_paused(None)
                self.systemd.ready(self._status())
                return
            if time.monotonic() >= deadline:
                logger.error("SMTP unreachable at start-up (%s); running degraded", errors[0])
                primary.health.failed(errors[0])
                self.systemd.ready(f"DEGRADED: SMTP unreachable: {errors[0]}")
                return
            logger.warning(
                "SMTP unreachable at start-up (%s); retrying in %.1f s", errors[0], delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            delay = min(delay * 2, 5.0)

    async def _serve(self) -> None:
        for name in ("fetch", "scheduler", "keeper", "heartbeat", "lanes"):
            self.monitor.register(name)
        lanes = [
            asyncio.create_task(self._lane(i), name=f"lane-{i}")
            for i in range(self.settings.concurrency)
        ]
        assert self._heartbeat_task is not None  # started with the registration
        helpers = [
            asyncio.create_task(self._scheduler_loop(), name="scheduler"),
            asyncio.create_task(self._digest_loop(), name="digests"),
            asyncio.create_task(self._keeper_loop(), name="keeper"),
            self._heartbeat_task,
            asyncio.create_task(self.systemd.run_watchdog(self.monitor, status=self._status)),
            asyncio.create_task(self._watch_loop(), name="watch"),
        ]
        if describe(self.settings.redis_url).kind == Kind.SENTINEL:
            helpers.append(asyncio.create_task(self._master_loop(), name="master"))
        fetch = asyncio.create_task(self._fetch_loop(), name="fetch")
        stop_wait: asyncio.Task[Any] = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                [fetch, stop_wait, *helpers, *lanes], return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stop_wait and not task.cancelled() and task.exception():
                    raise task.exception()  # type: ignore[misc]
        finally:
            self.stop()
            self.systemd.stopping()
            await _cancel(fetch, helpers[1])  # stop taking work: fetch and digests
            # Jobs fetched but not started stay in processing and are requeued below.
            while not self._work.empty():
                self._work.get_nowait()
            for _ in lanes:
                self._work.put_nowait(None)
            _, pending = await asyncio.wait(lanes, timeout=self.settings.shutdown_grace_s)
            if pending:
                logger.warning("grace period over: cancelling %d send(s)", len(pending))
                await _cancel(*pending)
            await _cancel(*helpers, stop_wait)

    async def _warm_channels(self) -> None:
        """Open the other channels' connections now, beside the work (they reconnect on
        demand anyway): the first alert of each pays one round trip, not a TLS handshake."""
        others = [c for c in self.all_channels if c not in self.channels]
        results = await asyncio.gather(*(c.warm_up() for c in others))
        for channel, errors in zip(others, results, strict=True):
            for err in errors:
                logger.warning("channel %s: warm-up: %s (connecting on demand)", channel.name, err)

    async def _shutdown(self) -> None:
        if self._warm_task is not None:
            await _cancel(self._warm_task)
        if self._heartbeat_task is not None:  # (a stop during start-up: still running)
            await _cancel(self._heartbeat_task)
        # At the stop, one try each (at most 5 s in all), not waiting out an outage: what
        # cannot be returned now is recovered when this worker's heartbeat expires.
        self.queue.guard = None
        try:
            if self._registered:  # (a stop during start-up before Redis answered: nothing)
                async with asyncio.timeout(5):
                    n = await self.queue.requeue_all()
                    if n:
                        logger.info("returned %d unsent event(s) to the queue", n)
                    await self.queue.deregister()
        except (*REDIS_ERRORS, TimeoutError) as exc:
            logger.error(
                "could not return in-flight events to the queue (%s); another worker will "
                "recover them once this worker's heartbeat expires",
                exc,
            )
        await asyncio.gather(*(c.close() for c in self.all_channels), return_exceptions=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for client in (self.redis, self._blocking_redis):
            with contextlib.suppress(Exception):
                await client.aclose()
        logger.info("worker %s stopped", self.settings.worker_id)

    # ================================================================== fetch
    async def _fetch_loop(self) -> None:
        running_as("fetch")
        s = self.settings
        deep = True
        while not self._stop.is_set():
            self.monitor.beat("fetch")
            if self.paused:
                await self._wait_pause()
                continue
            if self.queue.fenced:
                # the heartbeat could not be renewed: take no events that another worker
                # may soon be handed as this worker's
                await asyncio.sleep(min(self._tick, 0.1))
                continue
            await self._free.acquire()
            taken = 1
            while taken < s.fetch_batch and not self._free.locked():
                await self._free.acquire()
                taken += 1
            try:
                # A batch when the queue may be deep; once one came back short the queue is
                # empty, so wait on BLMOVE directly (one round trip an event, not two).
                items = []
                if deep:
                    items = await self.queue.fetch_ready(taken)
                    deep = len(items) == taken
                if not items:
                    if self._burst and await self._burst_done():
                        self.stop()
                        return
                    one = await self.queue.fetch_blocking(self._blocking_redis, self._tick)
                    items = [one] if one is not None else []
                    deep = one is not None  # more may have arrived with it
            except BaseException:
                for _ in range(taken):
                    self._free.release()
                raise
            now = time.time()
            for raw in items:
                self._held[raw] += 1
                self._work.put_nowait(_EventJob(raw, now, self._epoch))
            if self.guard.errors != self._reconciled_at:
                await self._reconcile()
            for _ in range(taken - len(items)):
                self._free.release()

    async def _burst_done(self) -> bool:
        if self._inflight or not self._work.empty():
            return False
        d = await self.queue.depths()
        return d.queue == 0 and d.retry == 0 and d.processing == 0 and d.held == 0

    async def _wait_pause(self) -> None:
        """Every channel is paused on a configuration error: probe the first whose pause
        ends (a login); resume on success."""
        channel = min(self.all_channels, key=lambda c: c.health.pause_remaining())
        remaining = channel.health.pause_remaining()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=min(remaining, 1.0))
            return
        try:
            await channel.probe()
        except SendError as err:
            if isinstance(err, ConfigurationError):
                channel.health.failed(err)
                await self.queue.set_paused(str(err))
            else:
                logger.warning("channel %s still unreachable: %s", channel.name, err)
                channel.health.failed(ConfigurationError(f"(retrying login) {err}"))
            return
        logger.warning("channel %s: login works again; resuming delivery", channel.name)
        channel.health.succeeded()
        self.metrics.paused.set(0)
        await self.queue.set_paused(None)

    async def _reconcile(self) -> None:
        """An operation was retried after a Redis error since the last look: put back in the
        queue what is in our processing list but not held here. A fetch whose reply was lost
        may have moved events there that we never received; after a Sentinel failover the new
        master may hold events that this worker settled on the old one, the settlement lost
        with it (not yet replicated). The error may have been seen by another loop (the lanes
        waiting out the failover in their acks while the fetch loop waited for a free lane)."""
        self._reconciled_at = self.guard.errors
        held = list(self._held.elements())
        moved = await self.queue.reconcile(held)
        if moved:
            logger.warning("returned %d event(s) fetched during a Redis error to the queue", moved)

    # ================================================================== lanes
    async def _lane(self, index: int) -> None:
        running_as("lanes")
        while True:
            job = await self._work.get()
            if job is None:
                return
            self._inflight += 1
            self.metrics.inflight.set(self._inflight)
            try:
                if job.epoch != self._epoch:
                    # fetched before another worker took this one for dead and returned its
                    # events to the queue: not ours any more (the other worker has them)
                    logger.warning(
                        "lane %d: dropping a job fetched before this worker was taken for "
                        "dead; its events are back in the queue",
                        index,
                    )
                elif isinstance(job, _EventJob):
                    await self.deliverer.handle(index, job.raw, job.fetched_at)
                else:
                    await self.deliverer.handle_digest(index, job.group, job.raws)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The deliverer dead-letters what a bug hits; this is settling itself failing
                # (Redis refusing for good): the event stays in processing and goes back to
                # the queue with the rest at the stop.
                logger.exception("lane %d: could not settle an event", index)
            finally:
                for raw in (job.raw,) if isinstance(job, _EventJob) else job.raws:
                    self._held[raw] -= 1
                    if self._held[raw] <= 0:
                        del self._held[raw]
                self._inflight -= 1
                self.metrics.inflight.set(self._inflight)  # (the keeper sets the other gauges)
                self._free.release()
                self.monitor.beat("lanes")

    # ================================================================== scheduler, keeper
    async def _scheduler_loop(self) -> None:
        running_as("scheduler")
        while not self._stop.is_set():
            self.monitor.beat("scheduler")
            moved = await self.queue.schedule()
            if moved:
                logger.debug("scheduler: %d retry(ies) due, back in the queue", moved)
                continue
            nxt = await self.queue.next_due()
            wait = self._tick if nxt is None else min(self._tick, max(0.0, nxt - time.time()))
            self._retry_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_added.wait(), timeout=wait)

    async def _digest_loop(self) -> None:
        """Hand due digest groups to a lane (several workers: each group goes to one)."""
        running_as("digests")
        while not self._stop.is_set():
            nxt = await self.queue.next_digest_due()
            if nxt is None or nxt > time.time():
                wait = self._tick if nxt is None else min(self._tick, max(0.01, nxt - time.time()))
                await asyncio.sleep(wait)
                continue
            await self._free.acquire()
            try:
                taken = await self.queue.take_digest()
            except BaseException:
                self._free.release()
                raise
            if taken is None:
                self._free.release()
                continue
            self._held.update(taken[1])
            self._work.put_nowait(_DigestJob(*taken, epoch=self._epoch))

    async def _watch_loop(self) -> None:
        """Signs of life of the strategies whose events pass here; with a watch file, the
        silence of watched ones (:mod:`worker.watch`)."""
        running_as("watch")
        await self.core.watcher.run(self._stop)

    async def _master_loop(self) -> None:
        """Sentinel: every tick, ask the sentinels for the master and drop the connections
        to an old one (:func:`worker.queue.follow_master`): a master lost without closing
        our connections would otherwise hold each command until its socket timeout."""
        said: list[tuple[str, str]] = []

        def switching(old: str, new: str) -> None:
            if said[-1:] != [(old, new)]:  # (once for both clients)
                said[:] = [(old, new)]
                logger.warning("Sentinel names a new master %s (was %s): reconnecting", new, old)

        while not self._stop.is_set():
            await asyncio.sleep(self._tick)
            for client in (self.redis, self._blocking_redis):
                try:
                    await follow_master(client, switching)
                except REDIS_ERRORS:
                    continue  # no master named now (an election): the guard waits it out

    async def _heartbeat_loop(self) -> None:
        """Renew the heartbeat every quarter TTL, on its own so that nothing else (a keeper
        step waiting for a full Redis) delays it, and until cancelled: in-flight sends that
        finish during a graceful stop are still this worker's."""
        running_as("heartbeat")
        period = min(max(0.25, self.settings.heartbeat_ttl_s / 4), self._tick)
        self.guard.urgent_delay_s = period  # a heartbeat retried no less often than it is due
        while True:
            self.monitor.beat("heartbeat")
            registered = await self.queue.heartbeat(self._info())
            if not registered:
                self._epoch += 1
                logger.error(
                    "this worker was taken for dead (its heartbeat lapsed) and its in-flight "
                    "events were returned to the queue; it dropped its copies and goes on"
                )
            await asyncio.sleep(period)

    def _may_take_for_dead(self) -> bool:
        """Only once Redis has answered for a heartbeat TTL since an outage: the living
        workers have renewed their lapsed heartbeats by then (see RedisGuard.answered_for)."""
        return self.guard.answered_for(self.settings.heartbeat_ttl_s)

    async def _keeper_loop(self) -> None:
        running_as("keeper")
        period = min(max(0.5, self.settings.heartbeat_ttl_s / 4), self._tick)
        while not self._stop.is_set():
            self.monitor.beat("keeper")
            if self._inflight == 0:
                self.monitor.beat("lanes")  # idle lanes are healthy lanes
            await self._warn_foreign_queues()
            moved = await self.queue.recover(ready=self._may_take_for_dead)
            for wid, n in moved.items():
                logger.warning("worker %s stopped heartbeating: returned its %d event(s)", wid, n)
            d = await self.queue.depths()
            m = self.metrics
            m.queue_depth.set(d.queue)
            m.retry_depth.set(d.retry)
            m.dead_depth.set(d.dead)
            m.processing_depth.set(d.processing)
            m.held_depth.set(d.held)
            m.connections.set(self._open_connections())
            m.paused.set(1 if self.paused else 0)
            for c in self.all_channels:
                m.account_up.labels(c.name).set(1 if c.available() else 0)
            await self._idle_hygiene()
            await asyncio.sleep(period)

    async def _warn_foreign_queues(self) -> None:
        """Once a minute: events waiting under another key prefix on this Redis mean a
        producer and this worker disagree on NOTIFIER_KEY_PREFIX; say so."""
        now = time.monotonic()
        if now - self._foreign_checked < FOREIGN_QUEUE_CHECK_S:
            return
        self._foreign_checked = now
        found = await self.queue.foreign_queues()
        for key, n in found.items():
            prefix = key.rsplit(":", 1)[0]
            logger.warning(
                "%d event(s) wait in %s, but this worker reads %s: the producer and the worker "
                "disagree on the key prefix; set NOTIFIER_KEY_PREFIX=%s on one of them",
                n,
                key,
                self.keys.queue,
                prefix,
            )

    async def _idle_hygiene(self) -> None:
        for channel in self.all_channels:
            await channel.close_idle()

    def _open_connections(self) -> int:
        return sum(c.open_connections for c in self.channels)

    def _info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "nonce": self.queue.nonce,
            "started": self.started_at,
            "lanes": self.settings.concurrency,
            "sent": self.counts.get("sent", 0),
            "paused": self.channels[0].health.reason if self.paused else None,
            "accounts": {c.name: c.describe() for c in self.all_channels},
        }

    def _status(self) -> str:
        c = self.counts
        state = ""
        if self.paused:
            state = f"PAUSED ({self.channels[0].health.reason}) "
        else:
            bad = [f"{c.name} {c.state}" for c in self.all_channels if c.state != "ok"]
            state = f"accounts: {', '.join(bad)}; " if bad else ""
        return (
            f"{state}sent {c.get('sent', 0)}, retried {c.get('retry', 0)}, dead {c.get('dead', 0)};"
            f" in flight {self._inflight}; SMTP connections {self._open_connections()}"
        )


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel tasks and wait until they are really done. On Python 3.11 a cancellation can
    be lost when the awaited operation completes in the same step (``asyncio.wait_for``,
    used inside redis-py; gh-86296), so cancel again until each task has finished."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    await asyncio.gather(*tasks, return_exceptions=True)


def run(settings: Settings, *, burst: bool = False) -> int:
    """The synchronous entry for the command line."""
    return asyncio.run(Worker(settings).run(burst=burst, install_signals=True))
