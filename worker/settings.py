"""Every setting of the worker: one pydantic-settings model, from the environment or ``.env``.

Names are the field names upper-cased with the prefix ``NOTIFIER_`` (``NOTIFIER_SMTP_HOST``).
``SMTP_PROVIDER`` fills host, port and TLS mode from a preset; explicit values win.
The password comes from ``SMTP_PASSWORD``, ``SMTP_PASSWORD_FILE`` or systemd's
``$CREDENTIALS_DIRECTORY/smtp_password`` (``LoadCredential=``), in that order of preference.

The env file (:func:`find_env_file`): ``--env-file PATH``, else ``NOTIFIER_ENV_FILE``
(``/dev/null``: the environment only), else ``./.env``, else the installer's
``/etc/notifier/notifier.env`` when it exists. Variables in the environment win over the
file. A ``NOTIFIER_*`` name that is not a setting is reported with the closest one
(:func:`unknown_variables`).
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from producer.event import check_addresses, valid_address
from producer.redis_errors import redacted_url

from .errors import NotifierError
from .smtp_fast import default_helo_name, helo_name_problem

if TYPE_CHECKING:
    from .channels.http import HttpChannelSettings
    from .routing import Routes
    from .sessions import SessionBook
    from .watch import WatchConfig

__all__ = [
    "PROVIDERS",
    "Provider",
    "Settings",
    "SettingsError",
    "find_env_file",
    "load_settings",
    "read_toml",
    "redacted_url",
    "unknown_variables",
]

PREFIX = "NOTIFIER_"
# The installer's env file, read when neither --env-file, NOTIFIER_ENV_FILE nor ./.env says
# otherwise (a module attribute: tests point it elsewhere).
SYSTEM_ENV_FILE = Path("/etc/notifier/notifier.env")
ENV_FILE_VARIABLE = "NOTIFIER_ENV_FILE"
# NOTIFIER_* names that are ours but not settings; NOTIFIER_PRODUCER_* is the producer's.
NOT_SETTINGS = frozenset({ENV_FILE_VARIABLE})
NOT_SETTINGS_PREFIXES = ("NOTIFIER_PRODUCER_",)
# Providers whose servers refuse (or rewrite) a From address other than the logged-in account.
STRICT_SENDER_PROVIDERS = ("qq", "163", "126", "exmail", "gmail")

TlsMode = Literal["ssl", "starttls", "none"]


@dataclass(frozen=True, slots=True)
class Provider:
    """A preset: where the provider's submission server is and what it allows."""

    host: str
    port: int
    tls: TlsMode
    per_minute: int  # a conservative published or observed limit for personal accounts
    note: str


_AUTH_CODE = "password = authorization code (授权码), enable SMTP in settings"
PROVIDERS: dict[str, Provider] = {
    "qq": Provider(
        host="smtp.qq.com",
        port=465,
        tls="ssl",
        per_minute=20,
        note="password = 16-character authorization code (授权码), enable SMTP in settings",
    ),
    "163": Provider(host="smtp.163.com", port=465, tls="ssl", per_minute=15, note=_AUTH_CODE),
    "126": Provider(host="smtp.126.com", port=465, tls="ssl", per_minute=15, note=_AUTH_CODE),
    "exmail": Provider(
        host="smtp.exmail.qq.com", port=465, tls="ssl", per_minute=60, note="Tencent business mail"
    ),
    "gmail": Provider(
        host="smtp.gmail.com",
        port=465,
        tls="ssl",
        per_minute=20,
        note="password = Google app password",
    ),
    "outlook": Provider(
        host="smtp.office365.com",
        port=587,
        tls="starttls",
        per_minute=30,
        note="Microsoft 365 / Outlook.com",
    ),
}


class SettingsError(NotifierError, ValueError):
    """A setting is missing or wrong; the message names it and says how to fix it."""


# Between addresses: commas and semicolons, also the full-width ，； and the enumeration comma 、
# that Chinese input methods type, line breaks; and spaces (see split_addresses).
_SEPARATORS = ",;，；、\n\r"
_PLAIN_ADDRESS_CHAR = re.compile(r"[A-Za-z0-9@._+-]")


