"""What happens to one event (or one digest) once a lane has it: the decision.

    parse ─► recipients (event ``to`` ∪ route ∪ MAIL_TO) ─► claim the id (sent? busy?)
          ─► expired? ─► repeat suppressed? ─► quiet hours ─► account (failover order)
          ─► rate limit ─► compose ─► send ─► one decision ─► settle (worker.settle)

Every way out is a typed decision (:mod:`worker.settle`) that one :class:`Settler` applies,
so the event is always in exactly one of queue, processing, retry, held (digest) or dead,
or delivered, and every outcome is recorded, counted, measured and logged the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from producer.event import InvalidEvent, new_event_id, parse_event

from .channels import Channel, Receipt
from .content import Alert, Digest, build_alert, build_digest, repeated_note
from .errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from .metrics import Metrics
from .queue import Queue
from .quiet import is_quiet_group
from .retry import backoff
from .routing import EMAIL
from .settings import Settings
from .settle import (
    Dead,
    Decision,
    DigestSent,
    Duplicate,
    FanOut,
    Handling,
    Hold,
    Outcome,
    Requeue,
    Retry,
    Sent,
    Settler,
    Suppressed,
)

__all__ = ["Deliverer", "Outcome"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
IN_FLIGHT_RECHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class _Refused:
    """A channel refused the message for good (a permanent reply)."""

    error: SendError
    by: str  # "the SMTP server", "the Webhook service (channel hook)"


@dataclass(frozen=True, slots=True)
class _Failed:
    """No channel took the message; what each one said (empty: none was usable)."""

    errors: list[tuple[Channel, SendError]]


@dataclass(frozen=True, slots=True)
class _NotComposed:
    error: Exception


@dataclass(frozen=True, slots=True)
class _Delivered:
    receipt: Receipt


_Attempt = _Delivered | Hold | Requeue | _Refused | _Failed | _NotComposed


def _who(channel: Channel) -> str:
    """Who refused, for a dead letter's reason."""
    if channel.kind == "email":
        return "the SMTP server"
    return f"channel {channel.name} ({channel.kind})"


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


