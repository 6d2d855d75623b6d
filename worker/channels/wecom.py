"""The WeCom (企业微信) group robot channel: a robot posts each alert to its group.

Request (群机器人配置说明, https://developer.work.weixin.qq.com/document/path/91770; Apprise's
``apprise/plugins/wecombot.py`` posts the same): ``POST`` the robot's webhook address
``https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=<key>`` with JSON, either::

    {"msgtype": "markdown", "markdown": {"content": "..."}}          at most 4096 UTF-8 bytes
    {"msgtype": "text", "text": {"content": "...",                   at most 2048 UTF-8 bytes
                                 "mentioned_list": ["userid", "@all"],
                                 "mentioned_mobile_list": ["13800001111"]}}

Markdown (the default) is the neutral content's :func:`~worker.content.as_markdown`; text is
:func:`~worker.content.as_text`. Both are cut to the service's limit, the free text (or a
digest's newest rows) first, with a visible marker, so the service never refuses an alert for
its length (``40058 ... exceed max length``). There is no signing: the key in the URL is the
whole secret (the documentation: keep the webhook address private), so no message built here
holds the URL, and the service's ``errmsg`` is shown without its key, if it ever held it.

Mentions (the same page: "text/markdown content supports <@userid>"): for a ``critical`` alert
(or a digest holding one) only, the members of ``mention_users`` (userids) and
``mention_mobiles`` (mobile numbers) are @-mentioned. A markdown message can only mention by
userid (``<@userid>`` in the content), so a critical alert that must mention by mobile, or
``@all``, is sent as a text message with ``mentioned_list`` / ``mentioned_mobile_list``. Since
WeCom reads ``<@...>`` in the content of both types, every ``<@`` of the alert's own text gets
a zero-width space after its ``<`` (it reads the same and mentions nobody).

Replies: HTTP 200 with ``{"errcode": 0, "errmsg": "ok"}`` when sent; otherwise an errcode
(全局错误码, https://developer.work.weixin.qq.com/document/path/90313), classified here::

    0                  sent
    45009              throttled: api freq out of limit (a robot sends at most 20 a minute)
    45033              throttled: too many concurrent calls
    -1                 transient: system busy
    93000              configuration: invalid webhook url (a wrong key, or a removed robot)
    40008, 44004,      permanent: invalid message type, empty content, invalid parameter;
    40058, any other   this message, not the channel (dead letter)

HTTP statuses and transport failures as every HTTP channel (:mod:`worker.channels.http`).

Limits (same page, 消息发送频率限制): each robot sends at most 20 messages a minute: the
default rate (``rate_per_minute`` changes it); beyond it the worker sends digests.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
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
)
from ..errors import (
    ConfigurationError,
    PermanentError,
    SendError,
    ThrottledError,
    TransientError,
)
from .http import HttpChannel, HttpChannelSettings, HttpRequest

__all__ = [
    "DEFAULT_RATE_PER_MINUTE",
    "ERRCODES",
    "MARKDOWN_MAX_BYTES",
    "TEXT_MAX_BYTES",
    "WeComChannel",
    "WeComSettings",
]

MARKDOWN_MAX_BYTES = 4096  # markdown.content: 最长不超过4096个字节, UTF-8
TEXT_MAX_BYTES = 2048  # text.content: 最长不超过2048个字节, UTF-8
DEFAULT_RATE_PER_MINUTE = 20  # 每个机器人发送的消息不能超过20条/分钟
OFFICIAL_HOST = "qyapi.weixin.qq.com"
WEBHOOK_PATH = "/cgi-bin/webhook/send"

_HOW_TO_COPY = (
    "copy the robot's whole webhook address (group → 群机器人 → the robot → Webhook 地址: "
    f"https://{OFFICIAL_HOST}{WEBHOOK_PATH}?key=…)"
)
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # a UUID as WeCom gives it (Apprise: [a-z0-9_-]+)
# 成员UserID: 1-64 bytes of letters, digits and _-@. , starting with a letter or a digit
_USERID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_MOBILE = re.compile(r"^\+?[0-9]{5,20}$")
_ALL = "@all"
_ZWSP = "\u200b"

# errcode -> (class, what it means, how to fix it)
ERRCODES: dict[int, tuple[type[SendError], str, str | None]] = {
    -1: (TransientError, "system busy", None),
    45009: (ThrottledError, "too many messages (a robot sends at most 20 a minute)", None),
    45033: (ThrottledError, "too many concurrent calls", None),
    93000: (
        ConfigurationError,
        "invalid webhook key (a wrong key, or the robot was removed from the group)",
        f"{_HOW_TO_COPY} into the channel's url_file",
    ),
    40008: (PermanentError, "invalid message type", None),
    44004: (PermanentError, "empty content", None),
    40058: (PermanentError, "invalid parameter", None),
}


# ------------------------------------------------------------------------------ settings
class WeComSettings(HttpChannelSettings):
    """A [[channel]] table of ``type = "wecom"``: one group robot (its webhook address in
    ``url``, ``url_file`` or the systemd credential ``wecom_<name>_url``)."""

    type: Literal["wecom"]
    msgtype: Literal["markdown", "text"] = "markdown"
    mention_users: list[str] = Field(default_factory=list)  # userids, or "@all"
    mention_mobiles: list[str] = Field(default_factory=list)  # mobile numbers, or "@all"

    @model_validator(mode="before")
    @classmethod
    def _no_signing(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("secret") or data.get("secret_file")):
            raise ValueError(
                "secret: a WeCom group robot has no signing secret (DingTalk and Feishu "
                "robots have one); remove secret / secret_file: the key in url is the secret"
            )
        return data

    @field_validator("mention_users")
    @classmethod
    def _users(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for user in (u.strip() for u in v):
            if user != _ALL and not _USERID.match(user):
                raise ValueError(
                    f"{user!r} is not a WeCom userid (1-64 letters, digits and _-@. as the "
                    "admin console's 账号 shows, e.g. ZhangSan) nor @all; "
                    "use mention_mobiles for mobile numbers"
                )
            if user not in out:
                out.append(user)
        return out

    @field_validator("mention_mobiles")
    @classmethod
    def _mobiles(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for mobile in (m.strip() for m in v):
            if mobile != _ALL and not _MOBILE.match(mobile):
                raise ValueError(
                    f"{mobile!r} is not a mobile number (digits only, e.g. 13800001111) nor @all"
                )
            if mobile not in out:
                out.append(mobile)
        return out

    @model_validator(mode="after")
    def _webhook(self) -> WeComSettings:
        if self.url is None:  # (probe and send say so: the credential may come later)
            return self
        parts = urlsplit(self.url.get_secret_value())
        keys = parse_qs(parts.query).get("key", [])
        if parts.hostname == OFFICIAL_HOST and parts.path.rstrip("/") != WEBHOOK_PATH:
            raise ValueError(f"url: not a group robot's webhook address; {_HOW_TO_COPY}")
        if not keys or not keys[-1]:
            raise ValueError(f"url: it has no key=…; {_HOW_TO_COPY}")
        if not _KEY.match(keys[-1]):
            raise ValueError(f"url: the key has characters a WeCom key never has; {_HOW_TO_COPY}")
        return self

    @property
    def key(self) -> str:
        """The webhook key (a secret: never log it); empty without a URL."""
        if self.url is None:
            return ""
        keys = parse_qs(urlsplit(self.url.get_secret_value()).query).get("key", [""])
        return keys[-1]


# ----------------------------------------------------------------------------- rendering
def _defuse(text: str) -> str:
    """No ``<@...>`` of the alert's own text mentions anyone: ``<`` + zero-width space."""
    return text.replace("<@", f"<{_ZWSP}@")


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _within(render: Callable[[int], str], limit: int) -> str:
    """``render(budget)`` defused, in at most ``limit`` UTF-8 bytes: the budget shrinks by
    what defusing added until it fits (each ``<@`` costs 3 more bytes)."""
    budget = limit
    for _ in range(8):
        out = _defuse(render(budget))
        over = _size(out) - limit
        if over <= 0:
            return out
        budget = max(0, budget - over)
    return fit(out, limit)  # (not reached for any real alert)