def split_addresses(value: Any) -> Any:
    """``a@x.cn，b@x.cn; 量化 提醒 <c@x.cn> d@x.cn`` -> the four addresses.

    Separators are commas, semicolons (ASCII or full-width), ``、``, line breaks and spaces. An
    entry with ``<...>`` is one address with a display name, spaces and all; the name is
    dropped (mail goes to the address). Quotes keep a comma in a name (``"Doe, J" <j@x.cn>``).
    """
    if not isinstance(value, str):
        return value
    chunks: list[str] = []
    buf: list[str] = []
    quoted = angle = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        elif ch in "<>" and not quoted:
            angle = ch == "<"
        if ch in _SEPARATORS and not quoted and not angle:
            chunks.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    chunks.append("".join(buf))
    out: list[str] = []
    for chunk in (c.strip() for c in chunks):
        if "<" in chunk:
            out.append(parseaddr(chunk)[1] or chunk)
        else:
            out.extend(chunk.split())
    return out


def _check_address_list(addresses: list[str]) -> list[str]:
    """check_addresses, naming a character used between addresses that is not a separator."""
    try:
        return check_addresses(addresses)
    except ValueError as exc:
        bad = next((a for a in addresses if not valid_address(a)), "")
        if bad.count("@") < 2:
            raise
        odd = next((ch for ch in bad if not _PLAIN_ADDRESS_CHAR.match(ch)), None)
        what = f"{odd!r} is not a separator: " if odd else ""
        raise ValueError(
            f"{exc}; {what}separate addresses with commas, semicolons or spaces"
        ) from None


