"""Channels: the kinds of destination an alert can go to (see :mod:`worker.channels.base`)."""

from .base import Channel, Health, Receipt, State
from .email import EmailChannel

__all__ = ["Channel", "EmailChannel", "Health", "Receipt", "State"]
