"""A local receiver of the generic webhook, for the tests, the demo and the bench.

It behaves as a careful receiver would (the README's verification recipe, written here
independently of the sender's code):

* another path: 404; a method other than POST: 405;
* a required header missing or different (``headers={"Authorization": "Bearer ..."}``): 401;
* a ``Content-Type`` other than JSON: 415; a body over ``max_body`` bytes: 413;
* with a ``secret``: the signature of the scheme (``"notifier"``: ``X-Notifier-Timestamp`` and
  ``X-Notifier-Signature: sha256=<hex>`` over ``<timestamp>.<body>``; ``"standard"``: Standard
  Webhooks' ``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64>`` over
  ``<id>.<timestamp>.<body>``) checked in constant time, and the timestamp within
  ``tolerance_s`` of its clock (a replay is refused): 401 with the reason;
* a body that is not the version-1 payload (JSON object, ``v == 1``, the documented keys and
  types): 400 with the first problem;
* else 200 ``{"ok": true}``, and the payload is kept in :attr:`WebhookEmulator.received`.

Faults: the base's ``fail_next`` (any status, body and headers), ``drop_next``, ``stall_next``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

from ..http_server import EmulatedRequest, HttpEmulator, Reply

__all__ = ["PATH", "PAYLOAD_KEYS", "WebhookEmulator", "verify_notifier", "verify_standard"]

PATH = "/hooks/notifier"
# key -> the JSON types it may hold (version 1)
PAYLOAD_KEYS: dict[str, tuple[type, ...]] = {
    "v": (int,),
    "type": (str,),
    "id": (str,),
    "subject": (str,),
    "severity": (str,),
    "strategy": (str, type(None)),
    "kind": (str,),
    "text": (str,),
    "markdown": (str,),
    "data": (dict,),
    "notes": (list,),
    "ts": (int, float, type(None)),
    "produced": (str, type(None)),
    "truncated": (bool,),
    "digest": (dict, type(None)),
}
DIGEST_KEYS = ("count", "reason", "kinds", "strategies", "rows", "omitted")


class Refused(Exception):
    """Why the receiver refused a request (its reply's ``error``)."""


def _fresh(timestamp: str | None, now: float, tolerance_s: float) -> int:
    if not timestamp or not timestamp.isdigit():
        raise Refused("missing or invalid timestamp")
    ts = int(timestamp)
    if abs(now - ts) > tolerance_s:
        raise Refused("timestamp outside the tolerance (a replay?)")
    return ts


def verify_notifier(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float, tolerance_s: float = 300
) -> None:
    """The README's receiver: raise :class:`Refused` unless the request is signed."""
    ts = _fresh(headers.get("x-notifier-timestamp"), now, tolerance_s)
    signed = f"{ts}.".encode() + body
    expected = "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, headers.get("x-notifier-signature", "")):
        raise Refused("bad signature")


def verify_standard(
    secret: str, headers: Mapping[str, str], body: bytes, *, now: float, tolerance_s: float = 300
) -> None:
    """Standard Webhooks 1.0 verification (as its reference libraries do it)."""
    msg_id = headers.get("webhook-id")
    if not msg_id:
        raise Refused("missing webhook-id")
    ts = _fresh(headers.get("webhook-timestamp"), now, tolerance_s)
    text = secret.removeprefix("whsec_")
    key = base64.b64decode(text + "=" * (-len(text) % 4))
    signed = f"{msg_id}.{ts}.".encode() + body
    expected = hmac.new(key, signed, hashlib.sha256).digest()
    for entry in headers.get("webhook-signature", "").split(" "):
        version, _, sig = entry.partition(",")
        try:
            given = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            continue
        if version == "v1" and hmac.compare_digest(expected, given):
            return
    raise Refused("bad signature")


def check_payload(payload: Any) -> None:
    """Raise :class:`Refused` with the first way ``payload`` is not the version-1 payload."""
    if not isinstance(payload, dict):
        raise Refused("the body is not a JSON object")
    if payload.get("v") != 1:
        raise Refused(f"unknown payload version {payload.get('v')!r}")
    for key, types in PAYLOAD_KEYS.items():
        if key not in payload:
            raise Refused(f"missing key {key}")
        value = payload[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise Refused(f"{key}: wrong type {type(value).__name__}")
    if payload["type"] not in ("alert", "digest"):
        raise Refused(f"type: unknown {payload['type']!r}")
    if payload["severity"] not in ("info", "warning", "critical"):
        raise Refused(f"severity: unknown {payload['severity']!r}")
    digest = payload["digest"]
    if (payload["type"] == "digest") != isinstance(digest, dict):
        raise Refused("digest: must be an object exactly when type is digest")
    if isinstance(digest, dict):
        for key in DIGEST_KEYS:
            if key not in digest:
                raise Refused(f"digest: missing key {key}")


class WebhookEmulator(HttpEmulator):
    """A webhook receiver on 127.0.0.1 at :data:`PATH`."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        path: str = PATH,
        secret: str | None = None,
        scheme: Literal["notifier", "standard"] = "notifier",
        headers: Mapping[str, str] | None = None,
        tolerance_s: float = 300.0,
        max_body: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ssl_context=ssl_context)
        self.path = path
        self.secret = secret
        self.scheme = scheme
        self.required = {k.lower(): v for k, v in (headers or {}).items()}
        self.tolerance_s = tolerance_s
        self.max_body = max_body
        self.clock = clock
        self.received: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return self.base_url + self.path

    def answer(self, req: EmulatedRequest) -> Reply:
        if req.path != self.path:
            return Reply(404, {"error": "no such hook"})
        if req.method != "POST":
            return Reply(405, {"error": "POST only"}, {"Allow": "POST"})
        for name, value in self.required.items():
            if not hmac.compare_digest(req.headers.get(name, ""), value):
                return Reply(401, {"error": f"{name} missing or wrong"})
        if req.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return Reply(415, {"error": "send application/json"})
        if self.max_body is not None and len(req.body) > self.max_body:
            return Reply(413, {"error": f"body over {self.max_body} bytes"})
        try:
            if self.secret is not None:
                verify = verify_standard if self.scheme == "standard" else verify_notifier
                verify(
                    self.secret,
                    req.headers,
                    req.body,
                    now=self.clock(),
                    tolerance_s=self.tolerance_s,
                )
        except Refused as exc:
            return Reply(401, {"error": str(exc)})
        try:
            payload = json.loads(req.body.decode("utf-8"))
            check_payload(payload)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return Reply(400, {"error": "the body is not UTF-8 JSON"})
        except Refused as exc:
            return Reply(400, {"error": str(exc)})
        with self._lock:
            self.received.append(payload)
        return Reply(200, {"ok": True})
