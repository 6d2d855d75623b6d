"""Where the producer finds its Redis: arguments, then the environment, then an env file.

The producer reads two settings, the same two the worker reads: ``NOTIFIER_REDIS_URL``
(default ``redis://localhost:6379/0``) and ``NOTIFIER_KEY_PREFIX`` (default ``notifier``).
An explicit argument wins over the environment, the environment over the env file given as
``env_file=`` (or in ``NOTIFIER_ENV_FILE``), which wins over the default.

The env file is usually the worker's ``.env``. The worker reads it with python-dotenv (through
pydantic-settings); the producer must stay light (redis and pydantic only), so
:func:`read_env_file` is a small reader that agrees with python-dotenv on the forms a person
writes on one line: ``KEY=value``, ``export KEY=value``, spaces around ``=``, single or double
quotes (with python-dotenv's escapes), `` # comments`` after unquoted values, ``${VAR}`` and
``${VAR:-default}``, and keys in any case. Values spanning several lines are not supported.
"""

from __future__ import annotations

import codecs
import os
import re
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_REDIS_URL",
    "ProducerSettings",
    "read_env_file",
    "resolve",
]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_KEY_PREFIX = "notifier"
ENV_FILE_VARIABLE = "NOTIFIER_ENV_FILE"

_ASSIGNMENT = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=[ \t]*(.*)")
_SINGLE_QUOTED = re.compile(r"'((?:\\'|[^'])*)'\s*(?:#.*)?")
_DOUBLE_QUOTED = re.compile(r'"((?:\\"|[^"])*)"\s*(?:#.*)?')
_SINGLE_ESCAPES = re.compile(r"\\[\\']")
_DOUBLE_ESCAPES = re.compile(r"\\[\\'\"abfnrtv]")
_COMMENT = re.compile(r"\s+#.*")
_VARIABLE = re.compile(r"\$\{(?P<name>[^}:]*)(?::-(?P<default>[^}]*))?\}")


def _unescape(pattern: re.Pattern[str], text: str) -> str:
    return pattern.sub(lambda m: codecs.decode(m.group(0), "unicode-escape"), text)


def _value(raw: str) -> str | None:
    """The value of one assignment, or None when the line cannot be parsed (skipped, as
    python-dotenv skips it)."""
    if raw.startswith("'"):
        match = _SINGLE_QUOTED.fullmatch(raw)
        return _unescape(_SINGLE_ESCAPES, match.group(1)) if match else None
    if raw.startswith('"'):
        match = _DOUBLE_QUOTED.fullmatch(raw)
        return _unescape(_DOUBLE_ESCAPES, match.group(1)) if match else None
    return _COMMENT.sub("", raw).strip()


def _interpolate(value: str, scope: dict[str, str]) -> str:
    """``${VAR}`` and ``${VAR:-default}`` from the file's earlier lines, else the environment."""
    return _VARIABLE.sub(lambda m: scope.get(m.group("name"), m.group("default")) or "", value)


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``NOTIFIER_*`` assignments of an env file, keys upper-cased; every other key is
    left alone (SMTP passwords never pass through the producer). OSError if unreadable."""
    seen: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = _ASSIGNMENT.fullmatch(line)
        if match is None:
            continue
        value = _value(match.group(2).rstrip())
        if value is None:
            continue
        seen[match.group(1)] = _interpolate(value, {**os.environ, **seen})
    return {
        key.upper(): value for key, value in seen.items() if key.upper().startswith("NOTIFIER_")
    }


def _env_file_values(env_file: str | os.PathLike[str] | None) -> dict[str, str]:
    if env_file is not None:
        setting, path = "env_file", os.fspath(env_file)
    else:
        setting, path = ENV_FILE_VARIABLE, os.environ.get(ENV_FILE_VARIABLE, "")
        if not path:
            return {}
    try:
        return read_env_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(
            f"{setting}={path}: cannot read it ({why}); give the path of the .env that holds "
            "NOTIFIER_REDIS_URL, or leave it out"
        ) from None


class ProducerSettings(NamedTuple):
    redis_url: str
    key_prefix: str
    replicas: int  # acknowledged pushes: replicas that must confirm a send (0: none)
    replica_timeout_ms: int  # how long WAIT waits for them


REPLICAS_VARIABLE = "NOTIFIER_PRODUCER_REPLICAS"
REPLICA_TIMEOUT_VARIABLE = "NOTIFIER_PRODUCER_REPLICA_TIMEOUT_MS"
DEFAULT_REPLICA_TIMEOUT_MS = 100


def resolve(
    *,
    redis_url: str | None,
    key_prefix: str | None,
    env_file: str | os.PathLike[str] | None,
    replicas: int | None = None,
    replica_timeout_ms: int | None = None,
) -> ProducerSettings:
    """The producer's settings, each from its argument, else the environment, else the env
    file (read once), else its default (an empty value counts as unset): the Redis URL and
    key prefix (``NOTIFIER_REDIS_URL`` / ``NOTIFIER_KEY_PREFIX``), and for acknowledged
    pushes ``NOTIFIER_PRODUCER_REPLICAS`` (0) and ``NOTIFIER_PRODUCER_REPLICA_TIMEOUT_MS``
    (100). ``ValueError`` in one line naming the setting when a number is not a whole number
    (replicas 0 or more, the timeout above 0)."""
    from_file = _env_file_values(env_file)

    def pick(given: str | None, name: str, default: str) -> str:
        return given or os.environ.get(name) or from_file.get(name) or default

    def number(given: int | None, argument: str, name: str, default: int, minimum: int) -> int:
        if given is not None:
            value: object = given
            shown = f"{argument}={given!r}"
        else:
            raw = os.environ.get(name) or from_file.get(name)
            if not raw:
                return default
            shown = f"{name}={raw}"
            try:
                value = int(raw.strip())
            except ValueError:
                value = raw
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            need = "0 or more" if minimum == 0 else "above 0"
            raise ValueError(f"{shown}: give a whole number, {need}")
        return value

    return ProducerSettings(
        pick(redis_url, "NOTIFIER_REDIS_URL", DEFAULT_REDIS_URL),
        pick(key_prefix, "NOTIFIER_KEY_PREFIX", DEFAULT_KEY_PREFIX),
        number(replicas, "replicas", REPLICAS_VARIABLE, 0, 0),
        number(
            replica_timeout_ms,
            "replica_timeout_ms",
            REPLICA_TIMEOUT_VARIABLE,
            DEFAULT_REPLICA_TIMEOUT_MS,
            1,
        ),
    )
