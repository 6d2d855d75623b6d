"""The aiosmtpd test server (recording, fault injection, TLS, AUTH, PIPELINING) lives in the
package so that ``notifier demo`` and ``notifier bench`` can use it; re-exported here."""

from worker.devtools.smtp_server import Received, SMTPTestServer, Stage, TLSMode

__all__ = ["Received", "SMTPTestServer", "Stage", "TLSMode"]
