"""The DingTalk channel (钉钉自定义机器人): a group's custom robot posts each alert to the group.

Request (DingTalk's "自定义机器人发送群消息", https://open.dingtalk.com/document/orgapp/custom-robots-send-group-messages,
and "消息类型", https://open.dingtalk.com/document/orgapp/robot-message-types-and-data-format;
the same shape as Apprise's ``apprise/plugins/dingtalk.py``): ``POST`` to the robot's Webhook
address ``https://oapi.dingtalk.com/robot/send?access_token=...``, UTF-8 JSON (DingTalk asks
for the charset in ``Content-Type``)::

    {"msgtype": "markdown", "markdown": {"title": <subject>, "text": <markdown>},
     "at": {"atMobiles": [...], "isAtAll": false}}
    {"msgtype": "text", "text": {"content": <plain text>}, "at": {...}}

``title`` is what the conversation list and the notification show; the message itself shows
``text``. A ``critical`` alert (or a digest holding one) @-mentions ``mention_mobiles`` (and
everyone with ``mention_all``); DingTalk highlights a mobile in a markdown message only when
``@<mobile>`` is also in the text, so the mentions end the text in both formats.

加签 (https://open.dingtalk.com/document/robots/customize-robot-security-settings; Apprise's
``get_signature``): with a ``secret`` (``SEC...``), the query also carries ``timestamp`` (the
wall clock in milliseconds, at most an hour from DingTalk's) and ``sign`` = base64 of
HMAC-SHA256 over ``"<timestamp>\\n<secret>"`` keyed with the secret, URL-encoded. The wall
clock is injected (``wall_clock``) so tests sign at a fixed time.

自定义关键词 (same page): a robot with keywords refuses (310000 ``keywords not in content``) a
message that holds none of them. With ``keywords`` set, the subject (the markdown title and the
first line of the text, which no size cut removes) starts with ``[<first keyword>]`` unless it
already holds one of them.

Limits: 20 messages a minute per robot, then DingTalk refuses the robot's messages for 10
minutes (130101 ``send too fast, exceed 20 times per minute``; the docs' error table says
410100 发送速度太快而限流): the default rate is 20 a minute, and a throttle reply cools the
channel down for exactly 600 s. A message is kept within :data:`MAX_BODY_BYTES` of UTF-8 JSON
(the body, so the ~20000-byte text limit holds whatever DingTalk counts): the free text (or a
digest's newest rows) is cut first with a visible marker, never a character in half.

Replies: HTTP 200 with ``{"errcode": 0, "errmsg": "ok"}``, or an errcode (the docs' table on
the send page, the security page, and what robots answer in the wild)::

    0                                   sent
    130101, 410100, 90030               throttled: 600 s (the robot is blocked for 10 minutes)
    310000                              configuration: keywords not in content, sign not match,
                                        invalid timestamp, ip X not in whitelist (a hint each)
    300001, 300005, 400101              configuration: token is not exist (url)
    400013, 400102, 400106              configuration: group dissolved, robot stopped, removed
    -1                                  transient: 系统繁忙
    400105, 430101-430104, 40035, ...   permanent: this message (unsupported, unsafe content)

A reply without an errcode is HTTP's business (:func:`~worker.channels.http.status_error`), and
a 200 without one means the URL is not DingTalk's robot API (configuration). DingTalk's errmsg
is shown, scrubbed of the token and the secret.
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
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import Field, field_validator, model_validator

from ..content import (
    Alert,
    Digest,
    fit,
    is_critical,
    markdown_of,
    text_of,
    truncated_marker,
)
from ..errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from .http import HttpChannel, HttpChannelSettings, HttpRequest, status_error

__all__ = [
    "DEFAULT_RATE_PER_MINUTE",
    "MAX_BODY_BYTES",
    "MAX_KEYWORDS",
    "THROTTLE_S",
    "DingTalkChannel",
    "DingTalkSettings",
    "classify_errcode",
]

MAX_BODY_BYTES = 20_000  # the UTF-8 JSON body, so the text stays within DingTalk's ~20000 bytes
MAX_TITLE_BYTES = 512  # the markdown title (a preview line; the subject is at most 256 chars)
DEFAULT_RATE_PER_MINUTE = 20  # "每个机器人每分钟最多发送20条" (custom robot docs)
THROTTLE_S = 600.0  # "如果超过20条，会限流10分钟"
MAX_KEYWORDS = 10  # the robot's security settings take at most 10 custom keywords
_THROTTLED = (130101, 410100, 90030)
_TOKEN = (300001, 300005, 400101)
_CONTENT_REFUSED = (400105, 430101, 430102, 430103, 430104, 40035)
_SECRET = re.compile(r"^SEC[0-9A-Za-z]+$")
_MOBILE = re.compile(r"^\+?[0-9](?:-?[0-9]){4,19}$")
_WEBHOOK = "https://oapi.dingtalk.com/robot/send?access_token=..."


class DingTalkSettings(HttpChannelSettings):
    """A ``[[channel]]`` of ``type = "dingtalk"``: the robot's Webhook address (``url``,
    ``url_file`` or the credential ``dingtalk_<name>_url``), its 加签 secret (``secret``,
    ``secret_file`` or ``dingtalk_<name>_secret``) and keywords if its security settings have
    them, the format, and whom a critical alert @-mentions."""

    type: Literal["dingtalk"]
    format: Literal["markdown", "text"] = "markdown"
    keywords: list[str] = Field(default_factory=list)
    mention_mobiles: list[str] = Field(default_factory=list)
    mention_all: bool = False

    @field_validator("keywords", mode="before")
    @classmethod
    def _one_keyword(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("mention_mobiles", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        return [m.strip() for m in v.split(",")] if isinstance(v, str) else v

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, v: list[str]) -> list[str]:
        if any(not k.strip() for k in v):
            raise ValueError("an empty keyword; give the robot's custom keywords (自定义关键词)")
        if len(v) > MAX_KEYWORDS:
            raise ValueError(f"{len(v)} keywords; a DingTalk robot has at most {MAX_KEYWORDS}")
        return v

    @field_validator("mention_mobiles")
    @classmethod
    def _mobiles(cls, v: list[str]) -> list[str]:
        for mobile in v:
            if not _MOBILE.match(mobile):
                raise ValueError(
                    f"{mobile!r} is not a mobile number; write it as 13800000000 or "
                    "+86-13800000000 (the number of the member's DingTalk account)"
                )
        return v

    @model_validator(mode="after")
    def _robot(self) -> DingTalkSettings:
        # (runs after HttpChannelSettings._secrets has read url_file and secret_file)
        if self.url is None:
            raise ValueError(
                "url: give the robot's Webhook address (url, url_file or the credential "
                f"dingtalk_{self.name}_url): {_WEBHOOK}"
            )
        query = parse_qs(urlsplit(self.url.get_secret_value()).query)
        if not any(v.strip() for v in query.get("access_token", [])):
            raise ValueError(
                f"url: no access_token in it; copy the whole Webhook address, {_WEBHOOK}"
            )
        if "sign" in query or "timestamp" in query:
            raise ValueError(
                "url: remove timestamp and sign from it; give the 加签 secret (SEC...) as secret "
                "or secret_file and each message is signed"
            )
        if self.secret is not None and not _SECRET.match(self.secret.get_secret_value()):
            raise ValueError(
                "secret: DingTalk's 加签 secret starts with SEC followed by letters and digits; "
                "copy it from the robot's security settings (安全设置 → 加签)"
            )
        return self


def _scrub(text: str, secrets: Sequence[str]) -> str:
    """DingTalk's errmsg as one short line without any of ``secrets``."""
    text = " ".join(str(text).split())[:200]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def classify_errcode(code: int, errmsg: str, *, signed: bool) -> SendError | None:
    """The error a DingTalk errcode means (None for 0). ``errmsg`` must already be safe to show;
    ``signed``: the channel has a secret (a "sign not match" then means a wrong one)."""
    if code == 0:
        return None
    if code in _THROTTLED:
        return ThrottledError(
            f"DingTalk throttled the robot: {errmsg}",
            code=code,
            retry_after_s=THROTTLE_S,
            hint="a robot may send 20 messages a minute, then DingTalk blocks it for 10 minutes",
        )
    if code == 310000:
        low = errmsg.lower()
        if "keyword" in low:
            hint = (
                "keywords: list the robot's custom keywords (安全设置 → 自定义关键词) in the "
                "channel's keywords; the title then carries the first one"
            )
        elif not signed and ("sign" in low or "timestamp" in low):
            hint = "the robot has 加签 on: set the channel's secret or secret_file (SEC...)"
        elif "sign" in low:
            hint = "secret: copy the robot's 加签 secret (SEC...) again"
        elif "timestamp" in low:
            hint = "this server's clock is more than an hour off: sync it (chrony, timesyncd)"
        elif "ip" in low.split() or "whitelist" in low:
            hint = "add this server's public IP to the robot's IP whitelist (安全设置 → IP地址段)"
        else:
            hint = "check the robot's security settings: secret (加签), keywords, IP whitelist"
        return ConfigurationError(
            f"DingTalk refused the robot's security check: {errmsg}", code=code, hint=hint
        )
    if code in _TOKEN:
        return ConfigurationError(
            f"DingTalk does not know the robot: {errmsg}",
            code=code,
            hint="url: copy the robot's whole Webhook address again (was the robot removed?)",
        )
    if code == 400013:
        return ConfigurationError(
            f"the robot's group was dissolved: {errmsg}",
            code=code,
            hint="add a robot to another group and give its Webhook address as url",
        )
    if code in (400102, 400106):
        return ConfigurationError(
            f"DingTalk cannot use the robot: {errmsg}",
            code=code,
            hint="the robot was stopped or removed: a group admin enables it or adds it again",
        )
    if code == -1:
        return TransientError(f"DingTalk is busy: {errmsg}", code=code)
    what = "refused the message" if code in _CONTENT_REFUSED else "answered an unknown errcode"
    return PermanentError(f"DingTalk {what}: {errmsg}", code=code)


