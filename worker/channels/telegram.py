"""The Telegram channel: a bot sends each alert to one chat with the Bot API's ``sendMessage``.

Request (https://core.telegram.org/bots/api#sendmessage, #making-requests): ``POST
{api_base}/bot<token>/sendMessage`` with JSON ``chat_id``, ``text`` (1-4096 characters after
entities parsing), ``parse_mode: "HTML"``, ``link_preview_options`` (and the older
``disable_web_page_preview`` that Bot API servers before 7.0 read; newer ones take
``link_preview_options`` first), ``disable_notification``, ``message_thread_id``. ``api_base``
is https://api.telegram.org or a self-hosted Bot API server (tdlib/telegram-bot-api), which
answers the same paths. The token lives in the path: no message built here ever holds a URL,
only the host; the service's own descriptions are scrubbed of the token before they are shown.

Rendering (https://core.telegram.org/bots/api#html-style): the plain text of
:func:`worker.content.as_text` (or :func:`~worker.content.digest_as_text`) with ``<``, ``>``
and ``&`` escaped, the subject and the severity in ``<b>``, the data rows in a ``<pre>``. So
the text a reader sees is exactly the neutral text, Chinese included, and its length after
Telegram's parsing is known exactly: at most :data:`MAX_UNITS` UTF-16 code units (Telegram
counts the 4096 in UTF-16 units, an emoji is two), the free text (or a digest's newest rows)
cut first with a visible marker.

Replies (https://core.telegram.org/bots/api#making-requests: ``{"ok": false, "error_code",
"description", "parameters"}``; ResponseParameters: ``retry_after``, ``migrate_to_chat_id``)::

    ok: true                                      sent
    parameters.retry_after (429 Too Many Requests) throttled for exactly that many seconds
    parameters.migrate_to_chat_id                 configuration: the group's chat_id changed
    401 Unauthorized, 404 Not Found               configuration: the token (or api_base) is wrong
    403 (bot blocked, kicked, not a member, ...)  configuration: the bot may not write there
    400 chat not found, no rights to send, ...    configuration: chat_id (or the bot's rights)
    other 400 (can't parse entities, ...)         permanent: this message, not the channel
    408, 5xx                                      transient

The Bot API's ``error_code`` is the HTTP status: 400 covers both a wrong chat and a malformed
message, and only the description tells them apart. So, as python-telegram-bot
(``telegram/request/_baserequest.py``) and aiogram 2 (``aiogram/utils/exceptions.py``, which
matches these very descriptions) do, the 400 and 403 descriptions are matched against one table
here (:data:`_CHAT_PROBLEMS`).

"chat not found" pauses the channel instead of dead-lettering the message: ``chat_id`` is the
channel's own setting, not the event's, so every event would fail the same way until someone
fixes it (or the user presses Start in the bot); dead letters would lose every alert meanwhile,
a pause keeps them queued, lets the deliverer fail over to the next channel, and says the fix.

Limits (https://core.telegram.org/bots/faq#my-bot-is-hitting-limits-how-do-i-avoid-this): about
30 messages a second overall, one a second in one chat, 20 a minute in one group: the default
rate is 20 a minute (``rate_per_minute`` changes it).
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from ..content import (
    Alert,
    Digest,
    is_critical,
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
    "DEFAULT_API_BASE",
    "MAX_UNITS",
    "TelegramChannel",
    "TelegramSettings",
    "render_html",
    "utf16_units",
]

DEFAULT_API_BASE = "https://api.telegram.org"
# sendMessage takes 1-4096 characters after entities parsing, counted in UTF-16 code units.
# The rendered text is measured exactly (it is the neutral plain text); the margin is for a
# server that counts a little differently (an older self-hosted one), never a refused alert.
TELEGRAM_MAX_UNITS = 4096
MAX_UNITS = 4000
DEFAULT_RATE_PER_MINUTE = 20  # Bot FAQ: no more than 20 messages a minute in one group

_TOKEN = re.compile(r"^\d{3,20}:[A-Za-z0-9_-]{20,100}$")  # <bot id>:<secret>, as @BotFather gives
_CHAT_ID = re.compile(r"^-?\d{1,20}$|^@[A-Za-z][A-Za-z0-9_]{3,31}$")
_BOTFATHER = "copy it again from @BotFather (/mybots, API Token)"

# (description fragment in lower case, hint): a 400/403 that is about the chat, not the message
_CHAT_PROBLEMS: tuple[tuple[str, str], ...] = (
    (
        "chat not found",
        "check chat_id: a user must press Start in the bot first, a group's id starts with -, "
        "a supergroup's or channel's with -100; getUpdates shows the ids",
    ),
    ("peer_id_invalid", "check chat_id: no such chat for this bot"),
    ("bot was blocked by the user", "the user blocked the bot: open the bot and press Restart"),
    ("bot was kicked", "the bot was removed from the chat: add it to the group again"),
    (
        "bot is not a member",
        "add the bot to the channel or group (in a channel: as an administrator that may post)",
    ),
    (
        "bot can't initiate conversation",
        "the user must open the bot and press Start before it can write to them",
    ),
    ("bot can't send messages to bots", "chat_id is a bot: use a user's, a group's or a channel's"),
    ("user is deactivated", "the user's account is deleted: use another chat_id"),
    ("group chat was deactivated", "the group is gone: use another chat_id"),
    ("not enough rights", "give the bot the right to send messages in the chat"),
    ("have no rights to send", "give the bot the right to send messages in the chat"),
    ("need administrator rights", "make the bot an administrator of the channel that may post"),
    ("chat_write_forbidden", "give the bot the right to send messages in the chat"),
    ("message thread not found", "check message_thread_id: no such topic in the chat"),
    ("topic_closed", "the topic is closed: reopen it or change message_thread_id"),
    ("topic_deleted", "the topic is deleted: change message_thread_id"),
)


def utf16_units(text: str) -> int:
    """The length Telegram counts: UTF-16 code units (characters beyond U+FFFF count two)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


