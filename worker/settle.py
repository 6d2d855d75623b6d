"""Decide, then settle: how handling an event ends, and the one place that records it.

Handling an event (:mod:`worker.deliver`) ends in exactly one typed decision::

    Sent        accepted by a channel (a retry of its own for refused recipients, if any)
    Retry       not now: back-off, throttle, or another copy of the id is being sent
    Dead        never: invalid, refused for good, out of attempts, expired, a bug
    Hold        the channel's rate limit is reached, or the route's quiet hours: held for
                a digest
    Requeue     back to the queue unchanged (every account paused, or this worker fenced)
    Suppressed  a repeat inside its dedup window
    Duplicate   already delivered (the sent mark)

and a digest ends in :class:`DigestSent` (or a :class:`Hold` again). :class:`Settler`
applies a decision: the one atomic Redis step (:class:`worker.queue.Queue`), the delivery
record written in that step (:class:`worker.records.DeliveryRecord`), the Prometheus
metrics, the worker's counts, the log line and the ``on_outcome`` hook. Nothing else writes
any of them, so no way out of a handling can skip part of the bookkeeping.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from producer.event import Event

from .channels.base import Receipt
from .metrics import Metrics
from .queue import Claim, Queue
from .records import DeliveryRecord, Status

if TYPE_CHECKING:
    from .quiet import Quiet

__all__ = [
    "Dead",
    "Decision",
    "DigestSent",
    "Duplicate",
    "FanOut",
    "Handling",
    "Hold",
    "Outcome",
    "Receipt",
    "Requeue",
    "Retry",
    "Sent",
    "Settler",
    "Suppressed",
]

# One line per outcome, under the logger name those lines have always had (log filters and
# dashboards select on it).
logger = logging.getLogger("worker.deliver")
MAX_DEAD_TEXT = 1024 * 1024  # keep at most this much of a rejected event's text


@dataclass(slots=True)
class Outcome:
    """What happened to one event (passed to ``on_outcome`` hooks, e.g. the demo)."""

    status: Status
    event_id: str
    subject: str = ""
    recipients: list[str] = field(default_factory=list)
    latency: float = 0.0
    queue_wait: float = 0.0
    smtp: float = 0.0
    reason: str = ""
    error: str = ""
    attempts: int = 0
    account: str = ""


@dataclass(slots=True)
class Handling:
    """One event as a lane handles it, with what was worked out about it. ``event`` is None
    (and ``id`` may be empty) when it could not be parsed."""

    raw: bytes
    id: str
    fetched_at: float
    event: Event | None = None
    claim: Claim | None = None
    first_seen: float = 0.0
    produced: float = 0.0
    recipients: list[str] = field(default_factory=list)
    digest: bool = True
    window_s: float = 0.0
    channel: str = "email"  # the channel this delivery is for
    fallback: tuple[str, ...] = ()  # tried after the e-mail accounts (an e-mail delivery)
    quiet: Quiet | None = None  # the route's quiet hours

    @property
    def attempts(self) -> int:
        return self.event.attempts if self.event is not None else 0

    @property
    def delivery_id(self) -> str:
        """What the sent mark and the claim are keyed by: the event id for e-mail (as it
        always was), ``<id>@<channel>`` for another channel's delivery of the event."""
        return self.id if self.channel == "email" else f"{self.id}@{self.channel}"


@dataclass(frozen=True, slots=True)
class Sent:
    receipt: Receipt
    subject: str
    retry_refused: str | None = None  # the event text for the refused recipients
    retry_due: float = 0.0


@dataclass(frozen=True, slots=True)
class Retry:
    reason: str  # transient | throttled | in-flight
    error: str
    due: float
    again: str  # the event text to retry (attempts and last error in its _meta)
    attempts: int
    subject: str = ""


@dataclass(frozen=True, slots=True)
class Dead:
    reason: str  # invalid | permanent | exhausted | expired | internal
    error: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Hold:
    group: str
    due: float
    channel: str
    per_minute: int
    quiet: str = ""  # held by quiet hours: the route's sessions (empty: by the rate limit)


