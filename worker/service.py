"""The daemon's lifecycle: start, the loops, signals, graceful stop, systemd notify/watchdog.

Tasks of one worker process::

    fetch      queue -> processing (Lua batch when deep, BLMOVE when empty) -> lanes
    lane x N   parse -> compose -> send on the lane's warm connection -> settle in Redis
    scheduler  due retries -> front of the queue
    keeper     heartbeat, recovery of dead workers' events, gauges, systemd STATUS/WATCHDOG

Stop (SIGTERM/SIGINT, or :meth:`Worker.stop`): stop fetching, let in-flight sends finish
within ``SHUTDOWN_GRACE_S``, cancel what is left, return everything unsent to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from redis.exceptions import RedisError

from producer.event import Event, InvalidEvent, new_event_id, parse_event
from producer.keys import Keys

from .compose import Composer
from .errors import ConfigurationError, PermanentError, SendError, ThrottledError
from .mailer import Mailer, classify, message_bytes
from .metrics import Metrics
from .queue import Queue, connect
from .retry import backoff
from .sdnotify import ProgressMonitor, SystemdNotifier
from .settings import Settings

__all__ = ["Outcome", "Worker", "run"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
MAX_DEAD_TEXT = 1024 * 1024  # keep at most this much of a rejected event's text


@dataclass(slots=True)
class Outcome:
    """What happened to one event (passed to ``on_outcome`` hooks, e.g. the demo)."""

    status: str  # sent | retry | dead | duplicate | requeued
    event_id: str
    subject: str = ""
    recipients: list[str] = field(default_factory=list)
    latency: float = 0.0
    queue_wait: float = 0.0
    smtp: float = 0.0
    reason: str = ""
    error: str = ""
    attempts: int = 0


def _text(raw: bytes) -> str:
    return raw[:MAX_DEAD_TEXT].decode("utf-8", "backslashreplace")


class Worker:
    READY_WAIT_S = 30.0

    def __init__(
        self,
        settings: Settings,
        *,
        on_outcome: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = connect(settings.redis_url)
        self._blocking_redis = connect(settings.redis_url)
        self.queue = Queue(
            self.redis, self.keys, settings.worker_id,
            sent_ttl_s=settings.sent_ttl_s, deliveries_kept=settings.deliveries_kept,
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
        )  # fmt: skip
        self.mailer = Mailer(settings)
        assert settings.mail_from is not None
        self.composer = Composer(mail_from=settings.mail_from, template_dir=settings.template_dir)
        self.metrics = Metrics(settings.latency_target_s)
        self.monitor = ProgressMonitor()
        self.systemd = SystemdNotifier()
        self.on_outcome = on_outcome
        self.allowed = settings.allowed
        self.started_at = time.time()
        self.counts: dict[str, int] = {}
        self._work: asyncio.Queue[tuple[bytes, float] | None] = asyncio.Queue()
        self._free = asyncio.Semaphore(settings.concurrency)
        self._inflight = 0
        self._stop = asyncio.Event()
        self._retry_added = asyncio.Event()
        self._burst = False
        self._redis_down_since: float | None = None
        self._metrics_server: Any = None

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
            await self._start()
            await self._serve()
        finally:
            await self._shutdown()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
        return 0

    async def _start(self) -> None:
        s = self.settings
        await self._redis(self.redis.ping, "connect")
        await self._redis(lambda: self.queue.heartbeat(self._info()), "register")
        moved = await self._redis(lambda: self.queue.recover(including_self=True), "recover")
        for wid, n in moved.items():
            logger.warning("recovered %d in-flight event(s) of worker %s", n, wid)
        self._metrics_server = self.metrics.serve(s.metrics_host, s.metrics_port)
        await self._first_login()
        self.metrics.connections.set(self.mailer.open_connections)
        logger.info(
            "worker %s started: %s:%s (%s), %d lane(s), queue %s",
            s.worker_id, s.smtp_host, s.smtp_port, s.smtp_tls, s.concurrency, self.keys.queue,
        )  # fmt: skip

    async def _first_login(self) -> None:
        """READY=1 once at least one SMTP login works, or once paused on a configuration
        error; an unreachable server is retried for up to READY_WAIT_S, then READY anyway
        (degraded: events wait in the queue) so that systemd does not kill a healthy worker."""
        deadline = time.monotonic() + self.READY_WAIT_S
        delay = 0.5
        while True:
            errors = await self.mailer.warm_up()
            config = [e for e in errors if isinstance(e, ConfigurationError)]
            if config:
                self.mailer.pause(config[0])
                self.metrics.paused.set(1)
                reason = str(config[0])
                await self._redis(partial(self.queue.set_paused, reason), "pause")
                self.systemd.ready(f"PAUSED: SMTP configuration error: {reason}")
                return
            if self.mailer.open_connections or self._stop.is_set():
                for e in errors:
                    logger.warning("SMTP warm-up: %s (reconnecting on demand)", e)
                self.systemd.ready(self._status())
                return
            if time.monotonic() >= deadline:
                logger.error("SMTP unreachable at start-up (%s); running degraded", errors[0])
                self.systemd.ready(f"DEGRADED: SMTP unreachable: {errors[0]}")
                return
            logger.warning(
                "SMTP unreachable at start-up (%s); retrying in %.1f s", errors[0], delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            delay = min(delay * 2, 5.0)

    async def _serve(self) -> None:
        for name in ("fetch", "scheduler", "keeper", "lanes"):
            self.monitor.register(name)
        lanes = [
            asyncio.create_task(self._lane(c), name=f"lane-{i}")
            for i, c in enumerate(self.mailer.connections)
        ]
        helpers = [
            asyncio.create_task(self._scheduler_loop(), name="scheduler"),
            asyncio.create_task(self._keeper_loop(), name="keeper"),
            asyncio.create_task(self.systemd.run_watchdog(self.monitor, status=self._status)),
        ]
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
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fetch
            # Events fetched but not started stay in processing and are requeued below.
            while not self._work.empty():
                self._work.get_nowait()
            for _ in lanes:
                self._work.put_nowait(None)
            _, pending = await asyncio.wait(lanes, timeout=self.settings.shutdown_grace_s)
            if pending:
                logger.warning("grace period over: cancelling %d send(s)", len(pending))
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for t in (*helpers, stop_wait):
                t.cancel()
            await asyncio.gather(*helpers, stop_wait, return_exceptions=True)

    async def _shutdown(self) -> None:
        try:
            n = await asyncio.wait_for(self.queue.requeue_all(), timeout=5)
            if n:
                logger.info("returned %d unsent event(s) to the queue", n)
            await asyncio.wait_for(self.queue.deregister(), timeout=5)
        except (*REDIS_ERRORS, TimeoutError) as exc:
            logger.error(
                "could not return in-flight events to the queue (%s); another worker will "
                "recover them once this worker's heartbeat expires", exc,
            )  # fmt: skip
        await self.mailer.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for client in (self.redis, self._blocking_redis):
            with contextlib.suppress(Exception):
                await client.aclose()
        logger.info("worker %s stopped", self.settings.worker_id)

    # ================================================================== Redis outages
    async def _redis(self, op: Callable[[], Awaitable[T]], what: str, loop: str | None = None) -> T:
        """Run a Redis operation, waiting out an outage with back-off (logged once).

        ``loop`` names the calling loop: it is alive while it waits (the watchdog must not
        restart a worker that is only waiting for Redis to come back)."""
        delay = 0.2
        while True:
            if loop is not None:
                self.monitor.beat(loop)
            try:
                result = await op()
            except REDIS_ERRORS as exc:
                if self._redis_down_since is None:
                    self._redis_down_since = time.monotonic()
                    logger.error("Redis unreachable during %s: %s; retrying", what, exc)
                if self._stop.is_set() and what in ("fetch", "schedule"):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._redis_down_since is not None:
                logger.warning(
                    "Redis reachable again after %.1f s", time.monotonic() - self._redis_down_since
                )
                self._redis_down_since = None
            return result

    # ================================================================== fetch
    async def _fetch_loop(self) -> None:
        s = self.settings
        while not self._stop.is_set():
            self.monitor.beat("fetch")
            if self.mailer.paused:
                await self._wait_pause()
                continue
            await self._free.acquire()
            taken = 1
            while taken < s.fetch_batch and not self._free.locked():
                await self._free.acquire()
                taken += 1
            try:
                items = await self._redis(partial(self.queue.fetch_ready, taken), "fetch", "fetch")
                if not items:
                    if self._burst and await self._burst_done():
                        self.stop()
                        return
                    one = await self._redis(
                        lambda: self.queue.fetch_blocking(self._blocking_redis, 1.0),
                        "fetch",
                        "fetch",
                    )
                    items = [one] if one is not None else []
            except BaseException:
                for _ in range(taken):
                    self._free.release()
                raise
            now = time.time()
            for raw in items:
                self._work.put_nowait((raw, now))
            for _ in range(taken - len(items)):
                self._free.release()

    async def _burst_done(self) -> bool:
        if self._inflight or not self._work.empty():
            return False
        d = await self._redis(self.queue.depths, "depths")
        return d.queue == 0 and d.retry == 0 and d.processing == 0

    async def _wait_pause(self) -> None:
        """While paused on a configuration error: probe a login when the back-off ends."""
        remaining = self.mailer.pause_remaining()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=min(remaining, 1.0))
            return
        conn = self.mailer.connections[0]
        try:
            await conn.open()
        except SendError as err:
            if isinstance(err, ConfigurationError):
                self.mailer.pause(err)
                reason = str(err)
                await self._redis(lambda: self.queue.set_paused(reason), "pause")
            else:
                logger.warning("SMTP still unreachable: %s", err)
                self.mailer.pause(ConfigurationError(f"(retrying login) {err}"))
            return
        self.mailer.resume()
        self.metrics.paused.set(0)
        await self._redis(lambda: self.queue.set_paused(None), "resume")

    # ================================================================== lanes
    async def _lane(self, conn: Any) -> None:
        while True:
            item = await self._work.get()
            if item is None:
                return
            raw, fetched_at = item
            self._inflight += 1
            self.metrics.inflight.set(self._inflight)
            try:
                await self._handle(conn, raw, fetched_at)
            finally:
                self._inflight -= 1
                self.metrics.inflight.set(self._inflight)
                self.metrics.connections.set(self.mailer.open_connections)
                self._free.release()
                self.monitor.beat("lanes")

    async def _handle(self, conn: Any, raw: bytes, fetched_at: float) -> None:
        s = self.settings
        try:
            event = parse_event(raw)
        except InvalidEvent as exc:
            await self._bury(raw, None, "invalid", exc.reason, attempts=0)
            return
        event_id = event.id or new_event_id()
        if event.id is None:
            event = event.model_copy(update={"id": event_id})
        first_seen = (
            float(event.meta.first_seen) if event.meta and event.meta.first_seen else fetched_at
        )
        produced = event.ts if event.ts is not None else first_seen
        if event.to is not None:
            outside = [a for a in event.to if a not in self.allowed]
            if outside:
                await self._bury(
                    raw, event, "invalid",
                    f"recipient(s) {', '.join(outside[:5])} not allowed: add them to "
                    "NOTIFIER_ALLOWED_RECIPIENTS or NOTIFIER_MAIL_TO",
                    attempts=event.attempts,
                )  # fmt: skip
                return
            recipients = list(event.to)
        else:
            recipients = list(s.mail_to)
        if (await self._redis(lambda: self.queue.sent_marks([event_id]), "dedup"))[0]:
            await self._redis(lambda: self.queue.skip_duplicate(raw), "ack")
            logger.info("duplicate %s: already delivered, dropped", event_id)
            self._emit(Outcome("duplicate", event_id))
            return
        try:
            msg = self.composer.compose(event, event_id=event_id, recipients=recipients)
            data = message_bytes(msg)
        except Exception as exc:  # a template or encoding bug must not kill the lane
            logger.exception("cannot compose event %s", event_id)
            await self._bury(
                raw, event, "invalid", f"cannot compose the mail: {exc}", event.attempts
            )
            return
        subject = str(msg["Subject"])
        if self.mailer.paused:
            await self._redis(lambda: self.queue.requeue(raw), "requeue")
            return
        assert self.composer.from_address
        t0 = time.perf_counter()
        try:
            _result, timing = await conn.send(self.composer.from_address, recipients, data)
        except SendError as err:
            await self._failed(raw, event, event_id, subject, err, first_seen)
            return
        except Exception as exc:  # classify anything unexpected rather than crash the lane
            await self._failed(raw, event, event_id, subject, classify(exc), first_seen)
            return
        smtp_s = time.perf_counter() - t0
        done = time.time()
        latency = max(0.0, done - produced)
        queue_wait = max(0.0, fetched_at - produced)
        record = {
            "t": round(done, 3), "o": "sent", "id": event_id, "l": round(latency, 4),
            "w": round(queue_wait, 4), "s": round(smtp_s, 4), "m": timing.mode,
        }  # fmt: skip
        if timing.refused:
            await self._refused(raw, event, event_id, record, timing.refused, first_seen)
        else:
            await self._redis(lambda: self.queue.ack(raw, event_id, record), "ack")
        self.metrics.observe_delivery(latency, queue_wait, smtp_s)
        self._count("sent")
        line = (
            "sent %s to %s in %.0f ms (queue %.0f ms, smtp %.0f ms%s, %s): %s",
            event_id, ",".join(recipients), latency * 1000, queue_wait * 1000, smtp_s * 1000,
            f", reconnect {timing.connect * 1000:.0f} ms" if timing.connect else "",
            timing.mode, subject,
        )  # fmt: skip
        if latency > s.latency_target_s:
            logger.warning("SLOW " + line[0], *line[1:])
        else:
            logger.info(*line)
        self._emit(Outcome(
            "sent", event_id, subject, recipients, latency, queue_wait, smtp_s,
            attempts=event.attempts + 1,
        ))  # fmt: skip

    async def _refused(
        self, raw: bytes, event: Event, event_id: str, record: dict[str, Any],
        refused: dict[str, str], first_seen: float,
    ) -> None:  # fmt: skip
        """Some recipients refused: the rest got it; the refused ones retry as a new event."""
        logger.warning("event %s: recipients refused: %s", event_id, refused)
        child = event.model_copy(update={"id": f"{event_id}.r{event.attempts + 1}"[:128],
                                         "to": sorted(refused)})  # fmt: skip
        again = child.with_meta(
            attempts=event.attempts + 1,
            last_error="; ".join(f"{a}: {e}" for a, e in refused.items()),
            first_seen=first_seen,
        ).to_json()
        due = time.time() + backoff(event.attempts + 1, base=self.settings.retry_base_s,
                                    cap=self.settings.retry_max_s)  # fmt: skip
        await self._redis(lambda: self.queue.split(raw, event_id, record, again, due), "ack")
        self._retry_added.set()

    async def _failed(
        self, raw: bytes, event: Event, event_id: str, subject: str, err: SendError,
        first_seen: float,
    ) -> None:  # fmt: skip
        s = self.settings
        if isinstance(err, ConfigurationError):
            self.mailer.pause(err)
            self.metrics.paused.set(1)
            await self._redis(lambda: self.queue.requeue(raw), "requeue")
            await self._redis(lambda: self.queue.set_paused(str(err)), "pause")
            self._emit(
                Outcome("requeued", event_id, subject, reason="configuration", error=str(err))
            )
            return
        if isinstance(err, PermanentError):
            await self._bury(raw, event, "permanent", f"refused by the SMTP server: {err}",
                             event.attempts + 1)  # fmt: skip
            return
        throttled = isinstance(err, ThrottledError)
        attempts = event.attempts + (0 if throttled else 1)
        if attempts >= s.max_attempts:
            await self._bury(
                raw,
                event,
                "exhausted",
                f"gave up after {attempts} attempts; last error: {err}",
                attempts,
            )
            return
        reason = "throttled" if throttled else "transient"
        n = (event.meta.attempts if event.meta else 0) + 1
        delay = backoff(
            n,
            base=s.throttle_base_s if throttled else s.retry_base_s,
            cap=max(s.retry_max_s, s.throttle_base_s) if throttled else s.retry_max_s,
        )
        due = time.time() + delay
        again = event.with_meta(
            attempts=attempts if not throttled else event.attempts,
            last_error=str(err)[:500],
            first_seen=first_seen,
        ).to_json()
        record = {"t": round(time.time(), 3), "o": "retry", "id": event_id, "reason": reason}
        await self._redis(lambda: self.queue.retry(raw, again, due, record), "retry")
        self._retry_added.set()
        self.metrics.retried.labels(reason).inc()
        self._count("retry")
        logger.warning("retry %s in %.1f s (%s, attempt %d of %d): %s",
                       event_id, delay, reason, attempts, s.max_attempts, err)  # fmt: skip
        self._emit(
            Outcome("retry", event_id, subject, reason=reason, error=str(err), attempts=attempts)
        )

    async def _bury(
        self, raw: bytes, event: Event | None, reason: str, error: str, attempts: int
    ) -> None:
        event_id = event.id if event and event.id else ""
        text = _text(raw)
        letter: dict[str, Any] = {
            "event": text, "id": event_id, "reason": reason, "error": error,
            "attempts": attempts, "failed_at": time.time(), "worker": self.settings.worker_id,
        }  # fmt: skip
        if len(raw) > MAX_DEAD_TEXT:
            letter["event_bytes"] = len(raw)
            letter["event_truncated"] = True
        record = {"t": round(time.time(), 3), "o": "dead", "id": event_id, "reason": reason}
        await self._redis(lambda: self.queue.bury(raw, letter, record), "dead")
        self.metrics.dead.labels(reason).inc()
        self._count("dead")
        logger.error("dead letter %s (%s): %s", event_id or "<no id>", reason, error)
        self._emit(Outcome("dead", event_id, reason=reason, error=error, attempts=attempts))

    def _emit(self, outcome: Outcome) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                logger.exception("on_outcome hook failed")

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # ================================================================== scheduler, keeper
    async def _scheduler_loop(self) -> None:
        while True:
            self.monitor.beat("scheduler")
            moved = await self._redis(self.queue.schedule, "schedule", "scheduler")
            if moved:
                logger.debug("scheduler: %d retry(ies) due, back in the queue", moved)
                continue
            nxt = await self._redis(self.queue.next_due, "schedule", "scheduler")
            wait = 1.0 if nxt is None else min(1.0, max(0.0, nxt - time.time()))
            self._retry_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_added.wait(), timeout=wait)

    async def _keeper_loop(self) -> None:
        period = max(0.5, self.settings.heartbeat_ttl_s / 4)
        while True:
            self.monitor.beat("keeper")
            if self._inflight == 0:
                self.monitor.beat("lanes")  # idle lanes are healthy lanes
            await self._redis(lambda: self.queue.heartbeat(self._info()), "heartbeat", "keeper")
            moved = await self._redis(self.queue.recover, "recover")
            for wid, n in moved.items():
                logger.warning("worker %s stopped heartbeating: returned its %d event(s)", wid, n)
            d = await self._redis(self.queue.depths, "depths")
            m = self.metrics
            m.queue_depth.set(d.queue)
            m.retry_depth.set(d.retry)
            m.dead_depth.set(d.dead)
            m.processing_depth.set(d.processing)
            m.connections.set(self.mailer.open_connections)
            await self._idle_hygiene()
            await asyncio.sleep(period)

    async def _idle_hygiene(self) -> None:
        now = time.monotonic()
        for conn in self.mailer.connections:
            if conn.is_open and now - conn.last_used > self.settings.smtp_idle_timeout_s:
                await conn.close()

    def _info(self) -> dict[str, Any]:
        return {
            "pid": __import__("os").getpid(), "started": self.started_at,
            "lanes": self.settings.concurrency, "sent": self.counts.get("sent", 0),
            "paused": self.mailer.paused_reason,
        }  # fmt: skip

    def _status(self) -> str:
        c = self.counts
        state = f"PAUSED ({self.mailer.paused_reason}) " if self.mailer.paused else ""
        return (
            f"{state}sent {c.get('sent', 0)}, retried {c.get('retry', 0)}, dead {c.get('dead', 0)};"
            f" in flight {self._inflight}; SMTP connections {self.mailer.open_connections}"
        )


def run(settings: Settings, *, burst: bool = False) -> int:
    """The synchronous entry for the command line."""
    return asyncio.run(Worker(settings).run(burst=burst, install_signals=True))
