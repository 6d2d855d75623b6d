"""What happens to one event (or one digest) once a lane has it.

    parse ─► recipients (event ``to`` ∪ route ∪ MAIL_TO) ─► already sent? ─► expired?
          ─► repeat suppressed? ─► account (failover order) ─► rate limit (digest when full)
          ─► compose ─► send ─► settle in Redis (ack | retry | dead | hold | requeue)

Every outcome is settled with one atomic Redis step (:mod:`worker.queue`), so the event is
always in exactly one of queue, processing, retry, held (digest) or dead, or delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from producer.event import Event, InvalidEvent, new_event_id, parse_event

from .accounts import Account
from .compose import Composer, Mail, delayed_prefix, render_subject, repeated_note
from .errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from .mailer import SendTiming, classify
from .metrics import Metrics
from .queue import Claim, Queue
from .retry import backoff
from .settings import Settings

__all__ = ["Deliverer", "Outcome"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
MAX_DEAD_TEXT = 1024 * 1024  # keep at most this much of a rejected event's text
IN_FLIGHT_RECHECK_S = 1.0
Guard = Callable[[Callable[[], Awaitable[Any]], str], Awaitable[Any]]


@dataclass(slots=True)
class Outcome:
    """What happened to one event (passed to ``on_outcome`` hooks, e.g. the demo)."""

    status: str  # sent | retry | dead | duplicate | requeued | suppressed | held | digest
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


@dataclass(frozen=True, slots=True)
class _Sent:
    account: Account
    mail: Mail
    smtp_s: float
    timing: SendTiming


@dataclass(slots=True)
class _Event:
    """An event being handled, with what was worked out about it."""

    raw: bytes
    event: Event
    id: str
    claim: Claim
    first_seen: float
    produced: float
    fetched_at: float
    recipients: list[str]
    digest: bool
    window_s: float


def _raw_id(raw: bytes) -> str:
    """The ``id`` of an event that failed validation, when it has a usable one (so that
    ``dead list`` and ``dead replay --id`` can name it)."""
    if len(raw) > 65536:
        return ""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return ""
    value = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
        return value
    return ""


def _text(raw: bytes) -> str:
    return raw[:MAX_DEAD_TEXT].decode("utf-8", "backslashreplace")


class Deliverer:
    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        accounts: list[Account],
        composer: Composer,
        metrics: Metrics,
        guard: Guard,
        on_outcome: Callable[[Outcome], None] | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.accounts = accounts
        self.by_name = {a.name: a for a in accounts}
        self.composer = composer
        self.metrics = metrics
        self._guard = guard
        self.on_outcome = on_outcome
        self._on_retry = on_retry
        self.allowed = settings.allowed
        self.routes = settings.routes
        self.counts: dict[str, int] = {}
        # claims taken by each lane's current handling (released by its settle; kept here
        # for the dead letter of an unexpected error)
        self._claims: dict[int, dict[bytes, Claim]] = {}

    async def _redis(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        result: T = await self._guard(op, what)
        return result

    # ================================================================== one event
    async def handle(self, lane: int, raw: bytes, fetched_at: float) -> None:
        ev = await self._prepare(lane, raw, fetched_at)
        if ev is None:
            return
        s = self.settings
        now = time.time()
        if ev.event.expires_s is not None and now > ev.produced + ev.event.expires_s:
            await self._bury(ev.raw, ev.event, "expired",
                             f"could not be delivered within expires_s={ev.event.expires_s:g} "
                             f"(now {now - ev.produced:.0f} s after it was produced)",
                             ev.event.attempts, ev.claim)  # fmt: skip
            return
        notes: list[str] = []
        if ev.event.dedup_key is not None and ev.event.attempts == 0:
            suppressed, count, since = await self._redis(
                partial(self.queue.suppress, ev.event.dedup_key, ev.window_s, ev.id), "suppress"
            )
            if suppressed:
                record = {"t": round(now, 3), "o": "suppressed", "id": ev.id}
                await self._redis(partial(self.queue.suppressed, ev.raw, record, ev.claim), "ack")
                self.metrics.suppressed.inc()
                self._count("suppressed")
                logger.info("suppressed %s: repeat %d of %r in its window", ev.id, count,
                            ev.event.dedup_key)  # fmt: skip
                self._emit(Outcome("suppressed", ev.id, attempts=count))
                return
            if count:
                notes.append(repeated_note(count, since, now, s.locale))
        if not notes and ev.event.meta is not None and ev.event.meta.note:
            notes.append(ev.event.meta.note)  # a retry of the mail that carries the note
        subject = render_subject(ev.event)
        late = now - ev.produced
        if late > s.late_after_s:
            subject = f"{delayed_prefix(late, s.locale)} {subject}"
        sent = await self._send_via(
            lane, [ev], ev.recipients,
            lambda account: self.composer.compose(
                ev.event, event_id=ev.id, recipients=ev.recipients, subject=subject,
                notes=notes, sender=account.sender or None,
            ),
            # critical events, and routes with digest = false, are never held: they still
            # take a slot, so the limit sees every mail the account sends
            force=ev.event.severity == "critical" or not ev.digest,
        )  # fmt: skip
        if isinstance(sent, list):
            await self._all_failed(ev, subject, sent, notes)
        elif sent is not None:
            await self._delivered(ev, sent.account, subject, sent.smtp_s, sent.timing)

    async def _prepare(self, lane: int, raw: bytes, fetched_at: float) -> _Event | None:
        """Parse and validate; dead-letter what cannot be sent; drop a repeat of a sent id."""
        try:
            event = parse_event(raw)
        except InvalidEvent as exc:
            await self._bury(raw, None, "invalid", exc.reason, attempts=0)
            return None
        event_id = event.id or new_event_id()
        if event.id is None:
            event = event.model_copy(update={"id": event_id})
        meta = event.meta
        first_seen = float(meta.first_seen) if meta and meta.first_seen else fetched_at
        route = self.routes.resolve(event) if self.routes is not None else None
        if event.to is not None:
            outside = [a for a in event.to if a not in self.allowed]
            if outside:
                await self._bury(raw, event, "invalid",
                                 f"recipient(s) {', '.join(outside[:5])} not allowed: add them to "
                                 "NOTIFIER_ALLOWED_RECIPIENTS or NOTIFIER_MAIL_TO", event.attempts)  # fmt: skip
                return None
            recipients = list(event.to)
        elif route is not None:
            recipients = list(route.to)
        else:
            recipients = list(self.settings.mail_to)
        claim = self.queue.claim_for(event_id, new_event_id()[:12])
        state = await self._redis(partial(self.queue.claim, claim), "claim")
        if state == "sent":
            await self._redis(partial(self.queue.skip_duplicate, raw), "ack")
            logger.info("duplicate %s: already delivered, dropped", event_id)
            self._emit(Outcome("duplicate", event_id))
            return None
        if state == "busy":
            # Another copy of this id is being sent right now (a producer re-sent it): look
            # again in a moment; by then it is delivered (dropped as a duplicate) or not.
            due = time.time() + IN_FLIGHT_RECHECK_S
            record = {"t": round(time.time(), 3), "o": "retry", "id": event_id,
                      "reason": "in-flight"}  # fmt: skip
            await self._redis(
                partial(self.queue.retry, raw, raw.decode("utf-8"), due, record), "retry"
            )
            self._retried()
            logger.info("event %s is being sent by another lane: checking again in %.0f s",
                        event_id, IN_FLIGHT_RECHECK_S)  # fmt: skip
            return None
        self._claims.setdefault(lane, {})[raw] = claim
        window = event.dedup_window_s or (route.dedup_window_s if route else None)
        return _Event(
            raw=raw, event=event, id=event_id, claim=claim, first_seen=first_seen,
            produced=event.ts if event.ts is not None else first_seen, fetched_at=fetched_at,
            recipients=recipients, digest=route.digest if route is not None else True,
            window_s=window or self.settings.dedup_window_s,
        )  # fmt: skip

    async def _send_via(
        self,
        lane: int,
        evs: Sequence[_Event],
        recipients: Sequence[str],
        build: Callable[[Account], Mail],
        *,
        force: bool,
        first: Account | None = None,
    ) -> _Sent | list[tuple[Account, SendError]] | None:
        """Send one mail (built per account: its From differs) on the first usable account,
        ``first`` ahead of the priority order, failing over to the next on anything but a
        permanent refusal. The first account's rate limit holds the events for a digest; a
        later account that is full is skipped. Returns what was sent, or the errors when no
        account took it, or None when the events were settled here (held, dead)."""
        order = [a for a in dict.fromkeys((*([first] if first else []), *self.accounts))
                 if a.available()]  # fmt: skip
        errors: list[tuple[Account, SendError]] = []
        for i, account in enumerate(order):
            if account.per_minute:
                wait = await self._redis(
                    partial(self.queue.rate_acquire, account.name, account.per_minute,
                            force=force, window_s=account.window_s),
                    "rate",
                )  # fmt: skip
                if wait > 0:
                    if i == 0:
                        await self._hold(evs, account, wait)
                        return None
                    continue
            try:
                mail = build(account)
            except Exception as exc:  # a template or encoding bug must not kill the lane
                logger.exception("cannot compose the mail of %s", ", ".join(e.id for e in evs))
                for e in evs:
                    await self._bury(e.raw, e.event, "invalid", f"cannot compose the mail: {exc}",
                                     e.event.attempts, e.claim)  # fmt: skip
                return None
            if self.queue.fenced:
                await self._fenced(evs)
                return None
            conn = account.mailer.connections[lane % len(account.mailer.connections)]
            t0 = time.perf_counter()
            try:
                _result, timing = await conn.send(account.from_address, recipients, mail.data)
            except Exception as exc:  # classify anything unexpected rather than crash the lane
                err = classify(exc, account.settings.smtp_provider)
                account.failed(err)
                if isinstance(err, PermanentError):
                    for e in evs:
                        await self._bury(e.raw, e.event, "permanent",
                                         f"refused by the SMTP server: {err}", e.event.attempts + 1, e.claim)  # fmt: skip
                    return None
                errors.append((account, err))
                continue
            if account.succeeded():
                # the pause flag that `check` and `stats` show is cleared by any worker whose
                # login works again
                await self._redis(partial(self.queue.set_paused, None), "resume")
            return _Sent(account, mail, time.perf_counter() - t0, timing)
        return errors

    async def _delivered(
        self, ev: _Event, account: Account, subject: str, smtp_s: float, timing: SendTiming
    ) -> None:
        done = time.time()
        latency = max(0.0, done - ev.produced)
        queue_wait = max(0.0, ev.fetched_at - ev.produced)
        record = {
            "t": round(done, 3), "o": "sent", "id": ev.id, "l": round(latency, 4),
            "w": round(queue_wait, 4), "s": round(smtp_s, 4), "m": timing.mode,
            "a": account.name,
        }  # fmt: skip
        if timing.refused:
            await self._refused(ev, record, timing.refused)
        else:
            await self._redis(partial(self.queue.ack, ev.raw, ev.claim, record), "ack")
        self.metrics.observe_delivery(latency, queue_wait, smtp_s)
        self._count("sent")
        line = (
            "sent %s to %s in %.0f ms (queue %.0f ms, smtp %.0f ms%s, %s%s): %s",
            ev.id, ",".join(ev.recipients), latency * 1000, queue_wait * 1000, smtp_s * 1000,
            f", reconnect {timing.connect * 1000:.0f} ms" if timing.connect else "",
            timing.mode, f", via {account.name}" if account.priority else "", subject,
        )  # fmt: skip
        if latency > self.settings.latency_target_s:
            logger.warning("SLOW " + line[0], *line[1:])
        else:
            logger.info(*line)
        self._emit(Outcome("sent", ev.id, subject, ev.recipients, latency, queue_wait, smtp_s,
                           attempts=ev.event.attempts + 1, account=account.name))  # fmt: skip

    async def _refused(self, ev: _Event, record: dict[str, Any], refused: dict[str, str]) -> None:
        """Some recipients refused: the rest got it; the refused ones retry as a new event."""
        logger.warning("event %s: recipients refused: %s", ev.id, refused)
        n = ev.event.attempts + 1
        child = ev.event.model_copy(update={"id": f"{ev.id}.r{n}"[:128], "to": sorted(refused)})
        again = child.with_meta(
            attempts=n, last_error="; ".join(f"{a}: {e}" for a, e in refused.items())[:500],
            first_seen=ev.first_seen,
        ).to_json()  # fmt: skip
        due = time.time() + backoff(
            n, base=self.settings.retry_base_s, cap=self.settings.retry_max_s
        )
        await self._redis(partial(self.queue.split, ev.raw, ev.claim, record, again, due), "ack")
        self._retried()

    async def _all_failed(
        self, ev: _Event, subject: str, errors: list[tuple[Account, SendError]],
        notes: Sequence[str] = (),
    ) -> None:  # fmt: skip
        """No account took the event: requeue (all paused), or retry with back-off."""
        s = self.settings
        if not errors:
            # every account is cooling down or paused: wait for the first to be usable
            if all(a.paused for a in self.accounts):
                await self._redis(partial(self.queue.requeue, ev.raw, ev.claim), "requeue")
                self._emit(Outcome("requeued", ev.id, subject, reason="configuration"))
                return
            wait = max(0.5, min(a.retry_at() for a in self.accounts) - time.monotonic())
            states = sorted({a.state for a in self.accounts if a.state != "ok"}) or ["throttled"]
            label = "throttled" if states == ["throttled"] else "transient"
            err: SendError = (ThrottledError if label == "throttled" else TransientError)(
                f"every SMTP account is {' or '.join(states)}"
            )
            await self._retry(ev, subject, err, label, counts=False, delay=wait, notes=notes)
            return
        kinds = [e for _, e in errors]
        if all(isinstance(e, ConfigurationError) for e in kinds):
            await self._redis(partial(self.queue.requeue, ev.raw, ev.claim), "requeue")
            reason_text = str(kinds[0])
            await self._redis(partial(self.queue.set_paused, reason_text), "pause")
            self.metrics.paused.set(1 if all(a.paused for a in self.accounts) else 0)
            self._emit(Outcome("requeued", ev.id, subject, reason="configuration",
                               error=reason_text))  # fmt: skip
            return
        real = [e for e in kinds if not isinstance(e, ConfigurationError)]
        throttled = all(isinstance(e, ThrottledError) for e in real)
        err = real[-1]
        attempts = ev.event.attempts + (0 if throttled else 1)
        if attempts >= s.max_attempts:
            await self._bury(ev.raw, ev.event, "exhausted",
                             f"gave up after {attempts} attempts; last error: {err}", attempts, ev.claim)  # fmt: skip
            return
        await self._retry(ev, subject, err, "throttled" if throttled else "transient",
                          counts=not throttled, notes=notes)  # fmt: skip

    async def _retry(
        self, ev: _Event, subject: str, err: SendError, reason: str, *, counts: bool,
        delay: float | None = None, notes: Sequence[str] = (),
    ) -> None:  # fmt: skip
        s = self.settings
        attempts = ev.event.attempts + (1 if counts else 0)
        if delay is None:
            tries = (ev.event.meta.attempts if ev.event.meta else 0) + 1
            throttled = reason == "throttled"
            delay = backoff(tries, base=s.throttle_base_s if throttled else s.retry_base_s,
                            cap=max(s.retry_max_s, s.throttle_base_s) if throttled else s.retry_max_s)  # fmt: skip
        if ev.event.expires_s is not None:
            left = ev.produced + ev.event.expires_s - time.time()
            if left <= delay:  # the retry would come too late: expire it now, say why
                await self._bury(ev.raw, ev.event, "expired",
                                 f"expires_s={ev.event.expires_s:g} would pass before the next "
                                 f"attempt; last error: {err}", attempts, ev.claim)  # fmt: skip
                return
        due = time.time() + delay
        again = ev.event.with_meta(attempts=attempts, last_error=str(err)[:500],
                                   first_seen=ev.first_seen,
                                   note=notes[0] if notes else None).to_json()  # fmt: skip
        record = {"t": round(time.time(), 3), "o": "retry", "id": ev.id, "reason": reason}
        await self._redis(partial(self.queue.retry, ev.raw, again, due, record, ev.claim), "retry")
        self._retried()
        self.metrics.retried.labels(reason).inc()
        self._count("retry")
        logger.warning("retry %s in %.1f s (%s, attempt %d of %d): %s",
                       ev.id, delay, reason, attempts, s.max_attempts, err)  # fmt: skip
        self._emit(Outcome("retry", ev.id, subject, reason=reason, error=str(err),
                           attempts=attempts))  # fmt: skip

    async def _fenced(self, evs: Sequence[_Event]) -> None:
        """This worker's heartbeat has not been renewed for half its TTL: it could be taken
        for dead and its events handed to another worker, so it starts no send. The events
        go back to the queue (a no-op for any that was already returned)."""
        left = self.queue.lease_left()
        for e in evs:
            await self._redis(partial(self.queue.requeue, e.raw, e.claim), "requeue")
            logger.warning("not sending %s: this worker's heartbeat was not renewed (%.1f s of "
                           "its lease left); back to the queue", e.id, max(0.0, left))  # fmt: skip
            self._emit(Outcome("requeued", e.id, reason="fenced"))

    def _retried(self) -> None:
        if self._on_retry is not None:
            self._on_retry()

    async def _bury(
        self,
        raw: bytes,
        event: Event | None,
        reason: str,
        error: str,
        attempts: int,
        claim: Claim | None = None,
    ) -> None:
        event_id = event.id if event and event.id else _raw_id(raw)
        letter: dict[str, Any] = {
            "event": _text(raw),
            "id": event_id,
            "reason": reason,
            "error": error,
            "attempts": attempts,
            "failed_at": time.time(),
            "worker": self.queue.worker_id,
        }
        if len(raw) > MAX_DEAD_TEXT:
            letter["event_bytes"] = len(raw)
            letter["event_truncated"] = True
        record = {"t": round(time.time(), 3), "o": "dead", "id": event_id, "reason": reason}
        stored = await self._redis(partial(self.queue.bury, raw, letter, record, claim), "dead")
        if not stored:  # no longer ours: the worker that holds it now settles it
            logger.warning("event %s was returned to the queue meanwhile: not dead-lettered here",
                           event_id or "<no id>")  # fmt: skip
            return
        self.metrics.dead.labels(reason).inc()
        self._count("dead")
        logger.error("dead letter %s (%s): %s", event_id or "<no id>", reason, error)
        self._emit(Outcome("dead", event_id, reason=reason, error=error, attempts=attempts))

    def begin(self, lane: int) -> None:
        """A lane starts a new handling: forget the claims of its previous one."""
        self._claims[lane] = {}

    async def bury_internal(self, lane: int, raw: bytes, exc: BaseException) -> None:
        """Dead-letter an event whose handling hit a bug (the lane's claim on it released)."""
        await self._bury(raw, None, "internal", f"internal error: {type(exc).__name__}: {exc}",
                         attempts=0, claim=self._claims.get(lane, {}).get(raw))  # fmt: skip

    # ================================================================== digests
    def _group(self, account: Account, recipients: Sequence[str]) -> str:
        digest = hashlib.sha256(",".join(sorted(recipients)).encode()).hexdigest()[:16]
        return f"{account.name}.{digest}"

    async def _hold(self, evs: Sequence[_Event], account: Account, wait: float) -> None:
        group = self._group(account, evs[0].recipients)
        due = time.time() + wait
        await self._redis(partial(self.queue.hold, group, [e.raw for e in evs], due), "hold")
        await self._redis(partial(self.queue.release, [e.claim for e in evs]), "hold")
        self._count("held")
        logger.info("rate limit of %s (%d/min) reached: %d event(s) held for a digest in %.1f s",
                    account.name, account.per_minute, len(evs), wait)  # fmt: skip
        for e in evs:
            self._emit(Outcome("held", e.id, account=account.name))

    async def handle_digest(self, lane: int, group: str, raws: list[bytes]) -> None:
        """Send one digest mail for the held events of ``group`` (now in processing)."""
        fetched_at = time.time()
        evs: list[_Event] = []
        # prepared together, their claims share one round trip
        prepared = await asyncio.gather(*(self._prepare(lane, raw, fetched_at) for raw in raws))
        for ev in prepared:
            if ev is None:  # dead-lettered or dropped as a duplicate
                continue
            if ev.event.expires_s is not None and fetched_at > ev.produced + ev.event.expires_s:
                await self._bury(ev.raw, ev.event, "expired",
                                 f"could not be delivered within expires_s={ev.event.expires_s:g} "
                                 "(held for a digest: rate limit reached)", ev.event.attempts, ev.claim)  # fmt: skip
                continue
            evs.append(ev)
        if not evs:
            return
        home = self.by_name.get(group.rsplit(".", 1)[0], self.accounts[0])
        recipients = evs[0].recipients
        # The group's own account first, then the others (failover): a digest is a new send
        # like any other and must not wait for a down or paused account.
        sent = await self._send_via(
            lane, evs, recipients,
            lambda account: self.composer.compose_digest(
                [(e.id, e.event) for e in evs], recipients=recipients,
                sender=account.sender or None,
                reason=f"{home.name}: rate limit {home.per_minute}/min reached",
            ),
            force=False, first=home,
        )  # fmt: skip
        if sent is None:
            return
        if isinstance(sent, list):
            delay = max(1.0, min(a.retry_at() for a in self.accounts) - time.monotonic(),
                        backoff(1, base=self.settings.retry_base_s, cap=self.settings.retry_max_s))  # fmt: skip
            logger.warning("digest of %d event(s): no account took it (%s), held again for %.1f s",
                           len(evs), "; ".join(f"{a.name}: {e}" for a, e in sent), delay)  # fmt: skip
            await self._hold(evs, home, delay)
            return
        done = time.time()
        account, subject = sent.account, sent.mail.subject
        record = {"t": round(done, 3), "o": "digest", "id": sent.mail.message_id,
                  "n": len(evs), "s": round(sent.smtp_s, 4), "m": sent.timing.mode,
                  "a": account.name,
                  "ls": [round(max(0.0, done - e.produced), 3) for e in evs]}  # fmt: skip
        await self._redis(
            partial(self.queue.ack_digest, [e.raw for e in evs], [e.claim for e in evs], record),
            "ack",
        )
        for e in evs:
            latency = max(0.0, done - e.produced)
            self.metrics.observe_delivery(latency, max(0.0, e.fetched_at - e.produced), sent.smtp_s)
            self._emit(Outcome("digest", e.id, subject, list(recipients), latency, 0.0,
                               sent.smtp_s, account=account.name))  # fmt: skip
        self.metrics.digests.inc()
        self._count("sent", len(evs))
        logger.info("digest of %d event(s) sent to %s via %s: %s",
                    len(evs), ",".join(recipients), account.name, subject)  # fmt: skip
        slow = [e for e in evs if done - e.produced > self.settings.latency_target_s]
        if slow:  # the cost of the rate limit, visible where slow single mails are
            ids = ", ".join(e.id for e in slow[:10]) + (", ..." if len(slow) > 10 else "")
            logger.warning(
                "SLOW %d held event(s) delivered in a digest up to %.1f s after they were "
                "produced (rate limit of %s (%d/min)): %s",
                len(slow),
                max(done - e.produced for e in slow),
                home.name,
                home.per_minute,
                ids,
            )

    # ================================================================== helpers
    def _emit(self, outcome: Outcome) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                logger.exception("on_outcome hook failed")

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n