@dataclass(frozen=True, slots=True)
class Requeue:
    reason: str  # configuration | fenced
    error: str = ""
    subject: str = ""


@dataclass(frozen=True, slots=True)
class Suppressed:
    count: int
    dedup_key: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    pass


@dataclass(frozen=True, slots=True)
class FanOut:
    """The event goes to several channels: one copy per channel (each its own delivery:
    sent mark, claim, retries, dead letter) replaces it, at the front of the queue."""

    channels: tuple[str, ...]
    copies: tuple[str, ...]  # the event text of each delivery (its _meta names the channel)


@dataclass(frozen=True, slots=True)
class DigestSent:
    receipt: Receipt
    subject: str
    message_id: str
    home: str  # the account whose rate limit held the events
    per_minute: int
    quiet: bool = False  # held by quiet hours: latency counts from the digest, not before


Decision = Sent | Retry | Dead | Hold | Requeue | Suppressed | Duplicate | FanOut


def _text(raw: bytes) -> str:
    return raw[:MAX_DEAD_TEXT].decode("utf-8", "backslashreplace")


class Settler:
    def __init__(
        self,
        queue: Queue,
        metrics: Metrics,
        *,
        latency_target_s: float,
        max_attempts: int = 8,
        on_outcome: Callable[[Outcome], None] | None = None,
        on_retry: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.metrics = metrics
        self.target = latency_target_s
        self.max_attempts = max_attempts
        self.on_outcome = on_outcome
        self.on_retry = on_retry
        self.clock = clock
        self.counts: Counter[str] = Counter()

    # ================================================================== one event
    async def settle(self, h: Handling, d: Decision) -> None:
        now = self.clock()
        match d:
            case Sent():
                await self._sent(h, d, now)
            case Retry():
                await self._retry(h, d, now)
            case Dead():
                await self._dead(h, d, now)
            case Hold():
                await self._hold([h], d, now)
            case Requeue():
                rec = DeliveryRecord(now, Status.REQUEUED, h.id, reason=d.reason)
                await self.queue.requeue(h.raw, rec, h.claim)
                self.metrics.requeued.labels(d.reason).inc()
                if d.reason == "fenced":
                    logger.warning(
                        "not sending %s: this worker's heartbeat was not renewed (%.1f s of its "
                        "lease left); back to the queue",
                        h.id,
                        max(0.0, self.queue.lease_left()),
                    )
                else:
                    logger.info("requeued %s (%s): %s", h.id, d.reason, d.error)
                self._done(
                    Outcome(
                        Status.REQUEUED,
                        h.id,
                        subject=d.subject,
                        reason=d.reason,
                        error=d.error,
                        account=h.channel,
                    )
                )
            case Suppressed():
                rec = DeliveryRecord(now, Status.SUPPRESSED, h.id)
                await self.queue.drop(h.raw, rec, h.claim)
                self.metrics.suppressed.inc()
                logger.info(
                    "suppressed %s: repeat %d of %r in its window", h.id, d.count, d.dedup_key
                )
                self._done(Outcome(Status.SUPPRESSED, h.id, attempts=d.count, account=h.channel))
            case Duplicate():
                rec = DeliveryRecord(now, Status.DUPLICATE, h.id, channel=h.channel)
                await self.queue.drop(h.raw, rec)
                self.metrics.duplicates.inc()
                logger.info("duplicate %s: already delivered%s, dropped", h.id, self._via(h))
                self._done(Outcome(Status.DUPLICATE, h.id, account=h.channel))
            case FanOut():
                rec = DeliveryRecord(now, Status.FANOUT, h.id, count=len(d.copies))
                await self.queue.fan_out(h.raw, d.copies, rec)
                self.metrics.fanned_out.inc()
                logger.info("fan-out %s to %s", h.id, ", ".join(d.channels))
                self._done(Outcome(Status.FANOUT, h.id))

    async def _sent(self, h: Handling, d: Sent, now: float) -> None:
        r = d.receipt
        latency = max(0.0, now - h.produced)
        queue_wait = max(0.0, h.fetched_at - h.produced)
        rec = DeliveryRecord(
            now,
            Status.SENT,
            h.id,
            latency_s=latency,
            queue_wait_s=queue_wait,
            send_s=r.send_s,
            mode=r.mode,
            channel=r.channel,
        )
        assert h.claim is not None  # a send always follows a claim
        if d.retry_refused is not None:
            await self.queue.split(h.raw, h.claim, rec, d.retry_refused, d.retry_due)
            self.metrics.retried.labels("refused").inc()
            self.counts["retry"] += 1
            logger.warning("event %s: recipients refused: %s", h.id, r.refused)
            self._wake()
        else:
            await self.queue.ack(h.raw, h.claim, rec)
        self.metrics.observe_delivery(latency, queue_wait, r.send_s)
        args = (
            h.id,
            ",".join(h.recipients),
            latency * 1000,
            queue_wait * 1000,
            r.send_s * 1000,
            f", reconnect {r.connect_s * 1000:.0f} ms" if r.connect_s else "",
            r.mode,
            f", via {r.channel}" if r.via_failover else "",
            d.subject,
        )
        line = "sent %s to %s in %.0f ms (queue %.0f ms, smtp %.0f ms%s, %s%s): %s"
        if latency > self.target:
            logger.warning("SLOW " + line, *args)
        else:
            logger.info(line, *args)
        self._done(
            Outcome(
                Status.SENT,
                h.id,
                subject=d.subject,
                recipients=list(h.recipients),
                latency=latency,
                queue_wait=queue_wait,
                smtp=r.send_s,
                attempts=h.attempts + 1,
                account=r.channel,
            )
        )

    async def _retry(self, h: Handling, d: Retry, now: float) -> None:
        rec = DeliveryRecord(now, Status.RETRY, h.id, reason=d.reason, channel=h.channel)
        await self.queue.retry(h.raw, d.again, d.due, rec, h.claim)
        self.metrics.retried.labels(d.reason).inc()
        self._wake()
        level = logging.INFO if d.reason == "in-flight" else logging.WARNING
        logger.log(
            level,
            "retry %s in %.1f s (%s, attempt %d of %d): %s",
            h.id,
            max(0.0, d.due - now),
            d.reason,
            d.attempts,
            self.max_attempts,
            d.error,
        )
        self._done(
            Outcome(
                Status.RETRY,
                h.id,
                subject=d.subject,
                reason=d.reason,
                error=d.error,
                attempts=d.attempts,
                account=h.channel,
            )
        )

    async def _dead(self, h: Handling, d: Dead, now: float) -> None:
        letter: dict[str, Any] = {
            "event": _text(h.raw),
            "id": h.id,
            "channel": h.channel,
            "reason": d.reason,
            "error": d.error,
            "attempts": d.attempts,
            "failed_at": now,
            "worker": self.queue.worker_id,
        }
        if len(h.raw) > MAX_DEAD_TEXT:
            letter["event_bytes"] = len(h.raw)
            letter["event_truncated"] = True
        rec = DeliveryRecord(now, Status.DEAD, h.id, reason=d.reason, channel=h.channel)
        if not await self.queue.bury(h.raw, letter, rec, h.claim):
            # no longer ours (returned to the queue while this worker was taken for dead):
            # the worker that holds it now settles it
            logger.warning(
                "event %s was returned to the queue meanwhile: not dead-lettered here",
                h.id or "<no id>",
            )
            return
        self.metrics.dead.labels(d.reason).inc()
        logger.error(
            "dead letter %s%s (%s): %s", h.id or "<no id>", self._via(h), d.reason, d.error
        )
        self._done(
            Outcome(
                Status.DEAD,
                h.id,
                reason=d.reason,
                error=d.error,
                attempts=d.attempts,
                account=h.channel,
            )
        )

    # ================================================================== several events
    async def hold(self, hs: Sequence[Handling], d: Hold) -> None:
        """Hold events (one, or a digest's that could not go yet) for a digest."""
        await self._hold(hs, d, self.clock())

    async def _hold(self, hs: Sequence[Handling], d: Hold, now: float) -> None:
        rec = DeliveryRecord(
            now,
            Status.HELD,
            hs[0].id,
            count=len(hs),
            channel=d.channel,
            reason="quiet" if d.quiet else "",
        )
        await self.queue.hold(d.group, [h.raw for h in hs], d.due, rec)
        await self.queue.release([h.claim for h in hs if h.claim is not None])
        self.metrics.held.inc(len(hs))
        ids = ", ".join(h.id for h in hs[:10]) + (", ..." if len(hs) > 10 else "")
        if d.quiet:
            logger.info(
                "quiet hours (sent at once only during %s): %d event(s) for %s held for a "
                "digest in %.0f s: %s",
                d.quiet,
                len(hs),
                d.channel,
                max(0.0, d.due - now),
                ids,
            )
        else:
            logger.info(
                "rate limit of %s (%d/min) reached: %d event(s) held for a digest in %.1f s: %s",
                d.channel,
                d.per_minute,
                len(hs),
                max(0.0, d.due - now),
                ids,
            )
        for h in hs:
            self._done(Outcome(Status.HELD, h.id, account=d.channel))

    async def digest_sent(self, hs: Sequence[Handling], d: DigestSent) -> None:
        now = self.clock()
        r = d.receipt
        # Quiet hours delay events on purpose: their latency runs from the digest's time
        # (when the quiet hours let them go), so the SLO figures measure the worker, not
        # the user's choice. A rate limit's delay does count.
        starts = [max(h.produced, h.fetched_at) if d.quiet else h.produced for h in hs]
        latencies = [max(0.0, now - start) for start in starts]
        rec = DeliveryRecord(
            now,
            Status.DIGEST,
            d.message_id,
            send_s=r.send_s,
            mode=r.mode,
            channel=r.channel,
            count=len(hs),
            latencies=tuple(latencies),
        )
        claims = [h.claim for h in hs if h.claim is not None]
        await self.queue.ack_digest([h.raw for h in hs], claims, rec)
        for h, start, latency in zip(hs, starts, latencies, strict=True):
            self.metrics.observe_delivery(latency, max(0.0, h.fetched_at - start), r.send_s)
            self._done(
                Outcome(
                    Status.DIGEST,
                    h.id,
                    subject=d.subject,
                    recipients=list(h.recipients),
                    latency=latency,
                    smtp=r.send_s,
                    account=r.channel,
                )
            )
        self.metrics.digests.inc()
        logger.info(
            "digest of %d event(s) sent to %s via %s: %s",
            len(hs),
            ",".join(hs[0].recipients),
            r.channel,
            d.subject,
        )
        slow = [(h, x) for h, x in zip(hs, latencies, strict=True) if x > self.target]
        if slow and not d.quiet:  # the cost of the rate limit, visible where slow single mails are
            ids = ", ".join(h.id for h, _ in slow[:10]) + (", ..." if len(slow) > 10 else "")
            logger.warning(
                "SLOW %d held event(s) delivered in a digest up to %.1f s after they were "
                "produced (rate limit of %s (%d/min)): %s",
                len(slow),
                max(x for _, x in slow),
                d.home,
                d.per_minute,
                ids,
            )

    # ================================================================== helpers
    @staticmethod
    def _via(h: Handling) -> str:
        return "" if h.channel == "email" else f" (channel {h.channel})"

    def _wake(self) -> None:
        if self.on_retry is not None:
            self.on_retry()

    def _done(self, outcome: Outcome) -> None:
        if outcome.account:  # the channel (an SMTP account's name for e-mail that was sent)
            self.metrics.channel_outcomes.labels(outcome.account, outcome.status.value).inc()
        # an event delivered in a digest is a sent event in the worker's counts
        self.counts["sent" if outcome.status is Status.DIGEST else outcome.status.value] += 1
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                logger.exception("on_outcome hook failed")
