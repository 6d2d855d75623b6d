"""Emulators of the IM services (one module each), for the tests, the demo and the bench: each
subclasses :class:`worker.devtools.http_server.HttpEmulator`."""