class Deliverer:
    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        channels: list[Channel],
        metrics: Metrics,
        *,
        settler: Settler,
        others: Sequence[Channel] = (),
        default_fallback: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_seen: Callable[[str, str, float, str], None] | None = None,
    ) -> None:
        self.settings = settings
        # (event id, strategy, produced at, subject): a strategy's event is a sign of life
        self.on_seen = on_seen
        self.queue = queue
        self.channels = channels  # the e-mail accounts, in failover order
        self.others = list(others)  # the other channels (NOTIFIER_CHANNELS_FILE)
        self.by_name = {c.name: c for c in (*channels, *self.others)}
        # tried after the e-mail accounts when the event's route names no fallback
        self.default_fallback = tuple(default_fallback)
        self.metrics = metrics
        self.monotonic = monotonic
        self.settler = settler
        self.clock = clock
        self.allowed = settings.allowed
        self.routes = settings.routes

    @property
    def all_paused(self) -> bool:
        """Every channel (e-mail accounts and the others) is paused on a configuration
        error: nothing can be sent, and the worker stops fetching until a probe works."""
        return all(c.paused for c in self.by_name.values())

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.settler.counts)

    # ================================================================== one event
    async def handle(self, lane: int, raw: bytes, fetched_at: float) -> None:
        """Decide what to do with one event, and settle that (whatever goes wrong)."""
        h = Handling(raw=raw, id=_raw_id(raw), fetched_at=fetched_at)
        await self.settler.settle(h, await self._guarded(self._decide(lane, h), h))

    async def _guarded(self, deciding: Awaitable[T], h: Handling) -> T | Dead:
        try:
            return await deciding
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug must not take the lane down, nor lose or loop on the event: it goes to
            # the dead letters with the error (replayable once the bug is fixed).
            logger.exception("unexpected error while handling %s", h.id or "an event")
            return Dead("internal", f"internal error: {type(exc).__name__}: {exc}", h.attempts)

    async def _decide(self, lane: int, h: Handling) -> Decision:
        targets: list[str] = []
        early = await self._prepare(h, targets)
        if early is not None:
            return early
        assert h.event is not None
        s, event = self.settings, h.event
        now = self.clock()
        if event.expires_s is not None and now > h.produced + event.expires_s:
            return Dead(
                "expired",
                f"could not be delivered within expires_s={event.expires_s:g} "
                f"(now {now - h.produced:.0f} s after it was produced)",
                event.attempts,
            )
        notes: list[str] = []
        copy = event.meta is not None and event.meta.channel is not None
        if event.dedup_key is not None and event.attempts == 0 and not copy:
            suppressed, count, since = await self.queue.suppress(event.dedup_key, h.window_s, h.id)
            if suppressed:
                return Suppressed(count, event.dedup_key)
            if count:
                notes.append(repeated_note(count, since, now, s.locale))
        if len(targets) > 1 and not copy:
            # one delivery per channel, each with its own sent mark, claim, retries and dead
            # letter: a channel that succeeded is never sent again because another failed
            copies = tuple(
                event.with_meta(
                    channel=name, first_seen=h.first_seen, note=notes[0] if notes else None
                ).to_json()
                for name in targets
            )
            return FanOut(tuple(targets), copies)
        claimed = await self._claim(h)
        if claimed is not None:
            return claimed
        # critical events, and routes with digest = false, are never held: they still take
        # a slot, so the limit sees every mail the account sends
        force = event.severity == "critical" or not h.digest
        if h.quiet is not None and not force:
            due = h.quiet.held_until(now)
            if due is not None:  # quiet hours: this delivery waits in its channel's group
                group = h.quiet.group(h.channel, h.recipients)
                return Hold(group, due, h.channel, 0, quiet=", ".join(h.quiet.deliver_during))
        if not notes and event.meta is not None and event.meta.note:
            notes.append(event.meta.note)  # a retry of the mail that carries the note
        late = now - h.produced
        alert = build_alert(
            event,
            event_id=h.id,
            notes=notes,
            delayed_s=late if late > s.late_after_s else None,
            locale=s.locale,
            now=now,
        )
        subject = alert.subject
        order = self._order(h)
        attempt = await self._send_via(
            lane,
            [h],
            alert,
            force=force,
            order=order,
        )
        match attempt:
            case _Delivered():
                return self._sent(h, attempt.receipt, attempt.receipt.subject or subject)
            case Hold() | Requeue():
                return attempt
            case _Refused():
                return Dead(
                    "permanent", f"refused by {attempt.by}: {attempt.error}", h.attempts + 1
                )
            case _NotComposed():
                return Dead("invalid", f"cannot compose the mail: {attempt.error}", h.attempts)
            case _Failed():
                return await self._all_failed(h, subject, attempt.errors, notes, order)

    async def _prepare(self, h: Handling, targets: list[str]) -> Decision | None:
        """Parse and validate, choose the recipients and the channels (``targets``: the
        route's, for a fan-out). A decision when the event ends here (invalid), else None."""
        try:
            event = parse_event(h.raw)
        except InvalidEvent as exc:
            return Dead("invalid", exc.reason, 0)
        event_id = event.id or new_event_id()
        if event.id is None:
            event = event.model_copy(update={"id": event_id})
        h.event, h.id = event, event_id
        meta = event.meta
        h.first_seen = float(meta.first_seen) if meta and meta.first_seen else h.fetched_at
        h.produced = event.ts if event.ts is not None else h.first_seen
        if self.on_seen is not None and event.strategy:
            self.on_seen(event_id, event.strategy, h.produced, event.subject or event.kind)
        route = self.routes.resolve(event) if self.routes is not None else None
        if event.to is not None:
            outside = [a for a in event.to if a not in self.allowed]
            if outside:
                return Dead(
                    "invalid",
                    f"recipient(s) {', '.join(outside[:5])} not allowed: add them to "
                    "NOTIFIER_ALLOWED_RECIPIENTS or NOTIFIER_MAIL_TO",
                    event.attempts,
                )
            h.recipients = list(event.to)
        elif route is not None and route.to:
            h.recipients = list(route.to)
        else:
            h.recipients = list(self.settings.mail_to)
        h.digest = route.digest if route is not None else True
        h.quiet = route.quiet if route is not None else None
        window = event.dedup_window_s or (route.dedup_window_s if route else None)
        h.window_s = window or self.settings.dedup_window_s
        targets[:] = route.targets if route is not None else [EMAIL]
        h.fallback = tuple(route.fallback if route and route.fallback else self.default_fallback)
        h.channel = meta.channel if meta is not None and meta.channel else targets[0]
        if h.channel != EMAIL and h.channel not in self.by_name:
            return Dead(
                "invalid",
                f"channel {h.channel!r} is not configured (NOTIFIER_CHANNELS_FILE); replay the "
                "dead letter once it is",
                event.attempts,
            )
        return None

    async def _prepared(self, h: Handling) -> Decision | None:
        """:meth:`_prepare` and :meth:`_claim` (a held event: one delivery already)."""
        return await self._prepare(h, []) or await self._claim(h)

    async def _claim(self, h: Handling) -> Decision | None:
        """Claim this delivery (the event id, per channel): a decision when it is already
        delivered or another copy of it is being sent right now, else None."""
        assert h.event is not None
        event = h.event
        claim = self.queue.claim_for(h.delivery_id, new_event_id()[:12])
        state = await self.queue.claim(claim)
        if state == "sent":
            return Duplicate()
        if state == "busy":
            # Another copy of this id is being sent right now (a producer re-sent it): look
            # again in a moment; by then it is delivered (dropped as a duplicate) or not.
            return Retry(
                "in-flight",
                "being sent by another lane",
                self.clock() + IN_FLIGHT_RECHECK_S,
                h.raw.decode("utf-8"),
                event.attempts,
            )
        h.claim = claim
        return None

    def _order(self, h: Handling) -> list[Channel]:
        """The channels that may take this delivery, in order: the e-mail accounts, then the
        route's fallback channels; another channel's delivery goes to that channel only."""
        if h.channel != EMAIL:
            return [self.by_name[h.channel]]
        return [*self.channels, *(self.by_name[n] for n in h.fallback if n in self.by_name)]

    async def _send_via(
        self,
        lane: int,
        hs: Sequence[Handling],
        content: Alert | Digest,
        *,
        force: bool,
        order: Sequence[Channel],
    ) -> _Attempt:
        """Send the content on the first usable channel of ``order``, failing over to the
        next on anything but a permanent refusal. The first channel's rate limit holds the
        events for a digest; a later one that is full is skipped."""
        order = [c for c in order if c.available()]
        errors: list[tuple[Channel, SendError]] = []
        for i, channel in enumerate(order):
            if channel.per_minute:
                wait = await self.queue.rate_acquire(
                    channel.name, channel.per_minute, force=force, window_s=channel.window_s
                )
                if wait > 0:
                    if i == 0:
                        group = self._group(channel, hs[0].recipients)
                        return Hold(group, self.clock() + wait, channel.name, channel.per_minute)
                    continue
            if self.queue.fenced:
                return Requeue("fenced")
            try:
                receipt = await channel.send(lane, content, hs[0].recipients)
            except SendError as err:
                channel.health.failed(err)
                if isinstance(err, PermanentError):
                    return _Refused(err, _who(channel))
                errors.append((channel, err))
                continue
            except Exception as exc:  # not a send failure (those are classified): rendering
                logger.exception("cannot render the message of %s", ", ".join(h.id for h in hs))
                return _NotComposed(exc)
            if channel.health.succeeded():
                # the pause flag that `check` and `stats` show is cleared by any worker whose
                # login works again
                await self.queue.set_paused(None)
            return _Delivered(receipt)
        return _Failed(errors)

    def _sent(self, h: Handling, receipt: Receipt, subject: str) -> Sent:
        if not receipt.refused:
            return Sent(receipt, subject)
        # Some recipients refused: the rest got it; the refused ones retry as a new event.
        assert h.event is not None
        n = h.attempts + 1
        child = h.event.model_copy(
            update={"id": f"{h.id}.r{n}"[:128], "to": sorted(receipt.refused)}
        )
        again = child.with_meta(
            attempts=n,
            last_error="; ".join(f"{a}: {e}" for a, e in receipt.refused.items())[:500],
            first_seen=h.first_seen,
        ).to_json()
        due = self.clock() + backoff(
            n, base=self.settings.retry_base_s, cap=self.settings.retry_max_s
        )
        return Sent(receipt, subject, retry_refused=again, retry_due=due)

    async def _all_failed(
        self,
        h: Handling,
        subject: str,
        errors: list[tuple[Channel, SendError]],
        notes: Sequence[str],
        order: Sequence[Channel],
    ) -> Decision:
        """No channel took the event: requeue (all paused), or retry with back-off."""
        s = self.settings
        if not errors:
            # every channel is cooling down or paused: wait for the first to be usable
            if self.all_paused:
                return Requeue("configuration", subject=subject)
            wait = max(0.5, min(c.retry_at() for c in order) - self.monotonic())
            states = sorted({str(c.state) for c in order if c.state != "ok"}) or ["throttled"]
            label = "throttled" if states == ["throttled"] else "transient"
            err: SendError = (ThrottledError if label == "throttled" else TransientError)(
                f"every {'SMTP account' if h.channel == EMAIL else 'channel'} is "
                f"{' or '.join(states)}"
            )
            return self._retry(h, subject, err, label, counts=False, delay=wait, notes=notes)
        kinds = [e for _, e in errors]
        if all(isinstance(e, ConfigurationError) for e in kinds):
            reason_text = str(kinds[0])
            await self.queue.set_paused(reason_text)
            self.metrics.paused.set(1 if all(c.paused for c in order) else 0)
            if self.all_paused:  # the worker stops fetching until a probe works
                return Requeue("configuration", reason_text, subject)
            # other channels still work, so the worker goes on: this delivery waits
            wait = max(0.5, min(c.retry_at() for c in order) - self.monotonic())
            return self._retry(
                h, subject, kinds[0], "paused", counts=False, delay=wait, notes=notes
            )
        real = [e for e in kinds if not isinstance(e, ConfigurationError)]
        throttled = all(isinstance(e, ThrottledError) for e in real)
        err = real[-1]
        attempts = h.attempts + (0 if throttled else 1)
        if attempts >= s.max_attempts:
            error = f"gave up after {attempts} attempts; last error: {err}"
            return Dead("exhausted", error, attempts)
        reason = "throttled" if throttled else "transient"
        return self._retry(h, subject, err, reason, counts=not throttled, notes=notes)

    def _retry(
        self,
        h: Handling,
        subject: str,
        err: SendError,
        reason: str,
        *,
        counts: bool,
        delay: float | None = None,
        notes: Sequence[str] = (),
    ) -> Decision:
        s = self.settings
        assert h.event is not None
        attempts = h.attempts + (1 if counts else 0)
        if delay is None:
            tries = (h.event.meta.attempts if h.event.meta else 0) + 1
            throttled = reason == "throttled"
            delay = backoff(
                tries,
                base=s.throttle_base_s if throttled else s.retry_base_s,
                cap=max(s.retry_max_s, s.throttle_base_s) if throttled else s.retry_max_s,
            )
        if h.event.expires_s is not None:
            left = h.produced + h.event.expires_s - self.clock()
            if left <= delay:  # the retry would come too late: expire it now, say why
                return Dead(
                    "expired",
                    f"expires_s={h.event.expires_s:g} would pass before the next attempt; "
                    f"last error: {err}",
                    attempts,
                )
        again = h.event.with_meta(
            attempts=attempts,
            last_error=str(err)[:500],
            first_seen=h.first_seen,
            note=notes[0] if notes else None,
        ).to_json()
        return Retry(reason, str(err), self.clock() + delay, again, attempts, subject)

    # ================================================================== digests
    def _group(self, channel: Channel, recipients: Sequence[str]) -> str:
        digest = hashlib.sha256(",".join(sorted(recipients)).encode()).hexdigest()[:16]
        return f"{channel.name}.{digest}"

    async def handle_digest(self, lane: int, group: str, raws: list[bytes]) -> None:
        """Send one digest mail for the held events of ``group`` (now in processing)."""
        fetched_at = self.clock()
        quiet = is_quiet_group(group)
        why = "quiet hours" if quiet else "rate limit reached"
        hs = [Handling(raw=raw, id=_raw_id(raw), fetched_at=fetched_at) for raw in raws]
        # prepared together, their claims share one round trip
        early = await asyncio.gather(*(self._guarded(self._prepared(h), h) for h in hs))
        ready: list[Handling] = []
        for h, decision in zip(hs, early, strict=True):
            expires = h.event.expires_s if h.event is not None else None
            if decision is None and expires is not None and fetched_at > h.produced + expires:
                decision = Dead(
                    "expired",
                    f"could not be delivered within expires_s={expires:g} "
                    f"(held for a digest: {why})",
                    h.attempts,
                )
            if decision is not None:
                await self.settler.settle(h, decision)
            else:
                ready.append(h)
        if not ready:
            return
        home = self.by_name.get(group.rsplit(".", 1)[0], self.channels[0])
        recipients = ready[0].recipients
        locale = self.settings.locale
        if not quiet:
            reason = f"{home.name}: rate limit {home.per_minute}/min reached"
        elif ready[0].quiet is not None:  # the route's quiet hours (as the routes file is now)
            reason = ready[0].quiet.reason(fetched_at, locale)
        else:
            reason = "静默时段" if locale == "zh" else "quiet hours"
        order = [home, *(c for c in self._order(ready[0]) if c is not home)]
        # The group's own account first, then the others (failover): a digest is a new send
        # like any other and must not wait for a down or paused account.
        try:
            attempt = await self._send_via(
                lane,
                ready,
                build_digest(
                    [(h.id, h.event) for h in ready if h.event is not None],
                    reason=reason,
                    locale=locale,
                    now=fetched_at,
                ),
                force=False,
                order=order,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("unexpected error while sending a digest")
            error = f"internal error: {type(exc).__name__}: {exc}"
            for h in ready:
                await self.settler.settle(h, Dead("internal", error, h.attempts))
            return
        match attempt:
            case _Delivered():
                await self.settler.digest_sent(
                    ready,
                    DigestSent(
                        attempt.receipt,
                        attempt.receipt.subject,
                        attempt.receipt.message_id,
                        home.name,
                        home.per_minute,
                        quiet=quiet,
                    ),
                )
            case Hold():
                await self.settler.hold(ready, attempt)
            case Requeue():
                for h in ready:
                    await self.settler.settle(h, attempt)
            case _Refused():
                for h in ready:
                    error = f"refused by {attempt.by}: {attempt.error}"
                    await self.settler.settle(h, Dead("permanent", error, h.attempts + 1))
            case _NotComposed():
                for h in ready:
                    error = f"cannot compose the mail: {attempt.error}"
                    await self.settler.settle(h, Dead("invalid", error, h.attempts))
            case _Failed():
                delay = max(
                    1.0,
                    min(c.retry_at() for c in self.channels) - self.monotonic(),
                    backoff(1, base=self.settings.retry_base_s, cap=self.settings.retry_max_s),
                )
                said = "; ".join(f"{a.name}: {e}" for a, e in attempt.errors)
                logger.warning(
                    "digest of %d event(s): no account took it (%s), held again for %.1f s",
                    len(ready),
                    said,
                    delay,
                )
                group = self._group(home, recipients)
                hold = Hold(group, self.clock() + delay, home.name, home.per_minute)
                await self.settler.hold(ready, hold)
