"""notifier's producer: what a trading strategy imports to queue an alert."""

from .client import (
    AsyncNotifier,
    Notifier,
    NotifierNotReplicated,
    NotifierRefused,
    NotifierTimeout,
    NotifierUnavailable,
)
from .event import Event, InvalidEvent, parse_event
from .keepalive import AsyncKeepAlive, KeepAlive
from .keys import Keys
from .redis_errors import explain_redis_error, is_write_refused

__all__ = [
    "AsyncKeepAlive",
    "AsyncNotifier",
    "Event",
    "InvalidEvent",
    "KeepAlive",
    "Keys",
    "Notifier",
    "NotifierNotReplicated",
    "NotifierRefused",
    "NotifierTimeout",
    "NotifierUnavailable",
    "explain_redis_error",
    "is_write_refused",
    "parse_event",
]
