"""A throwaway certificate authority for TLS tests (trustme).

One CA per test session issues one server certificate valid for ``127.0.0.1`` and
``localhost``. The CA certificate is written to a PEM file so that a subprocess (the
``notifier run`` worker) can trust it through ``NOTIFIER_SMTP_CA_FILE``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

__all__ = ["TLSAuthority"]

SERVER_IDENTITIES = ("127.0.0.1", "localhost")


class TLSAuthority:
    """A trustme CA, its CA file on disk and a server certificate for the loopback."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert(*SERVER_IDENTITIES)
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        """A fresh server-side context presenting the loopback certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks host names."""
        return ssl.create_default_context(cafile=str(self.ca_file))
