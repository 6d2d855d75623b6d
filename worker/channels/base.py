"""A channel: a kind of destination (an SMTP account today; IM services next).

    Channel ── health: Health   one object holds the state: ok, throttled until T,
               │                paused on a configuration error, down until T
               ├── pool         warm connections (no state of the channel's own)
               ├── send(lane, content, recipients) -> Receipt    raises SendError
               └── classify(exc) -> SendError    transient | throttled | permanent | configuration

A channel module is one file: a :class:`Channel` subclass and its settings model. The
deliverer asks channels in failover order, renders nothing itself, and turns what a send
raised (already classified) into a decision (:mod:`worker.settle`).

State rules (one incident is one failure, whatever number of lanes saw it; see
:class:`worker.retry.Cooldown`):

* *throttled* (the service said "too fast"): cool down from ``throttle_base_s``, doubling;
* *down* (no reply at all: cannot connect, disconnected, timed out): cool down from
  ``down_base_s``, doubling to ``down_cap_s`` (alerts cannot wait long);
* *paused* (login refused, TLS failure, a bad key): every lane stops, 5 s doubling to 5 min;
  when the pause ends the next send (or the worker's probe) tries again;
* a send that works makes the channel *ok* again.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from ..content import Alert, Digest
from ..errors import ConfigurationError, SendError, ThrottledError, TransientError
from ..retry import Cooldown

__all__ = ["Channel", "Health", "Receipt", "State"]

logger = logging.getLogger(__name__)


class State(StrEnum):
    OK = "ok"
    THROTTLED = "throttled"
    PAUSED = "paused"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a channel says about a send it completed."""

    channel: str
    mode: str
    send_s: float
    connect_s: float = 0.0
    refused: dict[str, str] = field(default_factory=dict)  # recipient -> reply
    via_failover: bool = False
    message_id: str = ""
    subject: str = ""  # as rendered for this channel


class Health:
    """The state of one channel, shared by all of its lanes."""

    PAUSE_MIN_S = 5.0
    PAUSE_MAX_S = 300.0

    def __init__(
        self,
        name: str,
        *,
        clock: Callable[[], float],
        throttle_base_s: float,
        throttle_cap_s: float,
        down_base_s: float,
        down_cap_s: float,
    ) -> None:
        self.name = name
        self.clock = clock
        self.throttle_base_s, self.throttle_cap_s = throttle_base_s, throttle_cap_s
        self.down_base_s, self.down_cap_s = down_base_s, down_cap_s
        self.state = State.OK
        self.reason = ""
        self._cooldown = Cooldown(clock)  # throttled or down
        self._pause = Cooldown(clock)  # paused on a configuration error

    @property
    def paused(self) -> bool:
        return self.state is State.PAUSED

    def pause_remaining(self) -> float:
        return self._pause.remaining() if self.paused else 0.0

    def available(self) -> bool:
        """May a send be tried now (a probe, when a pause or cool-down just ended)?"""
        if self.paused:
            return self.pause_remaining() == 0.0
        return self.clock() >= self._cooldown.until

    def retry_at(self) -> float:
        """When (on the channel's clock) it may be tried again."""
        if self.paused:
            return self.clock() + self.pause_remaining()
        return self._cooldown.until

    def failed(self, err: SendError) -> None:
        """Record a failed send (or login)."""
        if isinstance(err, ConfigurationError):
            first = not self.paused
            delay = self._pause.trip(base=self.PAUSE_MIN_S, cap=self.PAUSE_MAX_S, jitter=False)
            self._set(State.PAUSED, str(err))
            if delay is not None:
                (logger.error if first else logger.warning)(
                    "%s paused for %.0f s: %s; events stay queued", self._what, delay, err
                )
            return
        if isinstance(err, ThrottledError):
            delay = self._cooldown.trip(base=self.throttle_base_s, cap=self.throttle_cap_s)
            if err.retry_after_s is not None:  # the service said how long: that, exactly
                self._cooldown.until = self.clock() + err.retry_after_s
                delay = err.retry_after_s
            reason = str(err) if delay is None else f"{err} (cooling down {delay:.0f} s)"
            self._set(State.THROTTLED, reason)
        elif isinstance(err, TransientError) and err.code is None:
            # no reply at all: cannot connect, disconnected, timed out -> the channel is down
            delay = self._cooldown.trip(base=self.down_base_s, cap=self.down_cap_s)
            if delay is not None:
                self._set(State.DOWN, f"{err} (retrying in {delay:.1f} s)")

    def succeeded(self) -> bool:
        """Record a send (or login) that worked; True when the channel was paused."""
        was_paused = self.paused
        if self.state is not State.OK:
            logger.warning("%s works again (was %s)", self._what, self.state)
        self._pause.reset()
        self._cooldown.reset()
        self.state, self.reason = State.OK, ""
        return was_paused

    @property
    def _what(self) -> str:
        return f"channel {self.name}"

    def _set(self, state: State, reason: str) -> None:
        if state is not self.state and state is not State.PAUSED:
            logger.warning("%s is %s: %s", self._what, state, reason)
        self.state, self.reason = state, reason

    def describe(self) -> dict[str, Any]:
        left = max(0.0, self.retry_at() - self.clock())
        return {"state": str(self.state), "reason": self.reason, "retry_in_s": round(left, 1)}


class Channel(ABC):
    """One configured destination. Subclasses: one module each (``email.py``, ...)."""

    kind: ClassVar[str]

    def __init__(
        self, name: str, *, priority: int, health: Health, per_minute: int, window_s: float
    ) -> None:
        self.name = name
        self.priority = priority
        self.health = health
        self.per_minute = per_minute  # 0: no limit
        self.window_s = window_s

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> State:
        return self.health.state

    @property
    def paused(self) -> bool:
        return self.health.paused

    @property
    def reason(self) -> str:
        return self.health.reason

    def available(self) -> bool:
        return self.health.available()

    def retry_at(self) -> float:
        return self.health.retry_at()

    # ------------------------------------------------------------------ what a kind provides
    @abstractmethod
    async def send(self, lane: int, content: Alert | Digest, recipients: Sequence[str]) -> Receipt:
        """Deliver ``content`` (rendered for this channel) on lane ``lane``'s connection.
        Raises :class:`~worker.errors.SendError` (already classified)."""

    @abstractmethod
    def classify(self, exc: BaseException) -> SendError:
        """What a failure of this channel means: transient, throttled, permanent or
        configuration."""

    @abstractmethod
    async def probe(self) -> None:
        """Check the channel can be used (a login, a harmless API call); raises SendError."""

    async def warm_up(self) -> list[SendError]:
        """Open the lanes' connections now; the errors, if any."""
        return []

    async def close_idle(self) -> None:  # noqa: B027 - a channel without a pool has none
        """Close connections idle longer than the service keeps them."""

    async def close(self) -> None:  # noqa: B027 - a channel without a pool has none
        """Close every connection; never raises."""

    @property
    def open_connections(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {
            **self.health.describe(),
            "kind": self.kind,
            "rate_per_minute": self.per_minute,
            "connections": self.open_connections,
        }
