"""The exceptions of the worker, one tree (each channel classifies its own failures: SMTP's in
mailer.py, through :meth:`worker.channels.base.Channel.classify`)::

NotifierError
 ├── SettingsError             a setting is missing or wrong (settings.py)
 └── SendError                 one delivery attempt failed; .code (the reply code, if any),
      │                        .message, .hint (how to fix it, shown with the message),
      │                        .retry_after_s (when the service said to come back)
      ├── TransientError       connect errors, timeouts, disconnects, 4xx, 552 -> retry
      ├── ThrottledError       the provider says too fast / quota -> longer back-off
      ├── PermanentError       other 5xx (mailbox unavailable, spam) -> dead letter now
      └── ConfigurationError   auth rejected, TLS/certificate failure -> pause, keep events
"""

from __future__ import annotations

from typing import ClassVar, Literal

__all__ = [
    "Category",
    "ConfigurationError",
    "NotifierError",
    "PermanentError",
    "SendError",
    "ThrottledError",
    "TransientError",
]

Category = Literal["transient", "throttled", "permanent", "configuration"]


class NotifierError(Exception):
    """Base of every notifier exception."""


class SendError(NotifierError):
    category: ClassVar[Category]

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        hint: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint
        # the service said when to come back (HTTP Retry-After, Telegram's retry_after)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        text = f"{self.code} {self.message}" if self.code else self.message
        return f"{text} ({self.hint})" if self.hint else text


class TransientError(SendError):
    category = "transient"


class ThrottledError(SendError):
    category = "throttled"


class PermanentError(SendError):
    category = "permanent"


class ConfigurationError(SendError):
    category = "configuration"
