"""A local Feishu / Lark custom bot (自定义机器人) for the tests, the demo and the bench.

It answers ``POST /open-apis/bot/v2/hook/<token>`` as open.feishu.cn (and open.larksuite.com)
does for a custom bot (自定义机器人使用指南,
https://open.feishu.cn/document/client-docs/bot-v3/add-custom-bot), with a JSON
``{"code": ..., "msg": ..., "data": {}}`` (plus the redundant ``StatusCode`` /
``StatusMessage`` of a success, "冗余字段，用于兼容存量历史逻辑"), checking in this order:

* another token: ``19001 param invalid: incoming webhook access token invalid`` (HTTP 200);
* a body over 20 KB ("请求体的数据大小不能超过 20 KB") or not a JSON object:
  ``9499 Bad Request`` (HTTP 400);
* with a signing secret (签名校验): ``timestamp`` (seconds) within an hour of the bot's clock and
  ``sign`` = base64(HMAC-SHA256 keyed with ``"<timestamp>\\n<secret>"`` of the empty string),
  else ``19021 sign match fail or timestamp is not within one hour from current time``;
* more than ``per_second`` (5) messages in a second or ``per_minute`` (100) in a minute (单租户单机器人
  100 次/分钟，5 次/秒; sliding, on the injected clock): ``11232 frequency limited``;
* a missing or unknown ``msg_type``: ``19002 param invalid: msg_type``;
* ``content`` / ``card`` not shaped as the message type says: ``9499 Bad Request`` (HTTP 400);
* with custom keywords (自定义关键词), none of them in any text, title or content string:
  ``19024 Key Words Not Found``.

Every accepted message is kept in :attr:`FeishuEmulator.messages` (:class:`BotMessage`) with
its visible text and whom it @-mentions, read as Feishu reads each message type
(``<at user_id="…">`` in a text message, ``{"tag": "at", "user_id": …}`` in a post,
``<at id=…></at>`` in a card's markdown). Faults: the base's ``fail_next``, ``drop_next``,
``stall_next``, and :meth:`FeishuEmulator.error_next` (any code with HTTP 200).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..http_server import EmulatedRequest, HttpEmulator, Reply

__all__ = ["HOOK_PATH", "MAX_BODY_BYTES", "MSG", "BotMessage", "FeishuEmulator"]

HOOK_PATH = "/open-apis/bot/v2/hook/"
MAX_BODY_BYTES = 20 * 1024
MSG = {
    0: "success",
    9499: "Bad Request",
    11232: "frequency limited psm[lark.oapi.app_platform_runtime]appID[1500]",
    19001: "param invalid: incoming webhook access token invalid",
    19002: "param invalid: msg_type",
    19007: "Bot Not Enabled",
    19021: "sign match fail or timestamp is not within one hour from current time",
    19022: "Ip Not Allowed",
    19024: "Key Words Not Found",
}
_MSG_TYPES = ("text", "post", "interactive", "image", "share_chat")
_TEXT_AT = re.compile(r"<at\s+user_id\s*=\s*\"([^\"]*)\"\s*>")
_CARD_AT = re.compile(r"<at\s+id\s*=\s*([^\s>]+)\s*>\s*\\?</at>")  # (a \ is not an escape)


@dataclass(frozen=True, slots=True)
class BotMessage:
    """One message the group received: its type, its text as shown, whom it @-mentions."""

    msg_type: str
    text: str  # every text, title and content string, joined by newlines
    mentions: tuple[str, ...]  # open_ids / user_ids, "all"
    body: dict[str, Any]


def reply(code: int, msg: str | None = None, *, status: int = 200) -> Reply:
    """The service's reply with ``code`` (success has the redundant StatusCode fields too)."""
    text = MSG.get(code, "error") if msg is None else msg
    if code == 0:
        return Reply(
            status,
            {"StatusCode": 0, "StatusMessage": text, "code": 0, "data": {}, "msg": text},
        )
    return Reply(status, {"code": code, "data": {}, "msg": text})


def signature(timestamp: str, secret: str) -> str:
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


