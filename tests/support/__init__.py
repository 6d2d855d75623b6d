"""Shared test infrastructure: private servers the tests start and own.

- :mod:`tests.support.redis_server`: a ``redis-server`` subprocess on a free port.
- :mod:`tests.support.smtp_server`: an aiosmtpd server with recording and fault injection.
- :mod:`tests.support.tls`: a trustme CA and loopback server certificate.

The pytest fixtures built on them live in ``tests/conftest.py``.
"""

from tests.support.redis_server import RedisServer, RedisServerError, free_port
from tests.support.smtp_server import Received, SMTPTestServer
from tests.support.tls import TLSAuthority

__all__ = [
    "Received",
    "RedisServer",
    "RedisServerError",
    "SMTPTestServer",
    "TLSAuthority",
    "free_port",
]
