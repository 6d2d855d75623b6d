"""A local WeCom (企业微信) group robot for the tests, the demo and the bench.

It answers ``POST /cgi-bin/webhook/send?key=<key>`` as qyapi.weixin.qq.com does for a group
robot (群机器人配置说明, https://developer.work.weixin.qq.com/document/path/91770; error codes:
全局错误码, https://developer.work.weixin.qq.com/document/path/90313), always with HTTP 200 and a
JSON ``{"errcode": ..., "errmsg": ...}``:

* another key (or none): ``93000 invalid webhook url``;
* a body that is not JSON: ``40058`` (``Warning: wrong json format.``);
* a ``msgtype`` other than ``text`` / ``markdown``: ``40008 invalid message type``;
* an empty ``content``: ``44004 empty content``;
* ``text.content`` over 2048 UTF-8 bytes, ``markdown.content`` over 4096:
  ``40058 <msgtype>.content exceed max length <n>``;
* more than 20 messages in a minute (sliding, on an injected clock): ``45009 api freq out of
  limit``.

Every accepted message is kept in :attr:`WeComEmulator.messages` (:class:`RobotMessage`) with
the group members it mentions as WeCom would: ``mentioned_list`` / ``mentioned_mobile_list`` of
a text message and every ``<@userid>`` in the content of either type. Faults: the base's
``fail_next``, ``drop_next``, ``stall_next``, and :meth:`WeComEmulator.error_next` (any errcode
with HTTP 200, as the service answers).
"""

from __future__ import annotations

import json
import re
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..http_server import EmulatedRequest, HttpEmulator, Reply

__all__ = ["ERRMSG", "LIMITS", "PATH", "RobotMessage", "WeComEmulator"]

PATH = "/cgi-bin/webhook/send"
LIMITS = {"text": 2048, "markdown": 4096}  # content, UTF-8 bytes
ERRMSG = {
    0: "ok",
    -1: "system busy",
    40008: "invalid message type",
    40058: "invalid Request Parameter",
    44004: "empty content",
    45009: "api freq out of limit",
    45033: "api concurrent out of limit",  # (接口并发调用超过限制; our English words)
    93000: "invalid webhook url",
}
_MENTION = re.compile(r"<@([^<>\s]+)>")


@dataclass(frozen=True, slots=True)
class RobotMessage:
    """One message the group received: its type, content and the members it mentions."""

    msgtype: str
    content: str
    mentioned: tuple[str, ...]  # userids (and "@all")
    mentioned_mobiles: tuple[str, ...]


def _reply(errcode: int, detail: str = "") -> Reply:
    text = ERRMSG.get(errcode, "error")
    if detail:
        text = f"{detail}. {text}"
    if errcode:  # the real service appends a hint, the caller's address and a help link
        text += (
            ", hint: [1700000000_11_ab12cd], from ip: 127.0.0.1, more info at "
            f"https://open.work.weixin.qq.com/devtool/query?e={errcode}"
        )
    return Reply(200, {"errcode": errcode, "errmsg": text})


class WeComEmulator(HttpEmulator):
    """One group robot whose webhook key is ``key``."""

    def __init__(
        self,
        *,
        key: str,
        ssl_context: ssl.SSLContext | None = None,
        per_minute: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ssl_context=ssl_context)
        self.key = key
        self.per_minute = per_minute  # 0: no limit
        self.clock = clock
        self.messages: list[RobotMessage] = []
        self._sent_at: deque[float] = deque()

    @property
    def webhook_url(self) -> str:
        """The robot's webhook address, as the group's robot settings show it."""
        return f"{self.base_url}{PATH}?key={self.key}"

    def reset(self) -> None:
        """Forget every request, message, queued fault, connection count and the rate window
        (a test that shares one robot starts from a clean one)."""
        self.clear_faults()
        with self._lock:
            self.requests.clear()
            self.messages.clear()
            self._sent_at.clear()
            self.connections = 0

    def error_next(self, errcode: int, count: int = 1) -> None:
        """The next ``count`` sends get ``errcode`` (HTTP 200), as WeCom answers them."""
        reply = _reply(errcode)
        self.fail_next(reply.status, reply.body, count=count)

    # ------------------------------------------------------------------ the service
    def answer(self, req: EmulatedRequest) -> Reply:
        if req.path != PATH or req.method != "POST":
            return Reply(404, b"")
        if req.query.get("key") != self.key:
            return _reply(93000)
        try:
            body = json.loads(req.body)
        except ValueError:
            return _reply(40058, "Warning: wrong json format")
        if not isinstance(body, dict):
            return _reply(40058, "Warning: wrong json format")
        msgtype = body.get("msgtype")
        if msgtype not in LIMITS:
            return _reply(40008)
        part = body.get(msgtype)
        content = part.get("content") if isinstance(part, dict) else None
        if not isinstance(content, str) or not content:
            return _reply(44004)
        if len(content.encode("utf-8")) > LIMITS[msgtype]:
            return _reply(40058, f"{msgtype}.content exceed max length {LIMITS[msgtype]}")
        if not self._admit():
            return _reply(45009)
        assert isinstance(part, dict)
        mentioned = list(_MENTION.findall(content))
        mobiles: list[str] = []
        if msgtype == "text":
            mentioned += _strings(part.get("mentioned_list"))
            mobiles = _strings(part.get("mentioned_mobile_list"))
        with self._lock:
            self.messages.append(
                RobotMessage(
                    msgtype=msgtype,
                    content=content,
                    mentioned=tuple(mentioned),
                    mentioned_mobiles=tuple(mobiles),
                )
            )
        return _reply(0)

    def _admit(self) -> bool:
        """At most ``per_minute`` messages in any 60 s (群机器人: 20 条/分钟)."""
        if not self.per_minute:
            return True
        now = self.clock()
        with self._lock:
            while self._sent_at and self._sent_at[0] <= now - 60.0:
                self._sent_at.popleft()
            if len(self._sent_at) >= self.per_minute:
                return False
            self._sent_at.append(now)
            return True


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []
