"""Retry policy: data (settings) plus one pure function, testable without Redis."""

from __future__ import annotations

import random

__all__ = ["backoff"]


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
