"""notifier's producer: what a trading strategy imports to queue an alert."""

from .client import AsyncNotifier, Notifier, NotifierUnavailable
from .event import Event, InvalidEvent, parse_event
from .keys import Keys

__all__ = [
    "AsyncNotifier",
    "Event",
    "InvalidEvent",
    "Keys",
    "Notifier",
    "NotifierUnavailable",
    "parse_event",
]
