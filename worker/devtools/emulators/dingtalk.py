"""A DingTalk custom robot (钉钉自定义机器人) for the tests, the demo and the bench.

It checks a request as ``https://oapi.dingtalk.com/robot/send`` does and answers like it, HTTP
200 with ``{"errcode": ..., "errmsg": ...}`` (the errcodes and errmsgs of DingTalk's docs, see
:mod:`worker.channels.dingtalk`), in this order:

* path ``/robot/send`` (else HTTP 404) and ``access_token`` (else 300005 ``token is not exist``);
* 加签, when the robot has a ``secret``: ``timestamp`` and ``sign`` (else 310000
  ``sign not match``), ``timestamp`` within an hour of the emulator's ``clock`` (else 310000
  ``invalid timestamp``) and ``sign`` = base64 HMAC-SHA256 of
  ``"<timestamp>\\n<secret>"`` (else 310000 ``sign not match``), decoded from the query as
  DingTalk does (an unescaped ``+`` arrives as a space and does not match);
* the JSON: a ``msgtype`` it knows (else 400105), ``text.content`` or ``markdown.title`` and
  ``markdown.text`` non-empty strings (else 40035), at most :data:`MAX_BODY_BYTES` bytes (DingTalk
  does not document its reply to a longer message: the emulator answers 460101
  ``message too long`` so that a test notices);
* ``keywords``: one of them in the text (or the markdown title), else 310000
  ``keywords not in content``;
* the rate: more than ``rate_per_minute`` messages in 60 s block the robot for ``throttle_s``
  (130101 ``send too fast, exceed 20 times per minute`` meanwhile).

Accepted messages are counted (``accepted``) and, for each, the mobiles it @-mentions in a way
DingTalk shows (``mentioned``: in ``at.atMobiles`` and, in markdown, as ``@<mobile>`` in the
text). ``fail_next_errcode(code)`` queues one of DingTalk's error replies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..http_server import EmulatedRequest, HttpEmulator, Reply

__all__ = ["ERRMSG", "MAX_BODY_BYTES", "DingTalkEmulator"]

MAX_BODY_BYTES = 20_000
TIMESTAMP_SKEW_S = 3600.0  # "timestamp 与请求调用时间误差不能超过 1 小时"
MSGTYPES = ("text", "markdown", "link", "actionCard", "feedCard")

ERRMSG = {
    0: "ok",
    -1: "系统繁忙",
    130101: "send too fast, exceed 20 times per minute",
    300001: "token is not exist",
    300005: "token is not exist",
    310000: "keywords not in content",
    400013: "群已被解散",
    400101: "access_token不存在",
    400102: "机器人已停用",
    400105: "不支持的消息类型",
    400106: "机器人不存在",
    410100: "发送速度太快而限流",
    430101: "含有不安全的外链",
    430102: "含有不合适的文本",
    430103: "含有不合适的图片",
    430104: "含有不合适的内容",
    40035: "缺少参数 json",
    460101: "message too long",
}


def _error(code: int, errmsg: str | None = None) -> Reply:
    return Reply(200, {"errcode": code, "errmsg": errmsg or ERRMSG.get(code, "error")})


class DingTalkEmulator(HttpEmulator):
    """One robot: its ``access_token``, optional 加签 ``secret`` and ``keywords``."""

    def __init__(
        self,
        *,
        access_token: str,
        secret: str | None = None,
        keywords: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        rate_per_minute: int | None = 20,
        throttle_s: float = 600.0,
    ) -> None:
        super().__init__(ssl_context=ssl_context)
        self.access_token = access_token
        self.secret = secret
        self.keywords = tuple(keywords)
        self.clock = clock
        self.rate_per_minute = rate_per_minute
        self.throttle_s = throttle_s
        self.accepted = 0
        self.mentioned: list[list[str]] = []
        self._sent_at: deque[float] = deque()
        self._blocked_until = 0.0

    @property
    def webhook_url(self) -> str:
        """The robot's Webhook address (holds the token)."""
        return f"{self.base_url}/robot/send?access_token={self.access_token}"

    def fail_next_errcode(self, code: int, errmsg: str | None = None, *, count: int = 1) -> None:
        """The next ``count`` requests get DingTalk's error ``code`` (HTTP 200)."""
        reply = _error(code, errmsg)
        self.fail_next(reply.status, reply.body, count=count)

    def reset(self) -> None:
        """Forget the requests, connections, faults, counts and the rate window (a server
        shared by several tests)."""
        self.clear_faults()
        with self._lock:
            self.requests.clear()
            self.connections = 0
            self.accepted = 0
            self.mentioned.clear()
            self._sent_at.clear()
            self._blocked_until = 0.0

    # ------------------------------------------------------------------ the robot
    def answer(self, req: EmulatedRequest) -> Reply:
        if req.method != "POST" or req.path != "/robot/send":
            return Reply(404, b"Not Found")
        if req.query.get("access_token") != self.access_token:
            return _error(300005)
        if self.secret is not None:
            refused = self._check_sign(req.query)
            if refused is not None:
                return refused
        try:
            message = req.json
        except ValueError:
            return _error(40035)
        if not isinstance(message, dict) or message.get("msgtype") not in MSGTYPES:
            return _error(400105)
        text = self._text(message)
        if text is None:
            return _error(40035, "缺少参数 content")
        if len(req.body) > MAX_BODY_BYTES:
            return _error(460101)
        if self.keywords and not any(k in text for k in self.keywords):
            return _error(310000, "keywords not in content")
        with self._lock:
            if not self._take_rate():
                return _error(130101)
            self.accepted += 1
            self.mentioned.append(self._mentions(message))
        return _error(0)

    def _check_sign(self, query: dict[str, str]) -> Reply | None:
        assert self.secret is not None
        timestamp, sign = query.get("timestamp", ""), query.get("sign", "")
        if not timestamp or not sign:
            return _error(310000, "sign not match")
        if not timestamp.isdigit() or abs(int(timestamp) / 1000 - self.clock()) > TIMESTAMP_SKEW_S:
            return _error(310000, "invalid timestamp")
        key = self.secret.encode()
        mac = hmac.new(key, f"{timestamp}\n{self.secret}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(base64.b64encode(mac).decode(), sign):
            return _error(310000, "sign not match")
        return None

    @staticmethod
    def _text(message: dict[str, Any]) -> str | None:
        """What the keyword check reads (None when the message lacks its text)."""
        kind = message["msgtype"]
        part = message.get(kind)
        if not isinstance(part, dict):
            return None
        if kind == "text":
            content = part.get("content")
            return content if isinstance(content, str) and content else None
        if kind == "markdown":
            title, text = part.get("title"), part.get("text")
            ok = isinstance(title, str) and title and isinstance(text, str) and text
            return f"{title}\n{text}" if ok else None
        return " ".join(str(v) for v in part.values() if isinstance(v, str))

    @staticmethod
    def _mentions(message: dict[str, Any]) -> list[str]:
        at = message.get("at")
        mobiles = at.get("atMobiles") if isinstance(at, dict) else None
        if not isinstance(mobiles, list):
            return []
        if message["msgtype"] == "markdown":
            text = message["markdown"]["text"]
            return [m for m in mobiles if f"@{m}" in text]
        return [str(m) for m in mobiles]

    def _take_rate(self) -> bool:
        """One more message now, within the robot's rate? (called with the lock held)"""
        now = self.clock()
        if now < self._blocked_until:
            return False
        if self.rate_per_minute is None:
            return True
        while self._sent_at and self._sent_at[0] <= now - 60.0:
            self._sent_at.popleft()
        if len(self._sent_at) >= self.rate_per_minute:
            self._blocked_until = now + self.throttle_s
            return False
        self._sent_at.append(now)
        return True
