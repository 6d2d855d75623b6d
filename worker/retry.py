"""Retry policy: data (settings) plus one pure function, testable without Redis."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

__all__ = ["Cooldown", "backoff"]


def backoff(
    attempts: int,
    *,
    base: float,
    cap: float,
    rng: random.Random | None = None,
    jitter: bool = True,
) -> float:
    """Delay before attempt ``attempts + 1`` (``attempts`` >= 1 failed so far).

    Exponential with "full jitter" (AWS architecture blog): uniform in
    ``[0, min(cap, base * 2 ** (attempts - 1))]``, never below ``base / 10`` so that a
    failing server is not hammered in a tight loop.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    ceiling = min(cap, base * 2.0 ** min(attempts - 1, 60))
    if not jitter:
        return ceiling
    return max(base / 10.0, (rng or random).uniform(0.0, ceiling))


class Cooldown:
    """The back-off of a whole resource (an SMTP account's pause or cool-down).

    Tripping it while it runs is the same incident (every lane fails at once when a server
    goes away): nothing changes. Only a trip after it ran out, i.e. a failed probe, makes
    the next one longer: the :func:`backoff` ceiling of the number of such trips, with
    "equal jitter" (uniform in ``[ceiling / 2, ceiling]``) rather than the full jitter of an
    event's retries. A probe is one per resource, not a herd, and half a ceiling as a floor
    bounds the wait after the resource comes back: the cool-downs so far add up to at least
    half the next ceiling, so the next probe comes within twice the outage (plus ``base``).
    With full jitter a run of short draws could let the ceiling outgrow the outage (a 3 s
    SMTP outage was once followed by an 8.3 s cool-down)."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None
    ) -> None:
        self._clock = clock
        self._rng = rng
        self.until = 0.0
        self.trips = 0

    def remaining(self) -> float:
        return max(0.0, self.until - self._clock())

    def trip(self, *, base: float, cap: float, jitter: bool = True) -> float | None:
        """Start the next, longer cool-down and return its length; None while one runs."""
        if self.remaining() > 0:
            return None
        self.trips += 1
        delay = backoff(self.trips, base=base, cap=cap, jitter=False)
        if jitter:
            delay *= (self._rng or random).uniform(0.5, 1.0)
        self.until = self._clock() + delay
        return delay

    def reset(self) -> None:
        self.until, self.trips = 0.0, 0
