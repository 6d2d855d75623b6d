"""The kinds of channel besides e-mail, and the channels file that configures them.

``NOTIFIER_CHANNELS_FILE`` (TOML) holds one ``[[channel]]`` table per destination::

    [[channel]]
    name = "desk"            # referred to by routes, logs, metrics, dead letters
    type = "dingtalk"        # wecom | dingtalk | feishu | telegram | webhook
    url_file = "/etc/notifier/dingtalk_desk_url"
    secret_file = "/etc/notifier/dingtalk_desk_secret"

A kind is one module of this package (``worker/channels/<type>.py``) that defines its settings
model (a subclass of :class:`~worker.channels.http.HttpChannelSettings`) and its channel (a
subclass of :class:`~worker.channels.http.HttpChannel` whose ``kind`` is the type); adding a
kind is that module plus a line in :data:`KINDS`.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .http import HttpChannel, HttpChannelSettings

__all__ = ["KINDS", "build_channel", "kind_of", "load_channels"]

KINDS = ("wecom", "dingtalk", "feishu", "telegram", "webhook")
RESERVED = ("email",)


def kind_of(type_name: str) -> tuple[type[HttpChannelSettings], type[HttpChannel]]:
    """The settings model and the channel class of a kind (ValueError when unknown)."""
    if type_name not in KINDS:
        raise ValueError(f"unknown type {type_name!r}; known: {', '.join(KINDS)}")
    module = importlib.import_module(f"{__package__}.{type_name}")
    settings_cls = channel_cls = None
    for value in vars(module).values():
        if not isinstance(value, type) or value.__module__ != module.__name__:
            continue
        if issubclass(value, HttpChannelSettings):
            settings_cls = value
        elif issubclass(value, HttpChannel) and getattr(value, "kind", None) == type_name:
            channel_cls = value
    if settings_cls is None or channel_cls is None:
        raise ValueError(f"channel type {type_name!r}: its module defines no settings or channel")
    return settings_cls, channel_cls


def load_channels(
    path: Path, *, setting: str = "NOTIFIER_CHANNELS_FILE"
) -> list[HttpChannelSettings]:
    """Every [[channel]] of the file, validated by its kind's settings model; ValueError with
    one line (naming the file, the channel and the key; never a secret) on a mistake."""
    from ..settings import first_error, read_toml

    raw = read_toml(path, setting)
    tables = raw.get("channel", [])
    names: set[str] = set()
    for i, table in enumerate(tables):  # the names first: routes refer to them
        if not isinstance(table, dict):
            raise ValueError(f"{setting}={path}: channel {i + 1}: write it as a [[channel]] table")
        where = f"{setting}={path}: channel {table.get('name') or i + 1!r}"
        name = table.get("name")
        if not name:
            raise ValueError(f"{where}: name: give it a name (routes refer to it)")
        if name in RESERVED:
            raise ValueError(f"{where}: name: {name!r} is the e-mail channel's; choose another")
        if name in names:
            raise ValueError(f"{setting}={path}: two channels named {name!r}")
        names.add(name)
    out: list[HttpChannelSettings] = []
    for table in tables:
        where = f"{setting}={path}: channel {table['name']!r}"
        type_name = table.get("type")
        if not type_name:
            raise ValueError(f"{where}: type: give one of {', '.join(KINDS)}")
        try:
            settings_cls, _ = kind_of(str(type_name))
            settings = settings_cls.model_validate(table)
        except ValidationError as exc:
            key, msg, _err = first_error(exc)
            raise ValueError(f"{where}: {key}{': ' if key else ''}{msg}") from None
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        out.append(settings)
    return out


def build_channel(
    settings: HttpChannelSettings,
    *,
    priority: int,
    clock: Callable[[], float] = time.monotonic,
    **defaults: Any,
) -> HttpChannel:
    """The channel of a validated [[channel]] table. ``wall_clock`` (unix time, for signed
    requests) reaches the kinds that sign."""
    _, channel_cls = kind_of(settings.type)
    if "wall_clock" not in inspect.signature(channel_cls).parameters:
        defaults.pop("wall_clock", None)
    return channel_cls(settings, priority=priority, clock=clock, **defaults)
