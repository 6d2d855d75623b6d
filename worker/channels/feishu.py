"""The Feishu / Lark channel: a custom bot (自定义机器人) posts each alert to its group.

Request (自定义机器人使用指南, https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot;
Lark's custom bots are the same API): ``POST`` JSON to the bot's webhook ``https://open.feishu.cn/open-apis/bot/v2/hook/<token>`` (Lark:
``open.larksuite.com``) with ``msg_type`` and the message:

* ``interactive`` (the default): a card (``card``: ``header`` with the subject as
  ``plain_text`` and a colour ``template`` per severity, one ``markdown`` element with the text,
  the data rows, the produced time and the event id, from :func:`worker.content.as_markdown`);
* ``post``: rich text (``content.post.<zh_cn|en_us>``: ``title`` and paragraphs of ``text``
  elements, from :func:`worker.content.as_text`);
* ``text``: ``content.text``, the neutral plain text.

Signing (签名校验): with ``secret``, the body also carries ``timestamp`` (unix seconds, as a
string; within an hour of Feishu's clock) and ``sign`` = base64(HMAC-SHA256 keyed with
``"<timestamp>\\n<secret>"`` of the empty string) — the guide's Java/Go/Python samples; Apprise's
plugin (caronc/apprise, ``apprise/plugins/NotifyFeishu.py``) sends unsigned text only. The
timestamp comes from the injected ``wall_clock``.

Custom keywords (自定义关键词, at most 10 a bot): a message without one of them is refused
(19024); when ``keywords`` is set and the rendered message holds none, the first goes before
the subject (``[告警] ...``), which is never cut. @mentions: a ``critical`` alert (or a digest
holding one) @-mentions ``mention_ids`` (open_ids ``ou_…`` or user_ids: a custom bot cannot @ by
e-mail or mobile) and everyone with ``mention_all``: ``<at id=…></at>`` in a card's markdown,
``<at user_id="…"></at>`` in text, ``{"tag": "at", "user_id": …}`` in a post. An ``<at`` in the
alert's own text gets a zero-width space after its ``<``, so a strategy's text never mentions.

Limits (same guide, 注意事项): "单租户单机器人 100 次/分钟，5 次/秒" — the default rate is 100 a minute
(``rate_per_minute`` changes it); the 5 a second is left to Feishu's 11232 reply, after which the
channel cools down from 2 s (doubling). "请求体的数据大小不能超过 20 KB": the whole JSON body (as
httpx sends it: UTF-8, compact) stays within :data:`MAX_BODY_BYTES`, the free text (or a digest's
newest rows) cut first with a visible marker.

Replies: HTTP 200 with ``{"code", "msg", "data"}`` (older bots: ``StatusCode`` /
``StatusMessage``; ``code`` wins when both are there). 19021, 19022, 19024, 9499 Bad Request and
11232 are in the guide; 19001, 19002, 19007 and 9499 "too many request" are replies seen from
real bots (and kept as examples by other clients)::

    0                                      sent
    19001 incoming webhook token invalid   configuration: url (the bot was removed?)
    19002 param invalid                    permanent: this request is wrong
    19007 Bot Not Enabled                  configuration: the bot is disabled in the group
    19021 sign match fail / timestamp      configuration: secret, or this server's clock
    19022 Ip Not Allowed                   configuration: the bot's IP whitelist
    19024 Key Words Not Found              configuration: keywords
    11232 frequency limited                throttled (the guide: 100/min, 5/s per bot)
    9499 too many request                  throttled (seen with HTTP 200 from busy bots)
    9499 Bad Request (HTTP 400)            permanent: malformed or over 20 KB
    99991400 (HTTP 429)                    throttled, for x-ogw-ratelimit-reset seconds
                                           (https://open.feishu.cn/document/server-docs/
                                           api-call-guide/frequency-control)
    other codes                            transient (retried, then dead-lettered with it)

9499 is both "Bad Request" (the guide) and "too many request" (what busy bots answer): only
its ``msg`` tells them apart, so that one code's message is read (:data:`_TOO_MANY`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from ..content import (
    Alert,
    Digest,
    escape_markdown,
    is_critical,
    markdown_of,
    text_of,
)
from ..errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from .http import (
    HttpChannel,
    HttpChannelSettings,
    HttpRequest,
    check_url,
    read_secret,
    status_error,
)

__all__ = [
    "DEFAULT_RATE_PER_MINUTE",
    "HEADER_TEMPLATE",
    "MAX_BODY_BYTES",
    "FeishuChannel",
    "FeishuSettings",
    "sign",
]

# "请求体的数据大小不能超过 20 KB": kept under 20 000 bytes, whether the K is 1000 or 1024.
MAX_BODY_BYTES = 20_000
DEFAULT_RATE_PER_MINUTE = 100  # "单租户单机器人 100 次/分钟，5 次/秒"
THROTTLE_BASE_S = 2.0  # the 5-a-second window is 1 s: a first cool-down of up to 2 s, doubling
MAX_KEYWORDS = 10  # "最多可以同时设置 10 个关键词"
# card header colours (飞书卡片 标题 template): one per severity
HEADER_TEMPLATE = {"info": "blue", "warning": "orange", "critical": "red"}
HOOK_PATH = "/open-apis/bot/v2/hook/"
_HOOK = re.compile(r"^/open-apis/bot/v2/hook/[A-Za-z0-9_-]+/?$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MOBILE = re.compile(r"^\+?(86)?-?1\d{10}$")
_AT = re.compile(r"<(?=\s*at\b)", re.IGNORECASE)
_TOO_MANY = re.compile(r"too many|frequency|rate limit", re.IGNORECASE)
_THROTTLED = (11232, 99991400, 230020)
_WEBHOOK = "the bot's webhook address (群设置 → 群机器人 → the bot → webhook 地址)"


def sign(timestamp: int, secret: str) -> str:
    """Feishu's signature of ``timestamp`` (unix seconds): base64(HMAC-SHA256 keyed with
    ``"<timestamp>\\n<secret>"`` of the empty string)."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def body_size(payload: Any) -> int:
    """The bytes of ``payload`` as httpx sends JSON (UTF-8, compact, not ASCII-escaped)."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return len(text.encode("utf-8"))


# ------------------------------------------------------------------------------ settings
class FeishuSettings(HttpChannelSettings):
    """A [[channel]] table of ``type = "feishu"``: one custom bot of a Feishu or Lark group."""

    type: Literal["feishu"]
    msg_type: Literal["interactive", "post", "text"] = "interactive"
    keywords: list[str] = Field(default_factory=list)
    mention_ids: list[str] = Field(default_factory=list)
    mention_all: bool = False

    @field_validator("keywords", mode="before")
    @classmethod
    def _keywords(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            if any(not isinstance(k, str) or not k.strip() for k in v):
                raise ValueError("an empty keyword: give the bot's custom keywords (自定义关键词)")
            if len(v) > MAX_KEYWORDS:
                raise ValueError(f"a bot has at most {MAX_KEYWORDS} custom keywords")
            v = [k.strip() for k in v]
        return v

    @field_validator("mention_ids")
    @classmethod
    def _mention_ids(cls, v: list[str]) -> list[str]:
        out = [i.strip() for i in v]
        for i in out:
            if i == "all":
                raise ValueError("to @ everyone, set mention_all = true")
            if "@" in i or _MOBILE.match(i) or not _ID.match(i):
                raise ValueError(
                    f"{i!r} is not an open_id (ou_…) or user_id: a custom bot can @ members "
                    "only by open_id or user_id, not by e-mail or mobile"
                )
        return out

    @model_validator(mode="after")
    def _secrets(self) -> FeishuSettings:  # replaces the base's: one line naming the key
        if self.url is None:
            try:
                self.url = read_secret(self.url_file, f"feishu_{self.name}_url")
            except ValueError as exc:
                raise ValueError(f"url_file: {exc}") from None
        if self.url is None:
            raise ValueError(
                "url: missing; give url, url_file or the systemd credential "
                f"feishu_{self.name}_url: {_WEBHOOK}, "
                "https://open.feishu.cn/open-apis/bot/v2/hook/<token>"
            )
        url = self.url.get_secret_value().strip()
        try:
            check_url(url)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        parts = urlsplit(url)
        if parts.query and re.search(r"(^|&)(sign|timestamp)=", parts.query):
            raise ValueError(
                "url: Feishu takes timestamp and sign in the body, not the URL: give the "
                "bot's signing key (签名校验) as secret and the address without ?…"
            )
        if parts.path.startswith("/open-apis/bot/hook/"):
            raise ValueError(
                "url: a v1 webhook (…/bot/hook/…) of an old bot; add a custom bot again and "
                "use its v2 address (/open-apis/bot/v2/hook/<token>)"
            )
        if parts.query or parts.fragment or not _HOOK.match(parts.path):
            raise ValueError(
                f"url: not a custom bot's webhook: {_WEBHOOK} ends in "
                "/open-apis/bot/v2/hook/<token>, with nothing after it"
            )
        self.url = SecretStr(url)
        if self.secret is None:
            try:
                self.secret = read_secret(self.secret_file, f"feishu_{self.name}_secret")
            except ValueError as exc:
                raise ValueError(f"secret_file: {exc}") from None
        if self.secret is not None:
            secret = self.secret.get_secret_value().strip()
            if not secret or any(ch.isspace() for ch in secret):
                raise ValueError(
                    "secret: the bot's signing key (签名校验) is one word without spaces; "
                    "copy it again from the bot's security settings"
                )
            self.secret = SecretStr(secret)
        return self


# ----------------------------------------------------------------------------- rendering
def _defuse(text: str) -> str:
    """``text`` with a zero-width space after the ``<`` of anything that reads as ``<at``."""
    return _AT.sub("<\u200b", text) if "<" in text else text


def _defused(content: Alert | Digest) -> Alert | Digest:
    """The content without @-mention tags in its own text."""
    d = _defuse

    def rows(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        return tuple((d(k), d(v)) for k, v in pairs)

    if isinstance(content, Alert):
        return replace(
            content,
            subject=d(content.subject),
            text=d(content.text),
            rows=rows(content.rows),
            notes=tuple(d(n) for n in content.notes),
        )
    return replace(
        content,
        subject=d(content.subject),
        rows=tuple(
            replace(r, subject=d(r.subject), text=d(r.text), rows=rows(r.rows))
            for r in content.rows
        ),
    )


def _template(content: Alert | Digest) -> str:
    """The header colour: the alert's severity, or a digest's worst."""
    if isinstance(content, Alert):
        return HEADER_TEMPLATE[content.severity]
    severities = {row.severity for row in content.rows}
    worst = next((s for s in ("critical", "warning") if s in severities), "info")
    return HEADER_TEMPLATE[worst]


def _markdown(content: Alert | Digest, max_bytes: int | None) -> str:
    """The content's markdown without its first block (the subject, shown in the header)."""
    md = markdown_of(content, max_bytes=max_bytes)
    bold = f"**{escape_markdown(content.subject.strip(), line_start=False)}**\n\n"
    return md.removeprefix(bold)


