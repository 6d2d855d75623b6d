"""A local Telegram Bot API server for the tests, the demo and the bench.

It answers ``/bot<token>/<method>`` as api.telegram.org (or a self-hosted telegram-bot-api)
does, for ``getMe``, ``getChat`` and ``sendMessage`` (method names in any case): a malformed
token is 404 Not Found, another bot's token (or a revoked one) 401 Unauthorized, an unknown
chat 400 "chat not found", a blocked bot or a kicked one 403, a group that became a supergroup
400 with ``parameters.migrate_to_chat_id``, a forum topic that does not exist 400 "message
thread not found". ``sendMessage`` text in ``parse_mode: HTML`` is parsed like Telegram's
parser (the supported tags, only ``&lt; &gt; &amp; &quot;`` and numeric entities, end tags
that match), and the parsed text must be 1-4096 UTF-16 code units, else the service's own 400
("can't parse entities: ...", "message is too long", "message text is empty").

Every accepted message is kept in :attr:`TelegramEmulator.messages` as the chat sees it
(:class:`SentMessage`: the parsed text and its entities). Faults: the base's ``fail_next``,
``drop_next`` and ``stall_next``, and :meth:`TelegramEmulator.flood_next` (429 with
``parameters.retry_after``, as Telegram's flood control answers) and
:meth:`TelegramEmulator.error_next` (any Bot API error reply).
"""

from __future__ import annotations

import json
import re
import ssl
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..http_server import EmulatedRequest, HttpEmulator, Reply

__all__ = ["HtmlError", "SentMessage", "TelegramEmulator", "parse_html"]

MAX_UNITS = 4096  # sendMessage: 1-4096 characters after entities parsing (UTF-16 units)

_PATH = re.compile(r"^/bot([^/]*)/([A-Za-z]+)$")
_TOKEN = re.compile(r"^\d+:[A-Za-z0-9_-]+$")
# https://core.telegram.org/bots/api#html-style: the tags Telegram reads
_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "span": "spoiler",  # only with class="tg-spoiler"
    "tg-spoiler": "spoiler",
    "a": "text_link",
    "tg-emoji": "custom_emoji",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
}
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9-]*)([^<>]*)>")
_ENTITY = re.compile(r"&(?:#([0-9]{1,7})|#[xX]([0-9a-fA-F]{1,6})|(lt|gt|amp|quot));")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


class HtmlError(ValueError):
    """Telegram's "can't parse entities" reason."""


