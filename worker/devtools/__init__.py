"""Throwaway local servers for ``notifier demo``, ``notifier bench`` and the tests:
a private ``redis-server`` on a free loopback port and an in-process SMTP sink."""