class SmtpFields(BaseModel):
    """One SMTP account's settings and their checks, shared by the primary account (the
    ``NOTIFIER_SMTP_*`` settings) and the failover accounts (``NOTIFIER_ACCOUNTS_FILE``).
    A provider preset fills host, TLS, port and rate limit; the password comes from the
    setting, its file, or the systemd credential."""

    smtp_provider: str | None = None
    smtp_host: str | None = None
    smtp_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    smtp_tls: TlsMode | None = None
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_password_file: Path | None = None
    # the systemd credential holding the password ($CREDENTIALS_DIRECTORY/<name>); a failover
    # account's is smtp_password_<account name>
    smtp_password_credential: str = Field(default="smtp_password", pattern=r"^[A-Za-z0-9_.-]+$")
    smtp_validate_certs: bool = True
    smtp_ca_file: Path | None = None
    smtp_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    smtp_idle_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    smtp_max_messages_per_connection: Annotated[int, Field(ge=1)] = 100
    smtp_esmtp_mode: Literal["auto", "chunking", "pipelining", "sequential"] = "auto"
    # The EHLO name (default: this host's FQDN, else MAIL_FROM's domain; never localhost).
    smtp_helo_name: str | None = None
    # Messages per minute this account may send (None: the provider preset's; 0: no limit).
    smtp_rate_per_minute: Annotated[int, Field(ge=0)] | None = None
    # The limit's window: RATE_PER_MINUTE sends in any RATE_WINDOW_S seconds (60 = per minute).
    smtp_rate_window_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    smtp_account_name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$", max_length=64)
    mail_from: str | None = None

    @field_validator("smtp_ca_file")
    @classmethod
    def _ca_file(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        fix = "give the PEM file of the CA that signed the server's certificate, or unset it"
        try:
            with v.open("rb"):
                pass
            ssl.create_default_context(cafile=str(v))
        except FileNotFoundError:
            raise ValueError(f"{v}: no such file; {fix}") from None
        except ssl.SSLError:  # (an OSError too)
            raise ValueError(f"{v}: no PEM certificate in it; {fix}") from None
        except OSError as exc:
            raise ValueError(f"{v}: cannot read it ({exc.strerror}); {fix}") from None
        return v

    @field_validator("mail_from")
    @classmethod
    def _from(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name, address = parseaddr(v)
        if not valid_address(address):
            raise ValueError(f"{v!r}: use name@example.com or 'Display Name <name@example.com>'")
        # Kept readable (RFC 2047 encoding is compose.py's job, at the header).
        return str(Address(display_name=name, addr_spec=address)) if name else address

    @field_validator("smtp_helo_name")
    @classmethod
    def _helo(cls, v: str | None) -> str | None:
        problem = None if v is None else helo_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("smtp_provider")
    @classmethod
    def _provider(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in PROVIDERS:
            raise ValueError(f"unknown provider {v!r}; known: {', '.join(PROVIDERS)}")
        return v.lower() if v else None

    @model_validator(mode="after")
    def _resolve_account(self) -> Self:
        preset = PROVIDERS.get(self.smtp_provider or "")
        if preset:
            self.smtp_host = self.smtp_host or preset.host
            self.smtp_tls = self.smtp_tls or preset.tls
            if self.smtp_port is None and self.smtp_tls == preset.tls:
                # the preset's port goes with its TLS mode; another mode gets its own port below
                self.smtp_port = preset.port
        self.smtp_host = self.smtp_host or "localhost"
        self.smtp_tls = self.smtp_tls or "none"
        if self.smtp_port is None:
            self.smtp_port = {"ssl": 465, "starttls": 587, "none": 25}[self.smtp_tls]
        if self.smtp_password is None:
            self.smtp_password = _read_password(
                self.smtp_password_file, self.smtp_password_credential
            )
        if self.mail_from is None and self.smtp_username and valid_address(self.smtp_username):
            self.mail_from = self.smtp_username
        if self.smtp_helo_name is None:
            self.smtp_helo_name = default_helo_name(self.mail_from)
        if not self.smtp_account_name:
            self.smtp_account_name = self.smtp_provider or "primary"
        if self.smtp_rate_per_minute is None:
            self.smtp_rate_per_minute = preset.per_minute if preset else 0
        return self

    @property
    def provider(self) -> Provider | None:
        return PROVIDERS.get(self.smtp_provider or "")

    def _sender_mismatch(self) -> tuple[str, str, str] | None:
        """(sender address, username, provider) when they differ on a strict provider."""
        provider = self.smtp_provider or next(
            (name for name, p in PROVIDERS.items() if p.host == (self.smtp_host or "").lower()),
            None,
        )
        if provider not in STRICT_SENDER_PROVIDERS or not self.mail_from:
            return None
        sender = parseaddr(self.mail_from)[1].lower()
        username = (self.smtp_username or "").strip()
        if not username:
            return None
        login = username.lower()
        if sender == login or ("@" not in login and sender.partition("@")[0] == login):
            return None
        return sender, username, provider


class SmtpAccount(SmtpFields):
    """One SMTP account, resolved: the primary (:meth:`Settings.accounts`) or a failover
    account of ``NOTIFIER_ACCOUNTS_FILE``."""

    model_config = ConfigDict(extra="forbid")


class Settings(SmtpFields, BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NOTIFIER_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Redis
    redis_url: str = Field(default="redis://localhost:6379/0", repr=False)  # may hold a password
    key_prefix: Annotated[
        str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:{}-]+$")
    ] = "notifier"
    worker_id: str = Field(default="", pattern=r"^[A-Za-z0-9_.@:-]*$", max_length=128)

    # Failover accounts in priority order (TOML, see README "Failover accounts").
    accounts_file: Path | None = None
    # Channels besides e-mail (WeCom, DingTalk, Feishu, Telegram, webhooks), TOML; see README.
    channels_file: Path | None = None

    # Mail
    mail_to: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_recipients: Annotated[list[str], NoDecode] = Field(default_factory=list)
    template_dir: Path | None = None
    routes_file: Path | None = None
    # Liveness: which strategies to watch, and the sessions when silence matters (TOML).
    watch_file: Path | None = None
    locale: Literal["en", "zh"] = "en"
    late_after_s: Annotated[float, Field(gt=0)] = 60.0
    dedup_window_s: Annotated[float, Field(gt=0)] = 300.0
    thread_by_day: bool = True

    # Delivery
    concurrency: Annotated[int, Field(ge=1, le=256)] = 4
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    retry_base_s: Annotated[float, Field(gt=0)] = 1.0
    retry_max_s: Annotated[float, Field(gt=0)] = 300.0
    throttle_base_s: Annotated[float, Field(gt=0)] = 30.0
    sent_ttl_s: Annotated[int, Field(ge=60)] = 7 * 24 * 3600
    heartbeat_ttl_s: Annotated[float, Field(ge=2)] = 10.0
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 20.0
    fetch_batch: Annotated[int, Field(ge=1, le=1000)] = 32

    # Observability
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    # Added to METRICS_PORT (unless 0): deploy/notifier@.service sets it to the instance
    # number, so notifier@1 listens on 9465, notifier@2 on 9466.
    metrics_port_offset: Annotated[int, Field(ge=0, le=65535)] = 0
    latency_target_s: Annotated[float, Field(gt=0)] = 1.0
    deliveries_kept: Annotated[int, Field(ge=100)] = 20000
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("mail_to", "allowed_recipients", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        return split_addresses(v)

    @field_validator("mail_to", "allowed_recipients")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        return _check_address_list(v)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        from producer.topology import describe

        describe(v)  # any topology's form; ValueError in one line, password masked; no I/O
        return v

    @field_validator("template_dir")
    @classmethod
    def _template_dir(cls, v: Path | None) -> Path | None:
        if v is None:
            return None
        fix = "a directory with mail.txt.j2 / mail.html.j2, or unset it for the built-in ones"
        if not v.exists():
            raise ValueError(f"{v}: no such directory; {fix}")
        if not v.is_dir():
            raise ValueError(f"{v}: not a directory; {fix}")
        try:
            names = os.listdir(v)
            for name in names:
                if name.endswith(".j2"):
                    with (v / name).open("rb"):
                        pass
        except OSError as exc:
            where = exc.filename or v
            raise ValueError(
                f"{where}: cannot read it ({exc.strerror}); make it readable by the user "
                "running notifier (the systemd units run as a dynamic user: world-readable)"
            ) from None
        return v

    @field_validator("metrics_port_offset", mode="before")
    @classmethod
    def _offset(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip().isdigit():
            raise ValueError(
                f"{v!r} is not a number: deploy/notifier@.service sets it to the instance name, "
                "so use numbered instances (notifier@1, notifier@2), or set "
                "NOTIFIER_METRICS_PORT_OFFSET=0 and a NOTIFIER_METRICS_PORT of its own in "
                "/etc/notifier/notifier-<instance>.env"
            )
        return v

    @model_validator(mode="after")
    def _resolve(self) -> Self:
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("NOTIFIER_RETRY_MAX_S must be at least NOTIFIER_RETRY_BASE_S")
        if not self.worker_id:
            self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        if self.metrics_port and self.metrics_port_offset:
            port = self.metrics_port + self.metrics_port_offset
            if port > 65535:
                raise ValueError(
                    f"NOTIFIER_METRICS_PORT {self.metrics_port} + NOTIFIER_METRICS_PORT_OFFSET "
                    f"{self.metrics_port_offset} is above 65535: lower one of them"
                )
            self.metrics_port, self.metrics_port_offset = port, 0
        if self.watch_file is not None:
            from .watch import load_watch

            self._watch = load_watch(self.watch_file, self.allowed)
        if self.routes_file is not None:
            from .routing import load_routes

            self._routes = load_routes(self.routes_file, self.allowed, self.sessions)
        if self.channels_file is not None:
            from .channels.registry import load_channels

            self._channels = load_channels(self.channels_file)
        if self.accounts_file is not None:
            self._failover = _load_accounts(self, self.accounts_file)
        return self

    _routes: Routes | None = PrivateAttr(default=None)
    _watch: WatchConfig | None = PrivateAttr(default=None)
    _failover: list[SmtpAccount] = PrivateAttr(default_factory=list)
    _channels: list[HttpChannelSettings] = PrivateAttr(default_factory=list)

    def channels(self) -> list[HttpChannelSettings]:
        """The channels of NOTIFIER_CHANNELS_FILE (validated), in the file's order."""
        return list(self._channels)

    @property
    def watch(self) -> WatchConfig | None:
        """The validated watch rules, or None without WATCH_FILE."""
        return self._watch

    @property
    def sessions(self) -> SessionBook:
        """The sessions routes and watch rules may name: the built-in ones and the watch
        file's ``[[session]]`` tables."""
        if self._watch is not None:
            return self._watch.sessions
        from .sessions import SessionBook

        return SessionBook.builtin()

    @property
    def routes(self) -> Routes | None:
        """The validated routes, or None without ROUTES_FILE."""
        return self._routes

    def primary_account(self) -> SmtpAccount:
        """The ``NOTIFIER_SMTP_*`` account (already resolved: nothing is read again)."""
        return SmtpAccount.model_validate(self.model_dump(include=set(_ACCOUNT_FIELD_NAMES)))

    def accounts(self) -> list[SmtpAccount]:
        """The SMTP accounts in priority order: the primary, then the failover accounts."""
        return [self.primary_account(), *self._failover]

    def sender_warnings(self) -> list[str]:
        """One line for each account whose MAIL_FROM address is not its login, on a provider
        that refuses that (QQ: ``550 The "From" header is missing or invalid``)."""
        out = []
        for i, acc in enumerate(self.accounts()):
            mismatch = acc._sender_mismatch()
            if mismatch is None:
                continue
            sender, username, provider = mismatch
            why = (
                f"{provider} refuses or rewrites a From address other than the account's own "
                f'(QQ: 550 The "From" header is missing or invalid)'
            )
            if i == 0:
                out.append(
                    f"NOTIFIER_MAIL_FROM: {sender} is not the account "
                    f"NOTIFIER_SMTP_USERNAME={username}; {why}: use 量化提醒 <{username}>"
                )
            else:
                out.append(
                    f"NOTIFIER_ACCOUNTS_FILE={self.accounts_file}: account "
                    f"{acc.smtp_account_name!r}: mail_from {sender} is not its username "
                    f"{username}; {why}: use {username} (a display name is fine)"
                )
        return out

    # ------------------------------------------------------------------ derived values
    @property
    def allowed(self) -> frozenset[str]:
        """Recipients an event may name: ALLOWED_RECIPIENTS ∪ MAIL_TO."""
        return frozenset(self.allowed_recipients) | frozenset(self.mail_to)

    def require_mail(self) -> None:
        """Raise SettingsError unless sending mail is configured."""
        if not self.mail_from:
            raise SettingsError(
                "NOTIFIER_MAIL_FROM: not set; use the account's address, e.g. 12345@qq.com"
            )
        if not self.mail_to:
            raise SettingsError(
                "NOTIFIER_MAIL_TO: not set; give the default recipients, comma separated"
            )
        if self.smtp_username and self.smtp_password is None:
            raise SettingsError(
                "NOTIFIER_SMTP_PASSWORD: not set; set it, NOTIFIER_SMTP_PASSWORD_FILE, or a "
                "systemd credential smtp_password"
            )

    def redacted(self) -> dict[str, Any]:
        """Settings for display: secrets masked."""
        out = self.model_dump(mode="json")
        out["smtp_password"] = "**********" if self.smtp_password else None
        out["redis_url"] = redacted_url(self.redis_url)
        return out

    @property
    def redis_url_display(self) -> str:
        return redacted_url(self.redis_url)


def read_secret(path: Path | None, credential: str, *, setting: str = "") -> SecretStr | None:
    """A secret (a password, a webhook URL, a token) from ``path``, else from systemd's
    ``$CREDENTIALS_DIRECTORY/<credential>``; None when neither holds one. ValueError (naming
    ``setting=path``, never the secret) when the file cannot be read."""
    if path is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and (Path(creds) / credential).is_file():
            path = Path(creds) / credential
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        where = f"{setting}={path}" if setting else str(path)
        raise ValueError(f"{where}: cannot read it ({exc.strerror})") from None
    return SecretStr(text) if text else None


def _read_password(path: Path | None, credential: str) -> SecretStr | None:
    return read_secret(path, credential, setting="NOTIFIER_SMTP_PASSWORD_FILE")


_ACCOUNT_FIELD_NAMES = frozenset(SmtpAccount.model_fields)
# the keys of an [[account]] table -> the account's fields
_ACCOUNT_FIELDS = {
    "provider": "smtp_provider",
    "host": "smtp_host",
    "port": "smtp_port",
    "tls": "smtp_tls",
    "username": "smtp_username",
    "password": "smtp_password",
    "password_file": "smtp_password_file",
    "validate_certs": "smtp_validate_certs",
    "ca_file": "smtp_ca_file",
    "rate_per_minute": "smtp_rate_per_minute",
    "mail_from": "mail_from",
    "name": "smtp_account_name",
    "timeout_s": "smtp_timeout_s",
    "rate_window_s": "smtp_rate_window_s",
}


# A failover account inherits these from the primary unless its table sets them.
_INHERITED = (
    "smtp_validate_certs",
    "smtp_ca_file",
    "smtp_timeout_s",
    "smtp_idle_timeout_s",
    "smtp_max_messages_per_connection",
    "smtp_esmtp_mode",
    "smtp_helo_name",
    "smtp_rate_window_s",
)


def _load_accounts(base: SmtpFields, path: Path) -> list[SmtpAccount]:
    """Failover accounts from a TOML file of ``[[account]]`` tables."""
    raw = read_toml(path, "NOTIFIER_ACCOUNTS_FILE")
    out: list[SmtpAccount] = []
    names = {base.smtp_account_name}
    for i, acc in enumerate(raw.get("account", [])):
        unknown = set(acc) - set(_ACCOUNT_FIELDS)
        if unknown:
            raise ValueError(
                f"NOTIFIER_ACCOUNTS_FILE={path}: account {i + 1}: unknown key(s) "
                f"{', '.join(sorted(unknown))}; known: {', '.join(_ACCOUNT_FIELDS)}"
            )
        name = str(acc.get("name") or acc.get("provider") or f"account{i + 2}")
        if name in names:
            raise ValueError(f"NOTIFIER_ACCOUNTS_FILE={path}: two accounts named {name!r}")
        names.add(name)
        fields: dict[str, Any] = {key: getattr(base, key) for key in _INHERITED}
        fields["smtp_account_name"] = name
        fields["smtp_password_credential"] = f"smtp_password_{name}"
        fields.update({_ACCOUNT_FIELDS[key]: value for key, value in acc.items()})
        try:
            account = SmtpAccount(**fields)
        except ValidationError as exc:
            key, msg, _err = first_error(exc)
            raise ValueError(
                f"NOTIFIER_ACCOUNTS_FILE={path}: account {name!r}: {key.removeprefix('smtp_')}"
                f"{': ' if key else ''}{msg}"
            ) from None
        if account.smtp_username and account.smtp_password is None:
            raise ValueError(
                f"NOTIFIER_ACCOUNTS_FILE={path}: account {name!r}: no password (password_file, "
                f"or a systemd credential smtp_password_{name})"
            )
        out.append(account)
    return out


def first_error(exc: ValidationError) -> tuple[str, str, dict[str, Any]]:
    """The first problem pydantic found, as (where: dotted location, what: its message without
    pydantic's "Value error, " prefix, the raw error): the one line a user sees."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    return where, first["msg"].removeprefix("Value error, "), dict(first)


_TOML_WHERE = re.compile(r"\s*\(at (line \d+, column \d+|end of document)\)$")


def read_toml(path: Path, setting: str) -> dict[str, Any]:
    """A TOML file named by ``setting``; ValueError with one line (the line and column of a
    syntax error) on what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{setting}={path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{setting}={path}: not UTF-8 (byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ValueError(
            f"{setting}={path}: cannot read it ({exc.strerror}); make it readable by the user "
            "running notifier (the systemd units run as a dynamic user: world-readable)"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_WHERE.search(msg)
        where = m.group(1) if m else "somewhere"
        if where == "end of document":
            line, last = text.count("\n") + 1, text.rsplit("\n", 1)[-1]
            where = f"line {line}, column {len(last) + 1} (the end of the file)"
        what = msg[: m.start()] if m else msg
        raise ValueError(
            f"{setting}={path}: not valid TOML at {where}: {what[:1].lower()}{what[1:]}"
        ) from None


# ------------------------------------------------------------------ where settings come from
def find_env_file(explicit: str | Path | None = None) -> Path | None:
    """The env file to read: ``explicit`` (``--env-file``), else ``NOTIFIER_ENV_FILE``, else
    ``./.env``, else :data:`SYSTEM_ENV_FILE` if it exists; None for the environment only
    (also for ``/dev/null``, which the systemd units name: systemd has read the file already).
    SettingsError when a named file (or the installer's) cannot be read."""
    for value, name in ((explicit, "--env-file "), (os.environ.get(ENV_FILE_VARIABLE), None)):
        if value is None or value == "":
            continue
        path = Path(value).expanduser()
        _readable(path, f"{name}{path}" if name else f"{ENV_FILE_VARIABLE}={path}")
        return None if str(path) == os.devnull else path
    if Path(".env").is_file():
        return Path(".env").absolute()
    try:
        SYSTEM_ENV_FILE.stat()
    except FileNotFoundError:
        return None
    except OSError:
        pass  # cannot even look: reported below
    _readable(SYSTEM_ENV_FILE, str(SYSTEM_ENV_FILE), system=True)
    return SYSTEM_ENV_FILE


def _readable(path: Path, label: str, *, system: bool = False) -> None:
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise SettingsError(f"{label}: no such file; give the path of the env file") from None
    except OSError as exc:
        fix = (
            "run as root (sudo), give another file with --env-file PATH, or set "
            "NOTIFIER_ENV_FILE=/dev/null to use the environment only"
            if system
            else "make it readable by this user or run as root (sudo)"
        )
        raise SettingsError(f"{label}: cannot read it ({exc.strerror}); {fix}") from None


def setting_names() -> list[str]:
    """Every setting's variable name (NOTIFIER_...)."""
    return [f"{PREFIX}{name.upper()}" for name in Settings.model_fields]


def unknown_variables(env_file: Path | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """One line for each NOTIFIER_* variable (environment, then env file) that is not a
    setting, with the closest setting; and for each setting written without its prefix in
    the env file. Never shows a value."""
    from dotenv import dotenv_values

    known = setting_names()
    known_set = set(known)
    environ = os.environ if environ is None else environ
    sources: list[tuple[str, list[str]]] = [("the environment", sorted(environ))]
    if env_file is not None:
        sources.append((str(env_file), list(dotenv_values(env_file, encoding="utf-8"))))
    out: list[str] = []
    for where, names in sources:
        for name in names:
            upper = name.upper()
            if upper in known_set or upper in NOT_SETTINGS:
                continue
            if not upper.startswith(PREFIX):
                if env_file is not None and where == str(env_file) and PREFIX + upper in known_set:
                    out.append(
                        f"{name} (in {where}) is ignored: settings take the prefix, {PREFIX}{upper}"
                    )
                continue
            if upper.startswith(NOT_SETTINGS_PREFIXES):
                continue
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
            hint = f": did you mean {close[0]}?" if close else " (every setting is in .env.example)"
            out.append(f"{name} (in {where}) is not a setting{hint}")
    return out


_FIND = object()


def load_settings(*, env_file: Any = _FIND, **overrides: Any) -> Settings:
    """Build the settings or raise SettingsError with one line naming the setting.

    ``env_file``: a path, None for the environment only, or (default) :func:`find_env_file`.
    """
    if env_file is _FIND:
        env_file = find_env_file()
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        where, msg, err = first_error(exc)
        field = where.split(".")[0].upper()
        if not field:  # a check across several settings names them itself
            raise SettingsError(msg) from None
        name = f"NOTIFIER_{field}"
        got = err.get("input")
        # a value error names the value itself (and a URL or password is never echoed)
        quiet = field in ("SMTP_PASSWORD", "REDIS_URL") or err["type"] == "value_error"
        shown = "" if quiet or isinstance(got, dict) else f" (got {got!r})"
        raise SettingsError(f"{name}: {msg}{shown}") from None
