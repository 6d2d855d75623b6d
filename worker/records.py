"""The delivery record: what happened to one event (or one digest), as ``stats``, the bench
and the capped ``<prefix>:deliveries`` list see it.

One record is written for every decision the worker settles (see :mod:`worker.settle`), in
the same atomic Redis step that moves the event. On the wire it is compact JSON (twenty
thousand of them are kept); this module is the only place that reads or writes those keys:

=====  ===============================================================
key    field
=====  ===============================================================
``t``  when it was settled (unix seconds)
``o``  the outcome (:class:`Status`)
``id`` the event id (a digest: its Message-ID)
``l``  latency: produced (``ts``, else first seen) to accepted, seconds
``w``  queue wait: produced to fetched
``s``  the send itself (SMTP transaction, HTTP request)
``m``  how it was sent (``pipelining``, ``chunking``, ``sequential``, ...)
``a``  the channel (SMTP account) that took it
``reason``  why (retry, dead letter, requeue)
``n``  a digest: how many events it carried; ``ls`` their latencies
=====  ===============================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["DeliveryRecord", "Status"]


class Status(StrEnum):
    """How handling an event (or a digest) ended."""

    SENT = "sent"
    DIGEST = "digest"  # one mail for several held events
    RETRY = "retry"
    DEAD = "dead"
    HELD = "held"  # held for a digest (rate limit reached)
    REQUEUED = "requeued"  # back to the queue unchanged (configuration pause, fenced)
    SUPPRESSED = "suppressed"  # a repeat inside its dedup window
    DUPLICATE = "duplicate"  # already delivered (sent mark)
    FANOUT = "fanout"  # split into one delivery per channel


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    t: float
    status: Status
    id: str
    latency_s: float | None = None
    queue_wait_s: float | None = None
    send_s: float | None = None
    mode: str = ""
    channel: str = ""
    reason: str = ""
    count: int = 0
    latencies: tuple[float, ...] = ()

    def to_json(self) -> str:
        out: dict[str, Any] = {"t": round(self.t, 3), "o": self.status.value, "id": self.id}
        for key, value in (("l", self.latency_s), ("w", self.queue_wait_s), ("s", self.send_s)):
            if value is not None:
                out[key] = round(value, 4)
        if self.mode:
            out["m"] = self.mode
        if self.channel:
            out["a"] = self.channel
        if self.reason:
            out["reason"] = self.reason
        if self.count:
            out["n"] = self.count
        if self.latencies:
            out["ls"] = [round(x, 3) for x in self.latencies]
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeliveryRecord:
        d = json.loads(raw)
        try:
            status = Status(d.get("o", ""))
        except ValueError:
            status = Status.SENT if "l" in d else Status.RETRY
        return cls(
            t=float(d.get("t", 0.0)),
            status=status,
            id=str(d.get("id", "")),
            latency_s=_float(d.get("l")),
            queue_wait_s=_float(d.get("w")),
            send_s=_float(d.get("s")),
            mode=str(d.get("m", "")),
            channel=str(d.get("a", "")),
            reason=str(d.get("reason", "")),
            count=int(d.get("n", 0)),
            latencies=tuple(float(x) for x in d.get("ls", ())),
        )

    @property
    def delivered(self) -> int:
        """How many events this record delivered (a digest: all of them)."""
        if self.status is Status.SENT:
            return 1
        return self.count if self.status is Status.DIGEST else 0

    @property
    def event_latencies(self) -> list[float]:
        """The latency of every event this record delivered."""
        if self.status is Status.SENT and self.latency_s is not None:
            return [self.latency_s]
        return list(self.latencies) if self.status is Status.DIGEST else []


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
