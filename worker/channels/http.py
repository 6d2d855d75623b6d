"""What every HTTP channel shares (WeCom, DingTalk, Feishu, Telegram, webhooks): one
``httpx.AsyncClient`` per channel (keep-alive, HTTP/2 where the service speaks it, explicit
timeouts, its own SSL context for a private CA), secrets read from files or systemd
credentials, and the classification of HTTP failures.

A service module subclasses :class:`HttpChannel` with its settings model (a subclass of
:class:`HttpChannelSettings`) and implements :meth:`HttpChannel.request` (the content as the
service's request) and :meth:`HttpChannel.check` (the service's reply: its own error codes
become transient / throttled / permanent / configuration errors).

Transport failures and HTTP statuses, the same for every service::

    timeout, connection refused/reset, protocol error      transient (the channel is down)
    408, 5xx                                               transient
    429                                                    throttled (Retry-After honoured)
    401, 403, 404                                          configuration (pause, keep events)
    other 4xx                                              permanent (dead letter)

Secrets (webhook keys, tokens) live in URLs: no message, log line or exception built here
ever contains a URL, only the channel's name and the service's host.
"""

from __future__ import annotations

import email.utils
import ssl
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ..content import Alert, Digest
from ..errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from ..settings import read_secret
from .base import Channel, Health, Receipt

