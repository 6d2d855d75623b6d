"""SMTP accounts in priority order (the primary, then failover accounts) and their state.

An account is *ok*, *throttled* (the provider said "too fast"/quota: cool down, from
``THROTTLE_BASE_S`` doubling), *down* (cannot connect or the connection broke: cool down with the retry back-off,
``RETRY_BASE_S`` doubling, at most 30 s) or *paused* (a configuration error: login refused, TLS failure; see
:class:`worker.mailer.Mailer`). New sends go to the first account that is available; when a
cool-down or pause ends, the next send tries the account again, so traffic returns to the
primary by itself once it recovers.
"""

from __future__ import annotations

import logging
import time
from email.utils import parseaddr
from typing import Any

from .errors import ConfigurationError, SendError, ThrottledError, TransientError
from .mailer import Mailer
from .retry import Cooldown
from .settings import Settings, SmtpAccount

__all__ = ["Account"]

logger = logging.getLogger(__name__)

DOWN_BASE_S = 1.0  # first cool-down step (or RETRY_BASE_S when smaller)
DOWN_MAX_S = 30.0  # probe a down server at least this often: alerts cannot wait long


class Account:
    def __init__(self, settings: SmtpAccount, priority: int, *, delivery: Settings) -> None:
        self.settings = settings
        self.delivery = delivery  # the back-off settings, shared by every account
        self.priority = priority
        self.name = settings.smtp_account_name
        self.mailer = Mailer(settings, lanes=delivery.concurrency)
        self.per_minute = settings.smtp_rate_per_minute or 0
        self.window_s = settings.smtp_rate_window_s
        self.sender = settings.mail_from or ""
        self.from_address = parseaddr(self.sender)[1]
        self.state = "ok"
        self.reason = ""
        # throttled or down; the module's clock, read at each call (tests fake it)
        self._cooldown = Cooldown(lambda: time.monotonic())

    # ------------------------------------------------------------------ state
    @property
    def paused(self) -> bool:
        return self.mailer.paused

    def available(self, now: float | None = None) -> bool:
        """May a send be tried on this account now (a probe when a pause just ended)?"""
        now = time.monotonic() if now is None else now
        if self.mailer.paused:
            return self.mailer.pause_remaining() == 0.0
        return now >= self._cooldown.until

    def retry_at(self) -> float:
        """Monotonic time when this account may be tried again."""
        if self.mailer.paused:
            return time.monotonic() + self.mailer.pause_remaining()
        return self._cooldown.until

    def failed(self, err: SendError) -> None:
        """Record a failed send (or login) on this account."""
        if isinstance(err, ConfigurationError):
            self.mailer.pause(err)
            self._set("paused", str(err))
            return
        if isinstance(err, ThrottledError):
            delay = self._cooldown.trip(base=self.delivery.throttle_base_s,
                                        cap=max(self.delivery.retry_max_s,
                                                self.delivery.throttle_base_s))  # fmt: skip
            self._set("throttled", str(err) if delay is None
                      else f"{err} (cooling down {delay:.0f} s)")  # fmt: skip
        elif isinstance(err, TransientError) and err.code is None:
            # no reply at all: cannot connect, disconnected, timed out -> the account is down
            delay = self._cooldown.trip(base=min(DOWN_BASE_S, self.delivery.retry_base_s),
                                        cap=min(DOWN_MAX_S, self.delivery.retry_max_s))  # fmt: skip
            if delay is not None:
                self._set("down", f"{err} (retrying in {delay:.1f} s)")

    def succeeded(self) -> bool:
        """Record a successful send (or login); True when the account was paused."""
        was_paused = self.mailer.paused
        if self.state != "ok" or was_paused:
            logger.warning("SMTP account %s works again (was %s)", self.name, self.state)
        self.mailer.resume()
        self._cooldown.reset()
        self.state, self.reason = "ok", ""
        return was_paused

    def _set(self, state: str, reason: str) -> None:
        if state != self.state:
            logger.warning("SMTP account %s is %s: %s", self.name, state, reason)
        self.state, self.reason = state, reason

    def describe(self) -> dict[str, Any]:
        left = max(0.0, self.retry_at() - time.monotonic())
        return {
            "state": self.state, "reason": self.reason, "retry_in_s": round(left, 1),
            "host": self.settings.smtp_host, "rate_per_minute": self.per_minute,
            "connections": self.mailer.open_connections,
        }  # fmt: skip