# ----------------------------------------------------------------------------- rendering
def _plain(content: Alert | Digest, max_units: int) -> str:
    """The neutral plain text of ``content`` in at most ``max_units`` UTF-16 units.

    :func:`as_text` and :func:`digest_as_text` fit UTF-8 bytes; a character takes 1 to 3 bytes
    per UTF-16 unit, so the largest byte budget whose text fits lies between ``max_units`` and
    three times it: found by bisection (only for a text that does not fit as it is)."""

    def render(max_bytes: int | None) -> str:
        return text_of(content, max_bytes=max_bytes)

    whole = render(None)
    if utf16_units(whole) <= max_units:
        return whole
    low, high = max_units, min(len(whole.encode("utf-8")) - 1, 3 * max_units + 3)
    while low < high:  # a text of `low` bytes always fits: a unit is at least one byte
        mid = (low + high + 1) // 2
        if utf16_units(render(mid)) <= max_units:
            low = mid
        else:
            high = mid - 1
    return render(low)


def _rows_text(content: Alert | Digest) -> str:
    if isinstance(content, Digest):
        return ""
    return "\n".join(f"{key}: {value}" for key, value in content.rows)


def render_html(content: Alert | Digest, *, max_units: int = MAX_UNITS) -> str:
    """``content`` as Telegram HTML whose parsed text is the neutral plain text (at most
    ``max_units`` UTF-16 units): the subject and the severity in bold, the data rows in a
    ``<pre>`` block, every character of user text escaped (``<``, ``>``, ``&``)."""
    text = _plain(content, max_units)
    esc = html.escape  # quote=False: only <, > and & must be escaped in text
    head, sep, rest = text.partition("\n")
    if head != content.subject:  # cut inside the subject itself: plain text only
        return esc(text, quote=False)
    out = [f"<b>{esc(head, quote=False)}</b>", sep]
    label = content.severity_label if isinstance(content, Alert) else ""
    if label and rest.startswith(label):
        out.append(f"<b>{label}</b>")
        rest = rest[len(label) :]
    rows = _rows_text(content)
    block = f"\n\n{rows}\n\n"
    at = rest.rfind(block) if rows else -1
    if at >= 0 and "\n\n" not in rest[at + len(block) :]:  # the block before the footer
        before, after = rest[: at + 2], rest[at + len(block) - 2 :]
        out += [esc(before, quote=False), f"<pre>{esc(rows, quote=False)}</pre>"]
        out.append(esc(after, quote=False))
    else:
        out.append(esc(rest, quote=False))
    return "".join(out)