def _body_size(payload: dict[str, Any]) -> int:
    """Bytes on the wire: httpx encodes JSON as UTF-8 with these separators."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return len(text.encode("utf-8"))


class DingTalkChannel(HttpChannel):
    kind = "dingtalk"
    service = "DingTalk"
    settings: DingTalkSettings

    def __init__(
        self,
        settings: DingTalkSettings,
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
            default_rate_per_minute=DEFAULT_RATE_PER_MINUTE,
            throttle_base_s=throttle_base_s,
            retry_base_s=retry_base_s,
            retry_max_s=retry_max_s,
        )
        self.settings = settings
        self.wall_clock = wall_clock  # signs: DingTalk refuses a timestamp an hour off

    # ------------------------------------------------------------------ the request
    def request(self, content: Alert | Digest, recipients: Sequence[str]) -> HttpRequest:
        """The robot's message (``recipients`` are e-mail addresses: a robot posts to its
        group, so they play no part)."""
        url = self.settings.url
        if url is None:  # (the settings refuse it; a probe says the same)
            raise ConfigurationError(f"channel {self.name}: no url", hint=f"url: {_WEBHOOK}")
        mention = is_critical(content)
        mobiles = list(self.settings.mention_mobiles) if mention else []
        at_all = mention and self.settings.mention_all
        payload = self._payload(self._with_keyword(content), mobiles=mobiles, at_all=at_all)
        # 加签 joins the token in the query (httpx's params= would replace the URL's query)
        signed = httpx.URL(url.get_secret_value()).copy_merge_params(self._signature())
        return HttpRequest(
            str(signed),
            json=payload,
            headers={"Content-Type": "application/json; charset=utf-8"},
        )

    def _with_keyword(self, content: Alert | Digest) -> Alert | Digest:
        """``content`` whose subject holds one of the robot's keywords (its first, in front,
        when the subject holds none): the subject survives every size cut."""
        keywords = self.settings.keywords
        if not keywords or any(k in content.subject for k in keywords):
            return content
        return replace(content, subject=f"[{keywords[0]}] {content.subject}")

    def _render(self, content: Alert | Digest, max_bytes: int) -> str:
        render = markdown_of if self.settings.format == "markdown" else text_of
        return render(content, max_bytes=max_bytes)

    def _payload(
        self, content: Alert | Digest, *, mobiles: Sequence[str], at_all: bool
    ) -> dict[str, Any]:
        """The message within :data:`MAX_BODY_BYTES`: the text's byte budget shrinks by what
        JSON escaping (quotes, backslashes, newlines) and the envelope add."""
        mentions = ("\n\n" + " ".join(f"@{m}" for m in mobiles)) if mobiles else ""
        fmt = self.settings.format
        title = fit(content.subject, MAX_TITLE_BYTES, truncated_marker(content.locale))

        def build(text: str) -> dict[str, Any]:
            at = {"atMobiles": list(mobiles), "isAtAll": at_all}
            if fmt == "markdown":
                return {"msgtype": fmt, "markdown": {"title": title, "text": text}, "at": at}
            return {"msgtype": fmt, "text": {"content": text}, "at": at}

        room = MAX_BODY_BYTES - _body_size(build(mentions))
        budget = room
        for _ in range(8):
            payload = build(self._render(content, max(budget, 0)) + mentions)
            excess = _body_size(payload) - MAX_BODY_BYTES
            if excess <= 0:
                return payload
            budget -= excess
        # (never reached in practice: JSON writes a character in at most 6 bytes)
        return build(self._render(content, max(room // 6, 0)) + mentions)

    def _signature(self) -> dict[str, str]:
        """``timestamp`` and ``sign`` of 加签 (none without a secret), to be URL-encoded."""
        if self.settings.secret is None:
            return {}
        secret = self.settings.secret.get_secret_value()
        timestamp = str(round(self.wall_clock() * 1000))
        mac = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256)
        return {"timestamp": timestamp, "sign": base64.b64encode(mac.digest()).decode("ascii")}

    # ------------------------------------------------------------------ the reply
    def check(self, response: httpx.Response) -> None:
        try:
            reply = response.json()
        except ValueError:
            reply = None
        errcode = reply.get("errcode") if isinstance(reply, dict) else None
        status = response.status_code
        if errcode is None or status == 429 or status >= 500:
            err = status_error(response, self.service)
            if err is not None:
                raise err
        if errcode is None:
            raise ConfigurationError(
                f"{self.service} ({self.settings.host}) answered HTTP {status} without an "
                "errcode: not DingTalk's robot API",
                hint=f"url: give the robot's Webhook address, {_WEBHOOK}",
            )
        assert isinstance(reply, dict)
        try:
            code = int(errcode)
        except (TypeError, ValueError):
            code = -2  # not a number: an unknown answer
        err = classify_errcode(code, self._safe(reply.get("errmsg", "")), signed=self.signed)
        if err is not None:
            raise err

    def _safe(self, errmsg: Any) -> str:
        s = self.settings
        secrets = [s.secret.get_secret_value() if s.secret else ""]
        if s.url is not None:
            secrets += [
                t for v in parse_qs(urlsplit(s.url.get_secret_value()).query).values() for t in v
            ]
        return _scrub(str(errmsg), secrets)

    @property
    def signed(self) -> bool:
        return self.settings.secret is not None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "format": self.settings.format, "signed": self.signed}