def _strings(node: Any, keys: Sequence[str]) -> Iterator[str]:
    """Every string value under one of ``keys``, anywhere in ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from _strings(value, keys)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value, keys)


Read = tuple[str, tuple[str, ...]]  # (visible text, mentions)


def _read_card(card: Any) -> Read | None:
    if not isinstance(card, dict) or not isinstance(card.get("elements"), list):
        return None
    texts = list(_strings(card, ("content",)))
    mentions = [m for t in _strings(card["elements"], ("content",)) for m in _CARD_AT.findall(t)]
    return "\n".join(texts), tuple(mentions)


def _read_post(post: Any) -> Read | None:
    if not isinstance(post, dict) or not post:
        return None
    texts: list[str] = []
    mentions: list[str] = []
    for lang in post.values():
        paragraphs = lang.get("content") if isinstance(lang, dict) else None
        if not isinstance(paragraphs, list):
            return None
        if isinstance(lang.get("title"), str):
            texts.append(lang["title"])
        for para in paragraphs:
            if not isinstance(para, list):
                return None
            for el in para:
                if not isinstance(el, dict) or "tag" not in el:
                    return None
                if el["tag"] == "text" and isinstance(el.get("text"), str):
                    texts.append(el["text"])
                elif el["tag"] == "at":
                    mentions.append(str(el.get("user_id")))
    return "\n".join(texts), tuple(mentions)


def _read(msg_type: str, body: dict[str, Any]) -> Read | None:
    """What a message shows and whom it mentions, or None when it is not shaped as its type."""
    if msg_type == "interactive":
        return _read_card(body.get("card"))
    content = body.get("content")
    if not isinstance(content, dict):
        return None
    if msg_type == "text":
        text = content.get("text")
        if not isinstance(text, str) or not text:
            return None
        return text, tuple(_TEXT_AT.findall(text))
    if msg_type == "post":
        return _read_post(content.get("post"))
    return "", ()  # image, share_chat: accepted as they are


class FeishuEmulator(HttpEmulator):
    """One custom bot whose webhook token is ``token``."""

    def __init__(
        self,
        *,
        token: str,
        secret: str | None = None,
        keywords: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        per_second: int = 5,
        per_minute: int = 100,
    ) -> None:
        super().__init__(ssl_context=ssl_context)
        self.token = token
        self.secret = secret
        self.keywords = tuple(keywords)
        self.clock = clock
        self.per_second, self.per_minute = per_second, per_minute
        self.messages: list[BotMessage] = []
        self._sent_at: deque[float] = deque()

    @property
    def hook_url(self) -> str:
        """The bot's webhook address (it holds the token)."""
        return f"{self.base_url}{HOOK_PATH}{self.token}"

    def reset(self) -> None:
        """Forget every request, message, fault and rate window (one server, many tests)."""
        self.clear_faults()
        with self._lock:
            self.requests.clear()
            self.messages.clear()
            self._sent_at.clear()
            self.connections = 0

    def error_next(self, code: int, msg: str | None = None, *, count: int = 1) -> None:
        """The next ``count`` requests get ``code`` (HTTP 200, as the service answers)."""
        r = reply(code, msg)
        self.fail_next(r.status, r.body, count=count)

    # ------------------------------------------------------------------ the service
    def answer(self, req: EmulatedRequest) -> Reply:
        if req.method != "POST" or not req.path.startswith(HOOK_PATH):
            return Reply(404, b"404 page not found")
        if req.path[len(HOOK_PATH) :].rstrip("/") != self.token:
            return reply(19001)
        if len(req.body) > MAX_BODY_BYTES:
            return reply(9499, status=400)
        try:
            body = json.loads(req.body)
        except ValueError:
            return reply(9499, status=400)
        if not isinstance(body, dict):
            return reply(9499, status=400)
        now = self.clock()
        if self.secret is not None:
            ts = str(body.get("timestamp", ""))
            fresh = ts.isdigit() and abs(now - int(ts)) <= 3600
            given = body.get("sign")
            good = isinstance(given, str) and hmac.compare_digest(given, signature(ts, self.secret))
            if not (fresh and good):
                return reply(19021)
        if not self._take_slot(now):
            return reply(11232)
        msg_type = body.get("msg_type")
        if msg_type not in _MSG_TYPES:
            return reply(19002)
        read = _read(msg_type, body)
        if read is None:
            return reply(9499, status=400)
        text, mentions = read
        if self.keywords and not any(k in text for k in self.keywords):
            return reply(19024)
        with self._lock:
            self.messages.append(BotMessage(msg_type, text, mentions, body))
        return reply(0)

    def _take_slot(self, now: float) -> bool:
        with self._lock:
            while self._sent_at and self._sent_at[0] <= now - 60:
                self._sent_at.popleft()
            last_second = sum(1 for t in self._sent_at if t > now - 1)
            if last_second >= self.per_second or len(self._sent_at) >= self.per_minute:
                return False
            self._sent_at.append(now)
            return True
