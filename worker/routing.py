"""Routing rules: who gets an event, picked by ``strategy``, ``kind`` and ``severity``.

In the spirit of Alertmanager's routes: a list of rules, first match wins, then a default.
Rules live in a TOML file named by ``ROUTES_FILE`` and are validated at start-up::

    # /etc/notifier/routes.toml
    [[route]]
    name = "critical to the whole desk"
    severity = "critical"
    to = ["desk@example.com", "me@example.com"]

    [[route]]
    strategy = ["ma_*", "grid_*"]      # shell-style patterns
    kind = ["fill", "order"]
    to = ["fills@example.com"]
    dedup_window_s = 300               # default window for events with a dedup_key
    [route.quiet]                      # quiet hours (worker/quiet.py)
    deliver_during = ["cn_a_share"]    # outside: held, one digest at 08:45 before the open
    digest_at = "08:45"

    [default]
    to = ["me@example.com"]

Every recipient must be in ``ALLOWED_RECIPIENTS`` ∪ ``MAIL_TO``. An event's own ``to`` wins
over the routes but is only honoured within that set (outside it, the event is a dead letter).
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from producer.event import Event, Severity, check_addresses

from .quiet import Quiet
from .sessions import SessionBook
from .settings import first_error, read_toml

__all__ = ["Route", "Routes", "load_routes"]


EMAIL = "email"  # the e-mail channel: the SMTP accounts in failover order


def _as_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    strategy: list[str] | None = None
    kind: list[str] | None = None
    severity: list[Severity] | None = None
    # e-mail recipients (left out: MAIL_TO)
    to: Annotated[list[str], Field(min_length=1, max_length=50)] | None = None
    dedup_window_s: Annotated[float, Field(gt=0)] | None = None
    digest: bool = True
    # where the events go: "email" and/or channels of NOTIFIER_CHANNELS_FILE, one delivery
    # each (default: e-mail only); fallback: tried, in order, while every e-mail account is
    # throttled, paused or down
    channels: Annotated[list[str], Field(min_length=1)] | None = None
    fallback: list[str] = Field(default_factory=list)
    # non-critical events outside these sessions or hours: held for one digest
    quiet: Quiet | None = None

    _lists = field_validator(
        "strategy", "kind", "severity", "to", "channels", "fallback", mode="before"
    )(classmethod(lambda cls, v: _as_list(v)))

    @field_validator("to")
    @classmethod
    def _addresses(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else check_addresses(v)

    def matches(self, event: Event) -> bool:
        return (
            _match(self.strategy, event.strategy)
            and _match(self.kind, event.kind)
            and (self.severity is None or event.severity in self.severity)
        )

    @property
    def label(self) -> str:
        return self.name or ",".join(self.to or self.channels or ())

    @property
    def targets(self) -> list[str]:
        """The channels this route delivers to, one delivery each."""
        return list(self.channels) if self.channels else [EMAIL]


def _match(patterns: list[str] | None, value: str | None) -> bool:
    if patterns is None:
        return True
    return value is not None and any(fnmatchcase(value, p) for p in patterns)


class Routes(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    route: list[Route] = Field(default_factory=list)
    default: Route | None = None

    def resolve(self, event: Event) -> Route | None:
        """The first matching route, else the default route, else None (use MAIL_TO)."""
        for r in self.route:
            if r.matches(event):
                return r
        return self.default

    def recipients(self) -> Iterable[str]:
        for r in self.all():
            yield from r.to or ()

    def all(self) -> list[Route]:
        return [*self.route, *([self.default] if self.default else [])]

    def check_channels(self, known: Iterable[str], path: Path) -> None:
        """Every channel a route names exists (ValueError with one line otherwise)."""
        names = set(known) | {EMAIL}
        for r in self.all():
            for name in (*(r.channels or ()), *r.fallback):
                if name not in names:
                    raise ValueError(
                        f"NOTIFIER_ROUTES_FILE={path}: route {r.label!r}: no channel named "
                        f"{name!r}; known: {', '.join(sorted(names))} (NOTIFIER_CHANNELS_FILE)"
                    )


def load_routes(path: Path, allowed: frozenset[str], sessions: SessionBook | None = None) -> Routes:
    """Parse and validate the routes file, its quiet hours against ``sessions`` (the built-in
    ones and the watch file's; default: the built-in ones); ValueError with one line on what
    is wrong."""
    raw = read_toml(path, "NOTIFIER_ROUTES_FILE")
    try:
        routes = Routes.model_validate(raw)
    except ValidationError as exc:
        where, msg, _err = first_error(exc)
        raise ValueError(f"NOTIFIER_ROUTES_FILE={path}: {where}: {msg}") from None
    outside = sorted({a for a in routes.recipients() if a not in allowed})
    if outside:
        raise ValueError(
            f"NOTIFIER_ROUTES_FILE={path}: {', '.join(outside)} not allowed: add them to "
            "NOTIFIER_ALLOWED_RECIPIENTS"
        )
    for i, r in enumerate(routes.all()):
        if r.quiet is None:
            continue
        label = r.label or ("default" if r is routes.default else f"#{i + 1}")
        if not r.digest:
            raise ValueError(
                f"NOTIFIER_ROUTES_FILE={path}: route {label!r}: quiet hours hold events for a "
                "digest and this route has digest = false: remove one of them"
            )
        try:
            r.quiet.bind(sessions or SessionBook.builtin())
        except ValueError as exc:
            raise ValueError(
                f"NOTIFIER_ROUTES_FILE={path}: route {label!r}: quiet: {exc}"
            ) from None
    return routes
