"""notifier's worker: Redis queue in, e-mail out. The daemon is ``notifier run``."""

__version__ = "0.1.0"