def _units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def parse_html(source: str) -> tuple[str, list[tuple[str, int, int]]]:
    """The text and the entities (type, offset, length in UTF-16 units) Telegram makes of
    ``source`` in HTML parse mode; :class:`HtmlError` with Telegram's reason otherwise."""
    out: list[str] = []
    entities: list[tuple[str, int, int]] = []
    stack: list[tuple[str, int]] = []
    units = 0
    i = 0
    while i < len(source):
        ch = source[i]
        if ch == "<":
            offset = len(source[:i].encode("utf-8"))
            m = _TAG.match(source, i)
            if m is None:
                raise HtmlError(f'Unsupported start tag "" at byte offset {offset}')
            closing, name, attrs = m.group(1), m.group(2).lower(), m.group(3)
            if closing:
                if not stack:
                    raise HtmlError(f"Unexpected end tag at byte offset {offset}")
                top, start = stack.pop()
                if top != name:
                    raise HtmlError(
                        f'Unmatched end tag at byte offset {offset}, expected "</{top}>", '
                        f'found "</{name}>"'
                    )
                entities.append((_TAGS[top], start, units - start))
            else:
                if name not in _TAGS or (name == "span" and "tg-spoiler" not in attrs):
                    raise HtmlError(f'Unsupported start tag "{name}" at byte offset {offset}')
                stack.append((name, units))
            i = m.end()
            continue
        if ch == "&" and (e := _ENTITY.match(source, i)):
            dec, hexa, named = e.groups()
            ch = _NAMED[named] if named else chr(int(dec) if dec else int(hexa, 16))
            i = e.end()
        else:
            i += 1
        out.append(ch)
        units += _units(ch)
    if stack:
        raise HtmlError(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return "".join(out), entities


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A message as the chat received it."""

    message_id: int
    chat_id: str
    source: str  # the ``text`` parameter as sent
    text: str  # after entity parsing: what the reader sees
    entities: tuple[tuple[str, int, int], ...]
    params: dict[str, Any] = field(default_factory=dict)  # every other parameter

    @property
    def units(self) -> int:
        return _units(self.text)

    def entity_text(self, kind: str) -> list[str]:
        """The texts covered by entities of type ``kind`` (``bold``, ``pre``, ...)."""
        raw = self.text.encode("utf-16-le")
        return [
            raw[2 * off : 2 * (off + n)].decode("utf-16-le")
            for t, off, n in self.entities
            if t == kind
        ]


def _error(status: int, description: str, **parameters: Any) -> Reply:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return Reply(status, body)


class TelegramEmulator(HttpEmulator):
    """The Bot API of one bot (``token``) that can write to ``chats``."""

    def __init__(
        self,
        *,
        token: str,
        chats: Iterable[int | str] = (),
        ssl_context: ssl.SSLContext | None = None,
        username: str = "notifier_test_bot",
    ) -> None:
        super().__init__(ssl_context=ssl_context)
        self.token = token
        self.username = username
        self._initial_chats = frozenset(str(c) for c in chats)
        self.reset()

    def reset(self) -> None:
        """Back to the state it started in: its chats, no faults, nothing recorded (one server
        can serve many tests)."""
        with self._lock:
            self.chats: set[str] = set(self._initial_chats)  # chat ids as text
            self.topics: dict[str, set[int]] = {}  # forum chats: their message_thread_ids
            self.blocked: set[str] = set()  # private chats whose user blocked the bot
            self.kicked: set[str] = set()  # groups the bot was removed from
            self.migrated: dict[str, int] = {}  # group -> its supergroup's chat id
            self.revoked = False
            self.messages: list[SentMessage] = []
            self.requests.clear()
            self.connections = 0
        self.clear_faults()

    def start(self) -> TelegramEmulator:
        super().start()
        server = self._server
        if server is not None:  # a client that gave up (a stall test) is no server error
            report = server.handle_error

            def handle_error(request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
                    report(request, client_address)

            server.handle_error = handle_error  # type: ignore[method-assign]
        return self

    # ------------------------------------------------------------------ faults
    def error_next(
        self, status: int, description: str, *, count: int = 1, **parameters: Any
    ) -> None:
        """The next ``count`` requests get this Bot API error reply."""
        reply = _error(status, description, **parameters)
        self.fail_next(reply.status, reply.body, count=count)

    def flood_next(self, retry_after: int, *, count: int = 1) -> None:
        """Flood control: 429 "Too Many Requests: retry after N" with parameters.retry_after."""
        self.error_next(
            429,
            f"Too Many Requests: retry after {retry_after}",
            count=count,
            retry_after=retry_after,
        )

    # ------------------------------------------------------------------ the Bot API
    def _bot(self) -> dict[str, Any]:
        bot_id = int(self.token.split(":", 1)[0])
        return {"id": bot_id, "is_bot": True, "first_name": "Notifier", "username": self.username}

    def answer(self, req: EmulatedRequest) -> Reply:
        m = _PATH.match(req.path)
        if m is None or not _TOKEN.match(m.group(1)):
            return _error(404, "Not Found")
        if m.group(1) != self.token or self.revoked:
            return _error(401, "Unauthorized")
        try:
            params = self._params(req)
        except ValueError:
            return _error(400, "Bad Request: can't parse JSON object")
        method = m.group(2).lower()
        if method == "getme":
            return Reply(200, {"ok": True, "result": self._bot()})
        if method == "getchat":
            return self._chat_problem(params.get("chat_id")) or Reply(
                200, {"ok": True, "result": self._chat(str(params["chat_id"]))}
            )
        if method == "sendmessage":
            return self._send_message(params)
        return _error(404, "Not Found: method not found")

    @staticmethod
    def _params(req: EmulatedRequest) -> dict[str, Any]:
        params: dict[str, Any] = dict(req.query)
        if req.body and "json" in req.headers.get("content-type", ""):
            body = json.loads(req.body)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            params.update(body)
        return params

    def _chat(self, chat_id: str) -> dict[str, Any]:
        if chat_id.startswith("@"):
            return {"id": -1001000000001, "type": "channel", "username": chat_id[1:]}
        kind = "supergroup" if chat_id.startswith("-100") else "group"
        kind = kind if chat_id.startswith("-") else "private"
        return {"id": int(chat_id), "type": kind}

    def _chat_problem(self, chat: Any) -> Reply | None:
        if chat is None or chat == "":
            return _error(400, "Bad Request: chat_id is empty")
        chat_id = str(chat)
        if chat_id in self.migrated:
            return _error(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                migrate_to_chat_id=self.migrated[chat_id],
            )
        if chat_id in self.blocked:
            return _error(403, "Forbidden: bot was blocked by the user")
        if chat_id in self.kicked:
            return _error(403, "Forbidden: bot was kicked from the group chat")
        if chat_id not in self.chats:
            return _error(400, "Bad Request: chat not found")
        return None

    def _send_message(self, params: dict[str, Any]) -> Reply:
        problem = self._chat_problem(params.get("chat_id"))
        if problem is not None:
            return problem
        chat_id = str(params["chat_id"])
        source = params.get("text")
        if not isinstance(source, str):
            return _error(400, "Bad Request: message text is empty")
        mode = str(params.get("parse_mode") or "").lower()
        if mode not in ("", "html", "markdown", "markdownv2"):
            return _error(400, "Bad Request: unsupported parse_mode")
        thread = params.get("message_thread_id")
        if thread is not None and thread not in self.topics.get(chat_id, set()):
            return _error(400, "Bad Request: message thread not found")
        text, entities = source, list[tuple[str, int, int]]()
        if mode == "html":
            try:
                text, entities = parse_html(source)
            except HtmlError as exc:
                return _error(400, f"Bad Request: can't parse entities: {exc}")
        if not text.strip():
            return _error(400, "Bad Request: message text is empty")
        if _units(text) > MAX_UNITS:
            return _error(400, "Bad Request: message is too long")
        with self._lock:
            message = SentMessage(
                message_id=len(self.messages) + 1,
                chat_id=chat_id,
                source=source,
                text=text,
                entities=tuple(entities),
                params={k: v for k, v in params.items() if k not in ("chat_id", "text")},
            )
            self.messages.append(message)
        result = {
            "message_id": message.message_id,
            "from": self._bot(),
            "chat": self._chat(chat_id),
            "date": int(time.time()),
            "text": text,
        }
        return Reply(200, {"ok": True, "result": result})
