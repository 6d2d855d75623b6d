"""Throwaway local servers for ``notifier demo``, ``notifier bench`` and the tests:
a private ``redis-server`` on a free loopback port, an in-process SMTP server, a private
Postfix ``smtpd`` and a latency proxy. All of them are :class:`LocalServer` s."""

from __future__ import annotations

import socket
from types import TracebackType
from typing import Any, Self

__all__ = ["LocalServer", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalServer:
    """``start()``/``stop()`` plus ``with server:`` (started on entry, stopped on exit)."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()  # what did start (a set of servers half up) is stopped
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
