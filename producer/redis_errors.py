"""One line on what Redis said and what to do about it, for the producer, the CLI and the worker.

    try:
        client.lpush(key, text)
    except (RedisError, OSError) as exc:
        print(explain_redis_error(exc, url))  # one line, never a traceback, never a password

Problems are told apart by exception type (redis-py maps Redis's error codes to classes) and
by the ``OSError`` under a connection error; only ``MISCONF`` and ``UNBLOCKED``, which have no
class of their own, are recognised by the error code that starts Redis's reply.

=================  ==================================  ====================================
:class:`RedisProblem`  what happened                   :func:`is_write_refused`
=================  ==================================  ====================================
``FULL``           ``OOM command not allowed ...``     yes: up, reads work, writes refused
``PERSISTENCE``    ``MISCONF ...`` (RDB/AOF failing)   yes
``READONLY``       ``READONLY ...`` (a replica), or    yes
                   ``UNBLOCKED ...``: a blocking
                   command ended by the server turning
                   replica (a Sentinel switchover)
``AUTH``           ``NOAUTH`` / ``WRONGPASS``          no (nothing works)
``NO_PERMISSION``  ``NOPERM`` (ACL)                    no
``LOADING``        ``LOADING`` (reading its data set)  no (transient)
``UNREACHABLE``    connection refused, reset, ...      no (down)
``HOST_NOT_FOUND`` DNS lookup failed                   no (down)
``TIMEOUT``        no answer in time                   no (down or frozen)
``OTHER``          any other error                     no
=================  ==================================  ====================================

:func:`command_not_run` tells whether Redis certainly did not run the command (it answered
with an error, or no connection was made), as opposed to a timeout or a broken connection,
after which the command may have run.

Everything in here is pure: no I/O, importable by the producer (redis and pydantic only).
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from enum import StrEnum
from urllib.parse import parse_qsl, urlsplit

from redis import exceptions as rex
from redis.asyncio.sentinel import MasterNotFoundError as AsyncMasterNotFoundError
from redis.sentinel import MasterNotFoundError

__all__ = [
    "RedisProblem",
    "classify_redis_error",
    "command_not_run",
    "explain_redis_error",
    "is_write_refused",
    "redacted_url",
]

_URL_FORM = "redis://:PASSWORD@host:port/db"
# An error code at the start of Redis's reply, or after redis-py's pipeline annotation
# ("Command # 1 (LPUSH ...) of pipeline caused error: MISCONF ...").
_MISCONF = re.compile(r"(?:^|error: )MISCONF\b")
_UNBLOCKED = re.compile(r"(?:^|error: )UNBLOCKED\b")
_URL_PASSWORD = re.compile(r"\b((?:rediss?|unix)(?:\+(?:sentinel|cluster))?://[^:@/\s]*):[^@\s]*@")
# ?sentinel_password=..., &password=...: in a URL's query or in an error's text
_QUERY_PASSWORD = re.compile(r"((?:^|(?<=[?&;\s]))[\w.-]*password=)[^&;#\s'\"]*", re.IGNORECASE)
_MAX_DETAIL = 200
_NO_MASTER = (MasterNotFoundError, AsyncMasterNotFoundError)


class RedisProblem(StrEnum):
    """What went wrong between a client and Redis, as far as a person has to act on it."""

    FULL = "full"
    PERSISTENCE = "persistence"
    READONLY = "readonly"
    AUTH = "auth"
    NO_PERMISSION = "no_permission"
    LOADING = "loading"
    UNREACHABLE = "unreachable"
    HOST_NOT_FOUND = "host_not_found"
    TIMEOUT = "timeout"
    OTHER = "other"


_WRITE_REFUSED = frozenset({RedisProblem.FULL, RedisProblem.PERSISTENCE, RedisProblem.READONLY})


def redacted_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs and messages): the one in the
    user part, also when it names several hosts (``redis+sentinel://:pw@h1:26379,h2:26379/m``),
    and the value of any query parameter ending in ``password`` (``?sentinel_password=...``)."""
    scheme, sep, rest = url.partition("://")
    # Up to the last '@', not urlsplit's host part: an unencoded / ? # in the password
    # would end that early and leave the rest of the password in the "path".
    userinfo, at, after = rest.rpartition("@")
    masked = url
    if sep and at and ":" in userinfo:
        masked = f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{after}"
    try:
        urlsplit(masked)
    except ValueError:
        return "<unparsable URL>"
    head, question, query = masked.partition("?")
    return head + question + _QUERY_PASSWORD.sub(r"\1***", query)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``raise ... from``, or raised while handling), a few deep."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 6:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _speaks(link: BaseException) -> bool:
    """A link that says what happened itself, not a wrapper raised ``from`` the real error
    (such as ``NotifierUnavailable``, which is also a ``ConnectionError``)."""
    return isinstance(link, rex.RedisError) or (
        isinstance(link, OSError | TimeoutError) and link.__cause__ is None
    )


