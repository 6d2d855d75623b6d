"""A generic webhook: one JSON POST per alert (or digest) to an endpoint of the user's own.

The body is a stable, versioned payload (``"v": 1``; new keys may be added, none removed or
changed while ``v`` is 1), encoded as compact UTF-8 JSON (Chinese as is, never ``\\uXXXX``)::

    {"v": 1, "type": "alert" | "digest", "id", "subject", "severity", "strategy", "kind",
     "text" (plain text, as in IM channels), "markdown" (CommonMark), "data", "notes", "ts",
     "produced", "truncated", "digest": null | {"count", "reason", "kinds", "strategies",
     "rows": [{"id", "ts", "time", "severity", "strategy", "kind", "subject", "data"}],
     "omitted"}}

A body never exceeds ``max_bytes`` (default 64 KiB): the free text in ``text`` and
``markdown`` is cut first (:func:`worker.content.fit`, with a visible marker), then a digest's
newest rows, then ``data`` (the whole table is still in ``text``); ``truncated`` says so.

Signing, when a ``secret`` is set (the schemes of mature senders, so receivers can reject
forgeries and replays; each retry is signed afresh with its own timestamp):

* ``signature = "notifier"`` (default), like Stripe's ``Stripe-Signature`` (HMAC-SHA256 over
  ``"<timestamp>.<body>"``, https://docs.stripe.com/webhooks#verify-manually) in GitHub's
  header format (``X-Hub-Signature-256: sha256=<hex>``)::

      X-Notifier-Timestamp: <unix seconds>
      X-Notifier-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

* ``signature = "standard"``: Standard Webhooks 1.0 (https://www.standardwebhooks.com/,
  spec/standard-webhooks.md in github.com/standard-webhooks/standard-webhooks), verifiable
  with its libraries in every language; the secret is ``whsec_<base64>``::

      webhook-id: <the event id; the same on every retry>
      webhook-timestamp: <unix seconds>
      webhook-signature: v1,<base64 HMAC-SHA256(base64-decoded secret, "<id>.<ts>.<body>")>

Custom headers (``headers = {Authorization = "Bearer ..."}`` or ``headers_file``, one
``Name: value`` per line as curl's ``-H @file``) are secrets: their values never appear in a
log line, message, repr or ``describe()``; neither does the URL's path or query.

Replies (the receiver is the user's own, so its statuses are all there is)::

    2xx                          sent
    429                          throttled (Retry-After honoured)
    408, 5xx, timeout, reset     transient (retried)
    401, 403                     configuration: the credentials (headers) or the signature
                                 secret are wrong; the channel pauses, events stay queued
    404, 410                     configuration: the URL is wrong or gone
    3xx                          configuration: redirects are not followed (they would resend
                                 the alert and its Authorization header to another address)
    413                          permanent (hint: lower max_bytes)
    other 4xx                    permanent (dead letter: the receiver refused this event)

No limit on the rate by default (``rate_per_minute = 0``): the endpoint is the user's own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from .. import __version__
from ..content import (
    SEVERITY_LABEL,
    Alert,
    Digest,
    DigestRow,
    as_markdown,
    as_text,
    digest_as_markdown,
    digest_as_text,
)
from ..errors import ConfigurationError, PermanentError, SendError
from .http import HttpChannel, HttpChannelSettings, HttpRequest, read_secret, status_error

__all__ = [
    "PAYLOAD_VERSION",
    "WebhookChannel",
    "WebhookSettings",
    "encode_payload",
    "notifier_signature",
    "standard_signature",
]

PAYLOAD_VERSION = 1
DEFAULT_MAX_BYTES = 64 * 1024
MIN_MAX_BYTES = 4096  # the subject, ids and notes of any alert fit in this

# RFC 9110 5.1: a field name is a token
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# httpx sends header values as ASCII: visible characters, spaces and tabs (RFC 9110 5.5)
_VALUE = re.compile(r"^[\x20-\x7e\t]*$")
# set by the notifier itself: a custom header may not replace them
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "x-notifier-timestamp",
        "x-notifier-signature",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    }
)
_SNIPPET_CHARS = 160  # of the receiver's reply, in error messages


# ------------------------------------------------------------------------------ signing
def notifier_signature(secret: str, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret as UTF-8, ``"<timestamp>.<body>"``)."""
    signed = str(timestamp).encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def _standard_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: ``whsec_<base64>`` (or bare base64),
    decoded; ValueError when it is not base64 (the message never repeats the secret)."""
    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            'signature = "standard" takes a whsec_<base64> secret (as Standard Webhooks '
            "libraries make: whsec_ + base64 of 24 to 64 random bytes)"
        ) from None
    if not key:
        raise ValueError('signature = "standard": the secret is empty after "whsec_"')
    return key


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` of HMAC-SHA256(decoded secret, ``"<id>.<timestamp>.<body>"``)
    (Standard Webhooks 1.0, "Signature scheme")."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_standard_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


# ----------------------------------------------------------------------------- settings
def _check_header(name: str, value: str, where: str) -> None:
    """One clear error per bad header; never repeats the value (it is a secret)."""
    if not _TOKEN.match(name):
        raise ValueError(f"{where}: {name!r} is not a valid HTTP header name")
    if name.lower() in _RESERVED:
        raise ValueError(f"{where}: {name} is set by the notifier itself; leave it out")
    if not _VALUE.match(value):
        raise ValueError(
            f"{where}: the value of {name} must be printable ASCII on one line "
            "(no line breaks or non-ASCII characters)"
        )


def _parse_header_lines(text: str, where: str) -> dict[str, SecretStr]:
    """``Name: value`` lines (blank lines and ``#`` comments skipped), as curl's
    ``-H @file``."""
    headers: dict[str, SecretStr] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, sep, value = stripped.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise ValueError(f"{where} line {number}: expected 'Name: value'")
        _check_header(name, value, f"{where} line {number}")
        if name.lower() in {n.lower() for n in headers}:
            raise ValueError(f"{where} line {number}: {name} is given twice")
        headers[name] = SecretStr(value)
    return headers


class WebhookSettings(HttpChannelSettings):
    """A ``[[channel]]`` table of ``type = "webhook"``.

    ``url`` (or ``url_file``, or the systemd credential ``webhook_<name>_url``) is required;
    ``secret`` (``secret_file``, credential ``webhook_<name>_secret``) turns signing on;
    ``headers`` / ``headers_file`` (credential ``webhook_<name>_headers``) are sent with every
    request; ``max_bytes`` bounds the body."""

    type: Literal["webhook"] = "webhook"
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    headers_file: Path | None = None
    signature: Literal["notifier", "standard"] = "notifier"
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=MIN_MAX_BYTES, le=16 * 1024 * 1024)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, SecretStr]) -> dict[str, SecretStr]:
        seen: set[str] = set()
        for name, value in v.items():
            _check_header(name, value.get_secret_value(), "headers")
            if name.lower() in seen:
                raise ValueError(f"headers: {name} is given twice")
            seen.add(name.lower())
        return v

    @model_validator(mode="after")
    def _webhook(self) -> WebhookSettings:
        if self.url is None:
            raise ValueError(
                f"channel {self.name}: no url; set url, url_file or the systemd credential "
                f"webhook_{self.name}_url"
            )
        where = "headers_file" if self.headers_file else f"credential webhook_{self.name}_headers"
        extra = read_secret(self.headers_file, f"webhook_{self.name}_headers")
        if extra is not None:
            from_file = _parse_header_lines(extra.get_secret_value(), where)
            inline = {n.lower() for n in self.headers}
            for name in from_file:
                if name.lower() in inline:
                    raise ValueError(f"{where}: {name} is also in headers; keep one")
            self.headers = {**self.headers, **from_file}
        if self.secret is not None and not self.secret.get_secret_value():
            raise ValueError("secret is empty; remove it, or give one (e.g. 32 random bytes)")
        if self.signature == "standard":
            if self.secret is None:
                raise ValueError('signature = "standard" needs a secret (whsec_<base64>)')
            _standard_key(self.secret.get_secret_value())
        return self


# ------------------------------------------------------------------------------ payload
def encode_payload(payload: Any) -> bytes:
    """Compact UTF-8 JSON, as sent (and signed)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def _alert_data(alert: Alert) -> dict[str, Any]:
    """The event's ``data`` as the strategy sent it (numbers stay numbers); the shown text
    of each value when the alert has no source event or its data is not plain JSON."""
    data = alert.source.data if alert.source is not None else None
    if data is not None:
        try:
            json.dumps(data, allow_nan=False)
        except (TypeError, ValueError):
            pass
        else:
            return dict(data)
    return dict(alert.rows)


def _digest_id(digest: Digest) -> str:
    """The same digest (the same events) has the same id, on every retry."""
    ids = "\n".join(row.event_id for row in digest.rows)
    return "digest-" + hashlib.blake2b(ids.encode(), digest_size=8).hexdigest()


def _digest_row(row: DigestRow) -> dict[str, Any]:
    return {
        "id": row.event_id,
        "ts": row.ts,
        "time": row.time,
        "severity": row.severity,
        "strategy": row.strategy,
        "kind": row.kind,
        "subject": row.subject,
        "data": dict(row.rows),
    }


_RANK = {label: i for i, label in enumerate(SEVERITY_LABEL)}


def _within(render: Callable[..., str], content: Alert | Digest, budget: int | None) -> str:
    """``render(content)`` in at most ``budget`` bytes (None: no limit; 0: empty)."""
    if budget is None:
        return render(content)
    return render(content, max_bytes=budget) if budget > 0 else ""


def _fit_texts(build: Callable[[int | None], dict[str, Any]], max_bytes: int) -> bytes | None:
    """The body of ``build(budget)`` (``budget``: the UTF-8 bytes ``text`` and ``markdown``
    may each take; None: no limit) within ``max_bytes``, with the largest budget found in a
    few proportional steps; None when even empty texts do not fit."""
    body = encode_payload(build(None))
    if len(body) <= max_bytes:
        return body
    bare = len(encode_payload(build(0)))
    if bare > max_bytes:
        return None
    room = max_bytes - bare
    budget = room // 2
    for _ in range(12):
        body = encode_payload(build(budget))
        if len(body) <= max_bytes:
            return body
        used = len(body) - bare  # JSON escapes make the texts larger than their budget
        budget = min(budget - 1, budget * room // used - 8)
        if budget <= 0:
            break
    return encode_payload(build(0))


class WebhookChannel(HttpChannel):
    """POSTs the neutral content as the documented JSON payload, signed when a secret is
    set, with the user's headers."""

    kind = "webhook"
    service = "Webhook"
    settings: WebhookSettings

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        priority: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        throttle_base_s: float = 30.0,
        retry_base_s: float = 1.0,
        retry_max_s: float = 300.0,
    ) -> None:
        super().__init__(
            settings,
            priority=priority,
            clock=clock,
            default_rate_per_minute=0,  # the user's own endpoint: no limit unless set
            throttle_base_s=throttle_base_s,
            retry_base_s=retry_base_s,
            retry_max_s=retry_max_s,
        )
        self.wall_clock = wall_clock  # the signature's timestamp (unix seconds)

    # ------------------------------------------------------------------ the payload
    def body(self, content: Alert | Digest) -> bytes:
        """The JSON body for ``content``, at most ``max_bytes``."""
        if isinstance(content, Digest):
            return self._digest_body(content)
        return self._alert_body(content)

    def _alert_body(self, alert: Alert) -> bytes:
        max_bytes = self.settings.max_bytes
        full_data = _alert_data(alert)

        def payload(budget: int | None, data: dict[str, Any]) -> dict[str, Any]:
            return {
                "v": PAYLOAD_VERSION,
                "type": "alert",
                "id": alert.event_id,
                "subject": alert.subject,
                "severity": alert.severity,
                "strategy": alert.strategy,
                "kind": alert.kind,
                "text": _within(as_text, alert, budget),
                "markdown": _within(as_markdown, alert, budget),
                "data": data,
                "notes": list(alert.notes),
                "ts": alert.ts,
                "produced": alert.produced,
                "truncated": budget is not None or data is not full_data,
                "digest": None,
            }

        body = _fit_texts(lambda b: payload(b, full_data), max_bytes)
        if body is None:  # a data table larger than max_bytes: it is still in the text
            body = _fit_texts(lambda b: payload(b, {}), max_bytes)
        if body is None:  # cannot happen above MIN_MAX_BYTES; never an error for length
            body = encode_payload({**payload(0, {}), "subject": "", "notes": []})
        return body

    def _digest_body(self, digest: Digest) -> bytes:
        max_bytes = self.settings.max_bytes
        rows = [_digest_row(row) for row in digest.rows]
        severity = max((row.severity for row in digest.rows), key=_RANK.__getitem__, default="info")

        def payload(budget: int | None, shown: int, counts: bool = True) -> dict[str, Any]:
            return {
                "v": PAYLOAD_VERSION,
                "type": "digest",
                "id": _digest_id(digest),
                "subject": digest.subject,
                "severity": severity,
                "strategy": digest.thread.strategy if digest.thread else None,
                "kind": "digest",
                "text": _within(digest_as_text, digest, budget),
                "markdown": _within(digest_as_markdown, digest, budget),
                "data": {},
                "notes": [digest.reason] if digest.reason else [],
                "ts": max((r.ts for r in digest.rows if r.ts), default=None),
                "produced": None,
                "truncated": budget is not None or shown < len(rows) or not counts,
                "digest": {
                    "count": digest.count,
                    "reason": digest.reason,
                    "kinds": dict(digest.kinds) if counts else {},
                    "strategies": dict(digest.strategies) if counts else {},
                    "rows": rows[:shown],
                    "omitted": len(rows) - shown,
                },
            }

        body = encode_payload(payload(None, len(rows)))
        if len(body) <= max_bytes:
            return body
        # the texts (what people read) keep up to half the room; the oldest rows take the rest
        texts = encode_payload([digest_as_text(digest), digest_as_markdown(digest)])
        rows_room = max_bytes - min(len(texts), max_bytes // 2)
        low, high = 0, len(rows)
        while low < high:  # the most rows that fit: binary search
            mid = (low + high + 1) // 2
            if len(encode_payload(payload(0, mid))) <= rows_room:
                low = mid
            else:
                high = mid - 1
        fitted = _fit_texts(lambda b: payload(b, low), max_bytes)
        if fitted is None:  # a digest of very many kinds and strategies: the texts say them
            fitted = _fit_texts(lambda b: payload(b, 0, counts=False), max_bytes)
        return fitted if fitted is not None else encode_payload(payload(0, 0, counts=False))

    # ------------------------------------------------------------------ the request
    def request(self, content: Alert | Digest, recipients: Sequence[str]) -> HttpRequest:
        """The POST (``recipients`` are not used: the URL is the destination)."""
        s = self.settings
        assert s.url is not None  # the settings refuse a webhook without one
        body = self.body(content)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"notifier/{__version__}",
        }
        headers.update({name: value.get_secret_value() for name, value in s.headers.items()})
        if s.secret is not None:
            secret = s.secret.get_secret_value()
            ts = int(self.wall_clock())
            if s.signature == "standard":
                msg_id = content.event_id if isinstance(content, Alert) else _digest_id(content)
                headers["webhook-id"] = msg_id
                headers["webhook-timestamp"] = str(ts)
                headers["webhook-signature"] = standard_signature(secret, msg_id, ts, body)
            else:
                headers["X-Notifier-Timestamp"] = str(ts)
                headers["X-Notifier-Signature"] = notifier_signature(secret, ts, body)
        return HttpRequest(s.url.get_secret_value(), content=body, headers=headers)

    # ------------------------------------------------------------------ the reply
    def _secrets(self) -> list[str]:
        s = self.settings
        found = [v.get_secret_value() for v in s.headers.values()]
        if s.secret is not None:
            found.append(s.secret.get_secret_value())
        if s.url is not None:
            url = s.url.get_secret_value()
            parts = urlsplit(url)
            found += [url, parts.path, parts.query, *parts.query.split("&")]
            found += [value for _, value in parse_qsl(parts.query)]
            found += [p for p in parts.path.split("/") if len(p) >= 8]
        for value in list(found):  # "Bearer <token>": the token alone, too
            found += [w for w in value.split() if len(w) >= 8]
        return sorted({v for v in found if len(v) >= 4}, key=len, reverse=True)

    def _snippet(self, response: httpx.Response) -> str:
        """The start of the receiver's reason (JSON or plain text), on one line, with any
        of the channel's secrets it echoes masked."""
        ctype = response.headers.get("content-type", "")
        if "json" not in ctype and not ctype.startswith("text/plain"):
            return ""
        text = " ".join(response.text.split())
        for secret in self._secrets():
            text = text.replace(secret, "***")
        text = "".join(c for c in text if c.isprintable())
        if len(text) > _SNIPPET_CHARS:
            text = text[:_SNIPPET_CHARS] + "…"
        return f": {text}" if text else ""

    def check(self, response: httpx.Response) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        what = f"{self.service} ({self.settings.host}) answered {response.reason_phrase or code}"
        what += self._snippet(response)
        err: SendError | None
        if 300 <= code < 400:
            err = ConfigurationError(
                what,
                code=code,
                hint="redirects are not followed (they would resend the alert and its headers "
                "elsewhere): set url to the address the receiver redirects to",
            )
        elif code in (401, 403):
            err = ConfigurationError(
                what,
                code=code,
                hint="the receiver refused the credentials: check the channel's headers "
                "(e.g. Authorization) and its secret and signature scheme",
            )
        elif code in (404, 410):
            err = ConfigurationError(what, code=code, hint="check the channel's url")
        elif code == 413:
            err = PermanentError(
                what, code=code, hint="the receiver takes less than max_bytes: lower max_bytes"
            )
        else:
            base = status_error(response, self.service)
            if base is None:  # 1xx: not a reply httpx returns
                return
            err = type(base)(what, code=code, retry_after_s=base.retry_after_s)
        raise err

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            **super().describe(),
            "signed": s.signature if s.secret is not None else "no",
            "headers": sorted(s.headers),  # names only: values are secrets
            "max_bytes": s.max_bytes,
        }
