"""Every setting of the worker: one pydantic-settings model, from the environment or ``.env``.

Names are the field names upper-cased with the prefix ``NOTIFIER_`` (``NOTIFIER_SMTP_HOST``).
``SMTP_PROVIDER`` fills host, port and TLS mode from a preset; explicit values win.
The password comes from ``SMTP_PASSWORD``, ``SMTP_PASSWORD_FILE`` or systemd's
``$CREDENTIALS_DIRECTORY/smtp_password`` (``LoadCredential=``), in that order of preference.
"""

from __future__ import annotations

import os
import socket
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
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

__all__ = [
    "PROVIDERS",
    "Provider",
    "Settings",
    "SettingsError",
    "load_settings",
    "redacted_url",
]

TlsMode = Literal["ssl", "starttls", "none"]


class Provider:
    """A preset: where the provider's submission server is and what it allows."""

    def __init__(self, host: str, port: int, tls: TlsMode, per_minute: int, note: str) -> None:
        self.host, self.port, self.tls, self.per_minute, self.note = (
            host,
            port,
            tls,
            per_minute,
            note,
        )


# Rates are conservative published or observed limits for personal accounts.
PROVIDERS: dict[str, Provider] = {
    "qq": Provider("smtp.qq.com", 465, "ssl", 20,
                   "password = 16-character authorization code (授权码), enable SMTP in settings"),
    "163": Provider("smtp.163.com", 465, "ssl", 15,
                    "password = authorization code (授权码), enable SMTP in settings"),
    "126": Provider("smtp.126.com", 465, "ssl", 15,
                    "password = authorization code (授权码), enable SMTP in settings"),
    "exmail": Provider("smtp.exmail.qq.com", 465, "ssl", 60, "Tencent business mail"),
    "gmail": Provider("smtp.gmail.com", 465, "ssl", 20, "password = Google app password"),
    "outlook": Provider("smtp.office365.com", 587, "starttls", 30, "Microsoft 365 / Outlook.com"),
}  # fmt: skip