# ------------------------------------------------------------------------------- channel
class WeComChannel(HttpChannel):
    """One WeCom group robot."""

    kind = "wecom"
    service = "WeCom"
    settings: WeComSettings

    def __init__(
        self,
        settings: WeComSettings,
        *,
        priority: int,
        clock: Callable[[], float] = time.monotonic,
        default_rate_per_minute: int = DEFAULT_RATE_PER_MINUTE,
        **delivery: float,  # throttle_base_s, retry_base_s, retry_max_s: as HttpChannel
    ) -> None:
        super().__init__(
            settings,
            priority=priority,
            clock=clock,
            default_rate_per_minute=default_rate_per_minute,
            **delivery,
        )

    def request(self, content: Alert | Digest, recipients: Sequence[str]) -> HttpRequest:
        """The robot's message (a robot posts to its own group: ``recipients``, the event's
        e-mail addresses, do not apply)."""
        s = self.settings
        if s.url is None:
            raise ConfigurationError(
                f"channel {self.name}: no webhook address",
                hint=f"give url, url_file or the systemd credential wecom_{self.name}_url",
            )
        critical = is_critical(content)
        users = s.mention_users if critical else []
        mobiles = s.mention_mobiles if critical else []
        payload: dict[str, Any]
        if s.msgtype == "text" or mobiles or _ALL in users:
            text: dict[str, Any] = {
                "content": _within(
                    lambda budget: text_of(content, max_bytes=budget), TEXT_MAX_BYTES
                )
            }
            if users:
                text["mentioned_list"] = list(users)
            if mobiles:
                text["mentioned_mobile_list"] = list(mobiles)
            payload = {"msgtype": "text", "text": text}
        else:
            tags = "".join(f"<@{user}>" for user in users)
            tail = f"\n\n{tags}" if tags else ""
            room = MARKDOWN_MAX_BYTES - _size(tail)
            body = _within(lambda budget: markdown_of(content, max_bytes=budget), room)
            payload = {"msgtype": "markdown", "markdown": {"content": body + tail}}
        return HttpRequest(s.url.get_secret_value(), json=payload)

    # ------------------------------------------------------------------ replies
    def check(self, response: httpx.Response) -> None:
        super().check(response)  # HTTP statuses, the same for every service
        try:
            body = response.json()
        except ValueError:
            body = None
        errcode = body.get("errcode") if isinstance(body, dict) else None
        if not isinstance(errcode, int) or isinstance(errcode, bool):
            raise TransientError(
                f"{self.service} ({self.settings.host}) answered HTTP {response.status_code} "
                "without an errcode (a proxy in the way?)"
            )
        if errcode == 0:
            return
        assert isinstance(body, dict)
        raise self.reply_error(errcode, body.get("errmsg"))

    def reply_error(self, errcode: int, errmsg: Any) -> SendError:
        """What a reply with a non-zero ``errcode`` means (:data:`ERRCODES`; any other code
        is about this message: permanent)."""
        cls, meaning, hint = ERRCODES.get(errcode, (PermanentError, "refused the message", None))
        said = self._errmsg(errmsg)
        what = f"{self.service}: {meaning}" + (f" [{said}]" if said else "")
        return cls(what, code=errcode, hint=hint)

    def _errmsg(self, errmsg: Any) -> str:
        """The service's own words, without its hint/ip/link tail, never the key."""
        text = " ".join(str(errmsg or "").split())
        text = re.split(r",? hint: ", text, maxsplit=1)[0].strip()
        key = self.settings.key
        if key:
            text = text.replace(key, "<key>")
        return text[:160]