# ------------------------------------------------------------------------------ settings
class TelegramSettings(HttpChannelSettings):
    """A [[channel]] table of ``type = "telegram"``: a bot (``token``) and one chat."""

    type: Literal["telegram"]
    chat_id: str
    token: SecretStr | None = None
    token_file: Path | None = None
    api_base: str = DEFAULT_API_BASE
    disable_web_page_preview: bool = True
    disable_notification: bool = False  # info and warning alerts without sound; never critical
    message_thread_id: int | None = Field(default=None, ge=1)

    @field_validator("url", "url_file", "secret", "secret_file", mode="before")
    @classmethod
    def _not_used(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError(
                "not used by a telegram channel: give token (or token_file) and chat_id, "
                "and api_base for a self-hosted Bot API server"
            )
        return v

    @field_validator("chat_id", mode="before")
    @classmethod
    def _chat_id(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str):
            v = v.strip()
            if _CHAT_ID.match(v):
                return v
            if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{3,31}", v):
                raise ValueError(f"a channel's username starts with @: chat_id = '@{v}'")
        raise ValueError(
            "not a chat id: a number (a user's 123456789, a group's -123456789, a supergroup's "
            "or channel's -100…) or a public channel's @username; getUpdates shows the ids"
        )

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        check_url(v)
        parts = urlsplit(v)
        if parts.query or parts.fragment or re.search(r"/bot[^/]*(/|$)", parts.path):
            raise ValueError(
                "the Bot API server's address only (https://api.telegram.org, or your own "
                "server's), without /bot<token>/… or a query; the token goes in token"
            )
        return v

    @model_validator(mode="after")
    def _secrets(self) -> TelegramSettings:  # replaces the base's: no url, a token instead
        if self.token is None:
            try:
                self.token = read_secret(self.token_file, f"telegram_{self.name}_token")
            except ValueError as exc:
                raise ValueError(f"token_file: {exc}") from None
        if self.token is None:
            raise ValueError(
                "token: missing; give token, token_file or the systemd credential "
                f"telegram_{self.name}_token (the bot's token from @BotFather)"
            )
        token = self.token.get_secret_value().strip()
        token = token.removeprefix("bot") if re.match(r"^bot\d", token) else token
        if "/" in token:
            raise ValueError("token: only the token (123456789:AA…), not a URL")
        if not _TOKEN.match(token):
            raise ValueError(
                f"token: not a bot token (digits, a colon, then letters); {_BOTFATHER}"
            )
        self.token = SecretStr(token)
        return self

    @property
    def host(self) -> str:
        """The Bot API server's host (safe to show: the token is in the path)."""
        return urlsplit(self.api_base).hostname or ""

    def method_url(self, method: str) -> str:
        """``{api_base}/bot<token>/<method>``: holds the token, never log it."""
        assert self.token is not None  # (the validator makes sure)
        return f"{self.api_base}/bot{self.token.get_secret_value()}/{method}"


# ------------------------------------------------------------------------------- channel
class TelegramChannel(HttpChannel):
    """A bot that writes to one chat (a user, a group, a channel, a forum topic)."""

    kind = "telegram"
    service = "Telegram"
    settings: TelegramSettings

    def __init__(
        self,
        settings: TelegramSettings,
        *,
        priority: int,
        clock: Callable[[], float] = time.monotonic,
        default_rate_per_minute: int = DEFAULT_RATE_PER_MINUTE,
        throttle_base_s: float = 30.0,
        retry_base_s: float = 1.0,
        retry_max_s: float = 300.0,
        max_units: int = MAX_UNITS,
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
        self.max_units = min(max_units, TELEGRAM_MAX_UNITS)

    @property
    def _chat(self) -> int | str:
        chat = self.settings.chat_id
        return chat if chat.startswith("@") else int(chat)

    def request(self, content: Alert | Digest, recipients: Sequence[str]) -> HttpRequest:
        """sendMessage to the channel's chat (the event's e-mail recipients do not apply)."""
        s = self.settings
        critical = is_critical(content)
        payload: dict[str, Any] = {
            "chat_id": self._chat,
            "text": render_html(content, max_units=self.max_units),
            "parse_mode": "HTML",
            "link_preview_options": {"is_disabled": s.disable_web_page_preview},
            "disable_web_page_preview": s.disable_web_page_preview,
            "disable_notification": s.disable_notification and not critical,
        }
        if s.message_thread_id is not None:
            payload["message_thread_id"] = s.message_thread_id
        return HttpRequest(s.method_url("sendMessage"), json=payload)

    # ------------------------------------------------------------------ replies
    def _description(self, body: dict[str, Any], status: int) -> str:
        text = str(body.get("description") or f"HTTP {status}")
        token = self.settings.token.get_secret_value() if self.settings.token else ""
        if token:
            text = text.replace(token, "<token>")
        return " ".join(text.split())[:200]

    def check(self, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "ok" not in body:  # not the Bot API (a proxy's page)
            err = status_error(response, self.service)
            if err is not None:
                raise err
            raise ConfigurationError(
                f"{self.service} ({self.settings.host}) answered HTTP {response.status_code} "
                "without the Bot API's JSON reply",
                hint="check api_base: it must be a Bot API server",
            )
        if body["ok"] is True:
            return
        raise self.reply_error(body, response)

    def reply_error(self, body: dict[str, Any], response: httpx.Response) -> SendError:
        """What a Bot API reply with ``ok: false`` means."""
        status = response.status_code
        code = body.get("error_code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else status
        desc = self._description(body, status)
        what = f"{self.service} ({self.settings.host}): {desc}"
        params = body.get("parameters")
        params = params if isinstance(params, dict) else {}
        retry_after = params.get("retry_after")
        if isinstance(retry_after, int | float) and not isinstance(retry_after, bool):
            return ThrottledError(what, code=code, retry_after_s=max(0.0, float(retry_after)))
        new_chat = params.get("migrate_to_chat_id")
        if isinstance(new_chat, int) and not isinstance(new_chat, bool):
            return ConfigurationError(
                f"{self.service}: the group became a supergroup, its chat_id is now {new_chat}",
                code=code,
                hint=f"set chat_id = {new_chat} in channel {self.name}",
            )
        if code == 429:
            err = status_error(response, self.service)
            retry = err.retry_after_s if err is not None else None
            return ThrottledError(what, code=code, retry_after_s=retry)
        if code == 401:
            return ConfigurationError(
                what, code=code, hint=f"the bot token was refused (revoked?): {_BOTFATHER}"
            )
        if code == 404:
            return ConfigurationError(
                what,
                code=code,
                hint=f"a malformed token or an api_base without the Bot API; {_BOTFATHER}",
            )
        if code in (400, 403):
            lowered = desc.lower()
            for fragment, hint in _CHAT_PROBLEMS:
                if fragment in lowered:
                    return ConfigurationError(what, code=code, hint=hint)
            if code == 403:
                return ConfigurationError(
                    what, code=code, hint=f"the bot may not write to chat {self.settings.chat_id}"
                )
            return PermanentError(what, code=code)
        if code == 408 or code >= 500:
            return TransientError(what, code=code)
        return PermanentError(what, code=code)

    # ------------------------------------------------------------------ probe
    async def _call(self, method: str, payload: dict[str, Any]) -> None:
        try:
            response = await self.client.post(self.settings.method_url(method), json=payload)
        except httpx.HTTPError as exc:
            raise self.classify(exc) from None
        self.check(response)

    async def probe(self) -> None:
        """``getMe`` (is the token good?) then ``getChat`` (may the bot see the chat?): two
        harmless calls that send nothing; a wrong token or chat_id raises ConfigurationError."""
        await self._call("getMe", {})
        await self._call("getChat", {"chat_id": self._chat})