__all__ = [
    "HttpChannel",
    "HttpChannelSettings",
    "HttpRequest",
    "read_secret",
    "status_error",
]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_url(url: str) -> str:
    """An https URL, or http to a loopback host (tests, a local gateway); else ValueError
    (that never repeats the URL: it may hold a key)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in _LOOPBACK:
        return url
    if parts.scheme == "http":
        raise ValueError(
            f"http:// is accepted only for loopback hosts; use https:// for {parts.hostname}"
        )
    raise ValueError("not an https:// URL")


class HttpChannelSettings(BaseModel):
    """The [[channel]] table keys every HTTP channel has."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    type: str
    url: SecretStr | None = None
    url_file: Path | None = None
    secret: SecretStr | None = None
    secret_file: Path | None = None
    rate_per_minute: int | None = Field(default=None, ge=0)
    rate_window_s: float = Field(default=60.0, gt=0, le=3600)
    ca_file: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    http2: bool = True

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            try:
                ssl.create_default_context(cafile=str(v))
            except (OSError, ssl.SSLError):
                raise ValueError(f"{v}: no such file or no PEM certificate in it") from None
        return v

    @model_validator(mode="after")
    def _secrets(self) -> HttpChannelSettings:
        if self.url is None:
            self.url = read_secret(self.url_file, f"{self.type}_{self.name}_url")
        if self.url is not None:
            check_url(self.url.get_secret_value())
        if self.secret is None:
            self.secret = read_secret(self.secret_file, f"{self.type}_{self.name}_secret")
        return self

    @property
    def host(self) -> str:
        """The service's host (safe to show: never the path or query, which hold keys)."""
        if self.url is None:
            return ""
        return urlsplit(self.url.get_secret_value()).hostname or ""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request to the service (``url`` may hold a key: never log it)."""

    url: str
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    method: Literal["POST", "GET"] = "POST"
    content: bytes | None = None  # the exact body instead of ``json`` (a signed body)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def status_error(response: httpx.Response, service: str) -> SendError | None:
    """The error an HTTP status means (None for 2xx/3xx), the same for every service."""
    code = response.status_code
    if code < 400:
        return None
    what = f"{service} answered HTTP {code}"
    if code == 429:
        return ThrottledError(what, code=code, retry_after_s=_retry_after(response))
    if code == 408 or code >= 500:
        return TransientError(what, code=code, retry_after_s=_retry_after(response))
    if code in (401, 403, 404):
        return ConfigurationError(what, code=code, hint="check the channel's URL, key or token")
    return PermanentError(what, code=code)


class HttpChannel(Channel):
    """A channel that delivers with HTTP requests to one service."""

    service: str = "the service"  # for messages: "DingTalk", "WeCom", ...

    def __init__(
        self,
        settings: HttpChannelSettings,
        *,
        priority: int,
        clock: Callable[[], float] = time.monotonic,
        default_rate_per_minute: int = 20,
        throttle_base_s: float = 30.0,
        retry_base_s: float = 1.0,
        retry_max_s: float = 300.0,
    ) -> None:
        health = Health(
            settings.name,
            clock=clock,
            throttle_base_s=throttle_base_s,
            throttle_cap_s=max(retry_max_s, throttle_base_s),
            down_base_s=min(1.0, retry_base_s),
            down_cap_s=min(30.0, retry_max_s),
        )
        rate = settings.rate_per_minute
        super().__init__(
            settings.name,
            priority=priority,
            health=health,
            per_minute=default_rate_per_minute if rate is None else rate,
            window_s=settings.rate_window_s,
        )
        self.settings = settings
        self.client = self._client()

    def _client(self) -> httpx.AsyncClient:
        s = self.settings
        verify: ssl.SSLContext | bool = True
        if s.ca_file is not None:  # a context of its own: trust_env would pick SSL_CERT_FILE
            verify = ssl.create_default_context(cafile=str(s.ca_file))
        return httpx.AsyncClient(
            http2=s.http2,
            timeout=httpx.Timeout(s.timeout_s),
            limits=httpx.Limits(max_keepalive_connections=8, keepalive_expiry=60.0),
            verify=verify,
            trust_env=False,
            follow_redirects=False,
        )

    # ------------------------------------------------------------------ a service provides
    @abstractmethod
    def request(self, content: Alert | Digest, recipients: Sequence[str]) -> HttpRequest:
        """The content (rendered within the service's size limit) as its request."""

    def check(self, response: httpx.Response) -> None:
        """Raise the SendError the reply means; by default its HTTP status alone."""
        err = status_error(response, self.service)
        if err is not None:
            raise err

    # ------------------------------------------------------------------ the channel
    async def send(self, lane: int, content: Alert | Digest, recipients: Sequence[str]) -> Receipt:
        req = self.request(content, recipients)
        t0 = time.perf_counter()
        try:
            # params are added to the URL's own query (which may hold the key): httpx's
            # params= would replace it
            url = httpx.URL(req.url).copy_merge_params(dict(req.params))
            response = await self.client.request(
                req.method,
                url,
                json=req.json,
                content=req.content,
                headers=dict(req.headers),
            )
        except httpx.HTTPError as exc:
            raise self.classify(exc) from None
        self.check(response)
        return Receipt(
            channel=self.name,
            mode=response.http_version.lower(),
            send_s=time.perf_counter() - t0,
            via_failover=self.priority > 0,
            subject=content.subject,
        )

    def classify(self, exc: BaseException) -> SendError:
        if isinstance(exc, SendError):
            return exc
        host = self.settings.host
        if isinstance(exc, httpx.TimeoutException):
            return TransientError(f"{self.service} ({host}) did not answer in time")
        if isinstance(exc, httpx.ConnectError):
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE" in str(exc):
                return ConfigurationError(
                    f"{self.service} ({host}): TLS certificate not trusted",
                    hint="give the service's CA in the channel's ca_file",
                )
            return TransientError(f"cannot connect to {self.service} ({host})")
        if isinstance(exc, httpx.TransportError):  # reset, protocol error, closed early
            return TransientError(f"{self.service} ({host}): {type(exc).__name__}")
        return TransientError(f"{self.service} ({host}): {type(exc).__name__}")

    async def warm_up(self) -> list[SendError]:
        """Open the connection now (at start, as e-mail does): a ``HEAD /`` to the service's
        host, whatever it answers; no key or token goes with it. The first alert then costs
        one round trip, not a TCP and TLS handshake too."""
        url = self.settings.url.get_secret_value() if self.settings.url else None
        url = url or getattr(self.settings, "api_base", None)  # (Telegram: its API base)
        if not url:
            return []
        parts = httpx.URL(url)
        try:
            await self.client.head(str(parts.copy_with(path="/", query=None, fragment=None)))
        except httpx.HTTPError as exc:
            return [self.classify(exc)]
        return []

    async def probe(self) -> None:
        """No harmless call exists for a webhook: a configured URL is all there is to check."""
        if self.settings.url is None:
            raise ConfigurationError(f"channel {self.name}: no url (url, url_file or credential)")

    async def close(self) -> None:
        await self.client.aclose()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "host": self.settings.host}