class SettingsError(NotifierError, ValueError):
    """A setting is missing or wrong; the message names it and says how to fix it."""


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NOTIFIER_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Redis
    redis_url: str = Field(default="redis://localhost:6379/0", repr=False)  # may hold a password
    key_prefix: Annotated[
        str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    ] = "notifier"
    worker_id: str = Field(default="", pattern=r"^[A-Za-z0-9_.@:-]*$", max_length=128)

    # SMTP
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
    # Messages per minute this account may send (None: the provider preset's; 0: no limit).
    smtp_rate_per_minute: Annotated[int, Field(ge=0)] | None = None
    # The limit's window: RATE_PER_MINUTE sends in any RATE_WINDOW_S seconds (60 = per minute).
    smtp_rate_window_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    smtp_account_name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]*$", max_length=64)
    # Failover accounts in priority order (TOML, see README "Failover accounts").
    accounts_file: Path | None = None

    # Mail
    mail_from: str | None = None
    mail_to: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_recipients: Annotated[list[str], NoDecode] = Field(default_factory=list)
    template_dir: Path | None = None
    routes_file: Path | None = None
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
    latency_target_s: Annotated[float, Field(gt=0)] = 1.0
    deliveries_kept: Annotated[int, Field(ge=100)] = 20000
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("mail_to", "allowed_recipients", mode="before")
    @classmethod
    def _list(cls, v: Any) -> Any:
        return _split(v)

    @field_validator("mail_to", "allowed_recipients")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        return check_addresses(v)

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

    @field_validator("smtp_provider")
    @classmethod
    def _provider(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in PROVIDERS:
            raise ValueError(f"unknown provider {v!r}; known: {', '.join(PROVIDERS)}")
        return v.lower() if v else None

    @model_validator(mode="after")
    def _resolve(self) -> Self:
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
        if self.retry_max_s < self.retry_base_s:
            raise ValueError("NOTIFIER_RETRY_MAX_S must be at least NOTIFIER_RETRY_BASE_S")
        if not self.worker_id:
            self.worker_id = f"{socket.gethostname()}-{os.getpid()}"
        if not self.smtp_account_name:
            self.smtp_account_name = self.smtp_provider or "primary"
        if self.smtp_rate_per_minute is None:
            self.smtp_rate_per_minute = preset.per_minute if preset else 0
        if self.routes_file is not None:
            from .routing import load_routes

            self._routes = load_routes(self.routes_file, self.allowed)
        if self.accounts_file is not None:
            self._failover = _load_accounts(self, self.accounts_file)
        return self

    _routes: Any = PrivateAttr(default=None)
    _failover: list[Settings] = PrivateAttr(default_factory=list)

    @property
    def routes(self) -> Any:
        """The validated :class:`worker.routing.Routes`, or None without ROUTES_FILE."""
        return self._routes

    def accounts(self) -> list[Settings]:
        """The SMTP accounts in priority order: this one, then the failover accounts."""
        return [self, *self._failover]

    # ------------------------------------------------------------------ derived values
    @property
    def provider(self) -> Provider | None:
        return PROVIDERS.get(self.smtp_provider or "")

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


def _read_password(path: Path | None, credential: str) -> SecretStr | None:
    if path is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and (Path(creds) / credential).is_file():
            path = Path(creds) / credential
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(
            f"NOTIFIER_SMTP_PASSWORD_FILE={path}: cannot read it ({exc.strerror})"
        ) from None
    return SecretStr(text) if text else None


_ACCOUNT_FIELDS = {
    "provider": "smtp_provider", "host": "smtp_host", "port": "smtp_port", "tls": "smtp_tls",
    "username": "smtp_username", "password": "smtp_password",
    "password_file": "smtp_password_file", "validate_certs": "smtp_validate_certs",
    "ca_file": "smtp_ca_file", "rate_per_minute": "smtp_rate_per_minute",
    "mail_from": "mail_from", "name": "smtp_account_name", "timeout_s": "smtp_timeout_s",
    "rate_window_s": "smtp_rate_window_s",
}  # fmt: skip


def _load_accounts(base: Settings, path: Path) -> list[Settings]:
    """Failover accounts from a TOML file of ``[[account]]`` tables."""
    import tomllib

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(
            f"NOTIFIER_ACCOUNTS_FILE={path}: cannot read it ({exc.strerror})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"NOTIFIER_ACCOUNTS_FILE={path}: not valid TOML ({exc})") from None
    out: list[Settings] = []
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
        fields = base.model_dump(exclude={"accounts_file", "routes_file"})
        # explicit None: left out, they would be read again from NOTIFIER_* in the environment
        fields["accounts_file"] = fields["routes_file"] = None
        for key in ("smtp_host", "smtp_port", "smtp_tls", "smtp_username", "smtp_password",
                    "smtp_password_file", "smtp_rate_per_minute", "smtp_provider"):  # fmt: skip
            fields[key] = None
        fields["mail_from"] = None
        fields["smtp_account_name"] = name
        for key, value in acc.items():
            fields[_ACCOUNT_FIELDS[key]] = value
        fields["smtp_password_credential"] = f"smtp_password_{name}"
        try:
            account = Settings(_env_file=None, **fields)  # type: ignore[call-arg]
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            key = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
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


def load_settings(**overrides: Any) -> Settings:
    """Build the settings or raise SettingsError with one line naming the setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = str(err["loc"][0]).upper() if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if not field:  # a check across several settings names them itself
            raise SettingsError(msg) from None
        name = f"NOTIFIER_{field}"
        got = err.get("input")
        shown = "" if field == "SMTP_PASSWORD" or isinstance(got, dict) else f" (got {got!r})"
        raise SettingsError(f"{name}: {msg}{shown}") from None