def _classify_one(exc: BaseException) -> RedisProblem | None:
    if isinstance(exc, rex.OutOfMemoryError):
        return RedisProblem.FULL
    if isinstance(exc, rex.ReadOnlyError):
        return RedisProblem.READONLY
    if isinstance(exc, rex.AuthenticationError | rex.AuthenticationWrongNumberOfArgsError):
        return RedisProblem.AUTH
    if isinstance(exc, rex.NoPermissionError):
        return RedisProblem.NO_PERMISSION
    if isinstance(exc, rex.BusyLoadingError):
        return RedisProblem.LOADING
    if isinstance(exc, rex.ResponseError):
        # MISCONF and UNBLOCKED have no redis-py class; the code starts the reply.
        if _MISCONF.search(str(exc)):
            return RedisProblem.PERSISTENCE
        if _UNBLOCKED.search(str(exc)):  # "... instance state changed (master -> replica?)"
            return RedisProblem.READONLY
        return RedisProblem.OTHER
    if isinstance(exc, rex.TimeoutError | TimeoutError):  # socket.timeout is TimeoutError
        return RedisProblem.TIMEOUT
    if isinstance(exc, socket.gaierror):
        return RedisProblem.HOST_NOT_FOUND
    if isinstance(exc, OSError):
        return RedisProblem.UNREACHABLE
    return None  # look at what caused it


def classify_redis_error(exc: BaseException) -> RedisProblem:
    """The :class:`RedisProblem` behind ``exc`` (a redis-py error, an ``OSError``, a
    ``TimeoutError``, or an exception raised ``from`` one of them)."""
    for link in _chain(exc):
        problem = _classify_one(link) if _speaks(link) else None
        if problem is not None:
            return problem
    # A redis-py ConnectionError without an OSError under it (the server closed on us,
    # "max number of clients reached", ...): Redis cannot be used from here.
    if any(isinstance(link, rex.ConnectionError) for link in _chain(exc)):
        return RedisProblem.UNREACHABLE
    return RedisProblem.OTHER


def is_write_refused(exc: BaseException) -> bool:
    """True when Redis is up but refuses writes (OOM, MISCONF, READONLY): retrying soon on
    the same server will not help until a person acts, and it is not an outage."""
    return classify_redis_error(exc) in _WRITE_REFUSED


def command_not_run(exc: BaseException) -> bool:
    """True when Redis certainly did not run the command: it answered with an error (OOM,
    MISCONF, READONLY, NOAUTH, LOADING, ...) or no connection was made (refused, unknown
    host). False when it may have: no answer in time, or the connection broke after the
    command may have gone out."""
    for link in _chain(exc):
        if not _speaks(link):
            continue
        if isinstance(link, rex.ResponseError | rex.AuthenticationError | rex.BusyLoadingError):
            return True
        if isinstance(link, _NO_MASTER):  # the sentinels named no master: nothing was sent
            return True
        if isinstance(link, ConnectionRefusedError | socket.gaierror):
            return True
        if isinstance(link, rex.TimeoutError | TimeoutError):
            return False
    return False


def _redis_cause(exc: BaseException) -> BaseException:
    """The first redis-py error or OSError in the chain: its text says what Redis said."""
    for link in _chain(exc):
        if _speaks(link):
            return link
    return exc


def _detail(exc: BaseException, url: str | None) -> str:
    text = " ".join(str(_redis_cause(exc)).split()) or type(exc).__name__
    for secret in _secrets(url) if url else ():
        text = text.replace(secret, "***")
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    text = _QUERY_PASSWORD.sub(r"\1***", text)
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _secrets(url: str) -> list[str]:
    """The URL's password and the values of its ``...password=`` query parameters."""
    found = [_password(url) or ""]
    with contextlib.suppress(ValueError):
        found += [v for k, v in parse_qsl(urlsplit(url).query) if k.lower().endswith("password")]
    return sorted((secret for secret in found if secret), key=len, reverse=True)  # longest first


def _host(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def explain_redis_error(exc: BaseException, url: str | None = None) -> str:
    """One line: what Redis (or the network) said and what to do; ``url`` is shown redacted
    and its password never appears, even if the error text repeats it."""
    where = f"Redis at {redacted_url(url)}" if url else "Redis"
    problem = classify_redis_error(exc)
    detail = _detail(exc, url)
    match problem:
        case RedisProblem.FULL:
            return (
                f"{where} is full (OOM: maxmemory reached, policy noeviction): raise maxmemory"
                " or drain the queue (notifier stats / dead purge)"
            )
        case RedisProblem.PERSISTENCE:
            return (
                f"{where} refuses writes because persistence is failing (MISCONF): check its"
                " disk and the RDB/AOF settings (its log says why)"
            )
        case RedisProblem.READONLY:
            return (
                f"{where} is a read-only replica (READONLY): point NOTIFIER_REDIS_URL at the master"
            )
        case RedisProblem.AUTH:
            given = _password(url) if url else None
            if url is None:
                why = detail
            elif given:
                why = "wrong user or password"
            else:
                why = "it requires a password and none was given"
            return (
                f"{where} refused the password ({why}): set it in NOTIFIER_REDIS_URL ({_URL_FORM})"
            )
        case RedisProblem.NO_PERMISSION:
            return (
                f"{where} denied a command to this user (NOPERM: {detail}): grant it with"
                " ACL SETUSER or use another user in NOTIFIER_REDIS_URL"
            )
        case RedisProblem.LOADING:
            return (
                f"{where} is still loading its data set into memory (LOADING): wait until it"
                " has finished"
            )
        case RedisProblem.HOST_NOT_FOUND:
            host = _host(url)
            named = f"host {host!r}" if host else "host"
            return f"Redis {named} not found ({detail}): fix the host in NOTIFIER_REDIS_URL"
        case RedisProblem.TIMEOUT:
            return (
                f"{where} did not answer in time ({detail}): check that it runs and is not"
                " overloaded or stopped (redis-cli ping), or set NOTIFIER_REDIS_URL"
            )
        case RedisProblem.UNREACHABLE:
            return f"{where} unreachable ({detail}): start it or set NOTIFIER_REDIS_URL"
        case _:
            return f"{where} answered with an error: {detail}"