# ------------------------------------------------------------------------------- channel
class FeishuChannel(HttpChannel):
    """A custom bot that posts to its Feishu (or Lark) group."""

    kind = "feishu"
    service = "Feishu"
    settings: FeishuSettings

    def __init__(
        self,
        settings: FeishuSettings,
        *,
        priority: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        default_rate_per_minute: int = DEFAULT_RATE_PER_MINUTE,
        throttle_base_s: float = THROTTLE_BASE_S,
        retry_base_s: float = 1.0,
        retry_max_s: float = 300.0,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        super().__init__(
            settings,
            priority=priority,
            clock=clock,
            default_rate_per_minute=default_rate_per_minute,
            throttle_base_s=throttle_base_s,
            retry_base_s=retry_base_s,
            retry_max_s=retry_max_s,
        )
        self.wall_clock = wall_clock  # unix seconds for the signature (clock is monotonic)
        self.max_body_bytes = min(max_body_bytes, MAX_BODY_BYTES)

    # ------------------------------------------------------------------ the request
    @property
    def _url(self) -> str:
        assert self.settings.url is not None  # (the settings make sure)
        return self.settings.url.get_secret_value()

    def _signed(self, message: dict[str, Any]) -> dict[str, Any]:
        """``message`` with ``timestamp`` and ``sign`` first when the bot checks signatures."""
        if self.settings.secret is None:
            return message
        ts = int(self.wall_clock())
        signature = sign(ts, self.settings.secret.get_secret_value())
        return {"timestamp": str(ts), "sign": signature, **message}

    def _title(self, subject: str, rendered: str) -> str:
        """The subject, with the first keyword before it when the message holds none."""
        keywords = self.settings.keywords
        if keywords and not any(k in subject or k in rendered for k in keywords):
            return f"[{keywords[0]}] {subject}"
        return subject

    def _mentions(self, content: Alert | Digest) -> list[str]:
        if not is_critical(content):
            return []
        return (["all"] if self.settings.mention_all else []) + self.settings.mention_ids

    def _message(self, content: Alert | Digest, max_bytes: int | None) -> dict[str, Any]:
        """The message (without signature) with the text cut to ``max_bytes``."""
        mentions = self._mentions(content)
        subject = content.subject.strip()
        if self.settings.msg_type == "interactive":
            md = _markdown(content, max_bytes)
            if mentions:
                md += "\n\n" + " ".join(f"<at id={i}></at>" for i in mentions)
            header = {
                "title": {"tag": "plain_text", "content": self._title(subject, md)},
                "template": _template(content),
            }
            card = {
                "config": {"wide_screen_mode": True},
                "header": header,
                "elements": [{"tag": "markdown", "content": md}],
            }
            return {"msg_type": "interactive", "card": card}
        text = text_of(content, max_bytes=max_bytes)
        if self.settings.msg_type == "post":
            rest = text.removeprefix(content.subject + "\n")
            paragraphs: list[list[dict[str, str]]] = [
                [{"tag": "text", "text": block}] for block in rest.split("\n\n") if block
            ]
            if mentions:
                paragraphs.append([{"tag": "at", "user_id": i} for i in mentions])
            lang = "zh_cn" if content.locale == "zh" else "en_us"
            post = {lang: {"title": self._title(subject, rest), "content": paragraphs}}
            return {"msg_type": "post", "content": {"post": post}}
        titled = self._title(subject, text)
        if titled != subject:
            text = f"[{self.settings.keywords[0]}] {text}"
        if mentions:
            text += "\n" + " ".join(
                '<at user_id="all">所有人</at>' if i == "all" else f'<at user_id="{i}"></at>'
                for i in mentions
            )
        return {"msg_type": "text", "content": {"text": text}}

    def payload(self, content: Alert | Digest) -> dict[str, Any]:
        """The request body within :attr:`max_body_bytes` as sent: all of it when it fits,
        else with the text cut to the largest budget whose whole body fits (JSON escaping and
        markdown escapes make the body up to 4 times the text: the budget is scaled by how far
        the last body was from the limit, bisected when that does not narrow it; within 1 %)."""
        content = _defused(content)
        limit = self.max_body_bytes

        def render(budget: int | None) -> tuple[dict[str, Any], int]:
            payload = self._signed(self._message(content, budget))
            return payload, body_size(payload)

        payload, size = render(None)
        if size <= limit:
            return payload
        best: dict[str, Any] | None = None
        low, high = 0, limit  # a budget known to fit (or 0), one known not to
        budget = limit  # the text alone is never more than the whole body
        for _ in range(24):  # (in practice 2 to 5 renders)
            payload, size = render(budget)
            if size <= limit:
                best, low = payload, budget
                if limit - size <= limit // 100:
                    break
            else:
                high = budget
            if high - low <= 1:
                break
            scaled = int(budget * limit / size) if size else high  # the body grows ~linearly
            budget = scaled if low < scaled < high else (low + high) // 2
        if best is None:
            payload, size = render(0)
            if size > limit:  # the subject and the rows alone: never sent to fail
                raise PermanentError(
                    f"{self.service}: the alert does not fit in {limit} bytes even without its text"
                )
            best = payload
        return best

    def request(self, content: Alert | Digest, recipients: Sequence[str]) -> HttpRequest:
        """The message for the bot's group (the event's e-mail recipients do not apply)."""
        return HttpRequest(self._url, json=self.payload(content))

    # ------------------------------------------------------------------ replies
    def _scrub(self, text: str) -> str:
        """The service's message on one line, without the URL, token or secret."""
        s = self.settings
        url = self._url
        token = url.rstrip("/").rsplit("/", 1)[-1]
        for secret, name in ((url, "<url>"), (token, "<token>")):
            text = text.replace(secret, name)
        if s.secret is not None:
            text = text.replace(s.secret.get_secret_value(), "<secret>")
        return " ".join(text.split())[:200]

    def check(self, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = None
        code: Any = None
        msg: Any = ""
        if isinstance(body, dict):
            if isinstance(body.get("code"), int):
                code, msg = body["code"], body.get("msg")
            elif isinstance(body.get("StatusCode"), int):
                code, msg = body["StatusCode"], body.get("StatusMessage")
        if isinstance(code, bool) or code is None:  # not Feishu's reply (a proxy's page)
            err = status_error(response, self.service)
            if isinstance(err, ConfigurationError):
                raise ConfigurationError(err.message, code=err.code, hint=f"check url: {_WEBHOOK}")
            if err is not None:
                raise err
            raise ConfigurationError(
                f"{self.service} ({self.settings.host}) answered HTTP {response.status_code} "
                "without Feishu's JSON reply",
                hint=f"check url: {_WEBHOOK}",
            )
        if code == 0:
            err = status_error(response, self.service)
            if err is not None:
                raise err
            return
        raise self.reply_error(code, str(msg or ""), response)

    def reply_error(self, code: int, msg: str, response: httpx.Response) -> SendError:
        """What a reply with a non-zero ``code`` means."""
        what = f"{self.service} ({self.settings.host}): {self._scrub(msg) or 'error'}"
        reset = response.headers.get("x-ogw-ratelimit-reset")
        retry_after: float | None = None
        if reset:
            try:
                retry_after = max(0.0, float(reset))
            except ValueError:
                retry_after = None
        if retry_after is None:
            status = status_error(response, self.service)
            retry_after = status.retry_after_s if status is not None else None
        if (
            code in _THROTTLED
            or response.status_code == 429
            or (code == 9499 and _TOO_MANY.search(msg))
        ):
            return ThrottledError(what, code=code, retry_after_s=retry_after)
        hint = self._hint(code)
        if hint is not None:
            return ConfigurationError(what, code=code, hint=hint)
        if code in (9499, 19002):  # a request Feishu cannot read: sending it again won't help
            return PermanentError(what, code=code)
        return TransientError(what, code=code, retry_after_s=retry_after)

    def _hint(self, code: int) -> str | None:
        """How to fix a configuration error (None: not one)."""
        s = self.settings
        if code == 19001:
            return f"check url: {_WEBHOOK}; the bot may have been removed from the group"
        if code == 19007:
            return "enable the bot again in the group's settings (群机器人)"
        if code == 19021:
            if s.secret is None:
                return (
                    "the bot checks signatures (签名校验): set secret (or secret_file) in "
                    f"channel {self.name} to its signing key"
                )
            return (
                f"check secret in channel {self.name} (the bot's 签名校验 key) and this "
                "server's clock (the timestamp must be within an hour: run NTP)"
            )
        if code == 19022:
            return "add this server's public IP to the bot's IP whitelist (IP 白名单)"
        if code == 19024:
            if s.keywords:
                return (
                    f"none of keywords in channel {self.name} is one of the bot's custom "
                    "keywords (自定义关键词): copy one of them"
                )
            return (
                f'the bot has custom keywords (自定义关键词): set keywords = ["..."] in '
                f"channel {self.name} to one of them"
            )
        return None

    # ------------------------------------------------------------------ probe
    async def probe(self) -> None:
        """A signed request without a message: Feishu checks the token and the signature,
        then refuses it for the missing ``msg_type`` (19002 or 9499) and posts nothing. A
        wrong url or secret raises ConfigurationError."""
        await super().probe()
        try:
            response = await self.client.post(self._url, json=self._signed({}))
        except httpx.HTTPError as exc:
            raise self.classify(exc) from None
        try:
            self.check(response)
        except PermanentError:
            return  # the token and the signature passed
        except ConfigurationError as exc:
            if exc.code != 19024:  # (a keyword check before the msg_type check says nothing)
                raise
