"""One place that turns a Redis URL into a client, for every topology notifier runs on.

    client = sync_client(url, socket_timeout=0.5, socket_connect_timeout=0.5)   # producer
    client = async_client(url, socket_timeout=10, health_check_interval=30)      # worker
    describe(url)        # Topology: kind, hosts, service, db, TLS (no I/O; ValueError if bad)
    await inspect(url)   # what `notifier check` shows: master, replicas, lag, persistence

URL forms (``[[user]:password@]`` is optional everywhere; percent-encode ``@ : / ? #``
in a password):

=============  =========================================================================
standalone     ``redis://[[user]:password@]host:6379/0``, ``rediss://...`` (TLS),
               ``unix:///run/redis/redis.sock?db=0``: redis-py's own ``from_url``.
Sentinel       ``redis+sentinel://[[user]:password@]host1:26379[,host2:26379...]/service[/db]``
               ``rediss+sentinel://...`` TLS to the master, the replicas and the sentinels.
Cluster        ``redis+cluster://[[user]:password@]host:6379[,host:6379...][/0]``
               ``rediss+cluster://...`` TLS to every node.
=============  =========================================================================

The user and password of the URL are those of the master and replicas (Sentinel) or of the
nodes (Cluster). A host without a port gets 26379 (a sentinel) or 6379 (a cluster node).
Query parameters of the Sentinel and Cluster forms (any other is an error, so that a typo
is not silently ignored):

- ``sentinel_password``, ``sentinel_username`` (Sentinel only): the sentinels' own
  ``requirepass``/ACL user. Without them the sentinels are asked without a password, as
  redis-py does. Like the password, the value is never shown in a message or a log
  (:func:`producer.redis_errors.redacted_url` masks it).
- ``sentinel_tls`` (Sentinel only; ``yes``/``no``): TLS to the sentinels; default: the same
  as to the master (``rediss+`` yes, ``redis+`` no).
- ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` (paths), ``ssl_cert_reqs``
  (``none``/``optional``/``required``), ``ssl_check_hostname`` (``yes``/``no``): TLS
  settings of every connection, the sentinels' included; only with ``rediss+``.

Why a scheme of its own for Cluster, rather than ``redis://host?cluster=1``: the topology is
then visible in the setting and in every message that shows the URL, a list of seed nodes
has a natural place (a managed cluster's single configuration endpoint is a list of one),
and a Cluster URL given to an old notifier fails at once ("not a Redis URL") instead of
talking to one node as if it were a standalone Redis and failing later with MOVED.
Cluster has only database 0: ``/0`` or nothing.

Sentinel: :func:`sync_client` / :func:`async_client` return ``Sentinel(...).master_for(
service)``: a ``redis.Redis`` (``redis.asyncio.Redis``) whose pool asks the sentinels for
the master at every new connection and drops its connections when the master changes, so
one client follows a failover without being recreated. Closing it closes the sentinel
connections too. The sentinels get the caller's socket timeouts and retry object (never
redis-py's default retries: a lookup asks each sentinel once, the caller decides whether to
try again), and one master lookup has a time budget: the larger of the two socket timeouts.
A sentinel is asked only while the budget lasts (the first always), so a lookup lasts at
most the budget plus one sentinel's timeout, whatever the number of sentinels: with the
producer's 0.5 s a lookup ends within 1 s even if every sentinel is a black hole, and a
call (lookup, connect to the master, LPUSH) within 2 s. On loopback with the master killed
(connections refused, sentinels answering "down") every call during the election returns
within a few milliseconds: tests/test_topology.py measures it.

Cluster: ``redis.cluster.RedisCluster`` / ``redis.asyncio.cluster.RedisCluster`` with the
URL's nodes as startup nodes. A ``retry`` option becomes the cluster client's own retry
(redis-py refuses it as a node option). Note: the synchronous ``RedisCluster`` connects and
reads the slot map in its constructor (:func:`sync_client` turns "no node answers" into a
``redis.exceptions.ConnectionError``); the asyncio one does that at its first command. Both
may raise ``RedisClusterException``, which is not a ``RedisError``, when no node answers
later on: catch :data:`REDIS_ERRORS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
import redis.asyncio.sentinel as asentinel
import redis.cluster as scluster
import redis.sentinel as ssentinel
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url
from redis.exceptions import (
    AuthenticationError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from .redis_errors import _chain, redacted_url

__all__ = [
    "REDIS_ERRORS",
    "AsyncClient",
    "Kind",
    "SyncClient",
    "Topology",
    "async_client",
    "describe",
    "format_inspection",
    "inspect",
    "sync_client",
]

# What a call through any of these clients may raise when Redis cannot serve it: the cluster
# clients raise RedisClusterException (not a RedisError) when no node answers.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)
SyncClient: TypeAlias = "redis.Redis | scluster.RedisCluster"
AsyncClient: TypeAlias = "aredis.Redis | acluster.RedisCluster"
Address = tuple[str, int]

# redis-py leaves these untyped: named once here with the types we rely on.
_parse_url: Callable[[str], dict[str, Any]] = parse_url
_SyncNode: Callable[[str, int], Any] = scluster.ClusterNode
_AsyncNode: Callable[[str, int], Any] = acluster.ClusterNode

SENTINEL_PORT = 26379
REDIS_PORT = 6379
_FORMS = {
    "standalone": (
        "redis://[[user]:password@]host:6379/0, rediss://host:6380/0 (TLS) or "
        "unix:///run/redis/redis.sock?db=0"
    ),
    "sentinel": (
        "redis+sentinel://[[user]:password@]host1:26379[,host2:26379...]/service_name[/db]"
        "[?sentinel_password=...] (rediss+sentinel:// for TLS)"
    ),
    "cluster": (
        "redis+cluster://[[user]:password@]host:6379[,host:6379...][/0] (rediss+cluster:// for TLS)"
    ),
}
_SCHEMES = {
    "redis": "standalone",
    "rediss": "standalone",
    "unix": "standalone",
    "redis+sentinel": "sentinel",
    "rediss+sentinel": "sentinel",
    "redis+cluster": "cluster",
    "rediss+cluster": "cluster",
}
_TLS_PARAMS = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
_SENTINEL_PARAMS = frozenset({"sentinel_password", "sentinel_username", "sentinel_tls"})
_CERT_REQS = ("none", "optional", "required")
_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})
# The caller's options that the sentinels' own connections share (redis-py's default too).
_SENTINEL_SHARED = ("socket_connect_timeout", "socket_timeout", "socket_keepalive", "retry")


class Kind(StrEnum):
    STANDALONE = "standalone"
    SENTINEL = "sentinel"
    CLUSTER = "cluster"


@dataclass(frozen=True, slots=True)
class Topology:
    """What a URL says, without connecting. Secrets are kept out of ``repr``."""

    kind: Kind
    hosts: tuple[Address, ...]  # sentinels, cluster seeds, or the one server (empty: unix)
    db: int = 0
    tls: bool = False
    service: str | None = None  # Sentinel: the monitored master's name
    socket_path: str | None = None  # unix://
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    sentinel_tls: bool = False
    ssl: tuple[tuple[str, Any], ...] = ()  # ssl_* connection options from the URL
    url: str = field(default="", repr=False)

    @property
    def redacted(self) -> str:
        return redacted_url(self.url)

    def __str__(self) -> str:
        where = ", ".join(f"{h}:{p}" for h, p in self.hosts) or self.socket_path or "?"
        tls = " (TLS)" if self.tls else ""
        match self.kind:
            case Kind.SENTINEL:
                stls = (
                    ""
                    if self.sentinel_tls == self.tls
                    else (" (TLS)" if self.sentinel_tls else " (plain)")
                )
                return (
                    f"sentinel: service {self.service!r} db {self.db}{tls} from "
                    f"{len(self.hosts)} sentinel(s) {where}{stls}"
                )
            case Kind.CLUSTER:
                return f"cluster: {len(self.hosts)} seed node(s) {where}{tls}"
            case _:
                return f"standalone: {where} db {self.db}{tls}"


# ------------------------------------------------------------------------------- parsing
# Query parameters whose values a message may show (redis-py's own for a standalone URL,
# ours but the sentinel password): any other's value is masked, a misspelt
# ``sentinel_pasword=`` included.
_PLAIN_PARAMS = frozenset(
    {*URL_QUERY_ARGUMENT_PARSERS, *_TLS_PARAMS, "sentinel_tls", "sentinel_username", "path"}
)


def _shown(url: str) -> str:
    """``url`` as an error message shows it: the password masked, also when an unencoded
    ``/ ? #`` in it ends the host part early (everything from the user name to the last
    ``@`` is masked then), and the value of every query parameter not in
    :data:`_PLAIN_PARAMS`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return redacted_url(url)
    userinfo, at, rest = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:***@" if colon else userinfo + at
    rest, hash_sign, _ = rest.partition("#")
    before, question, query = rest.partition("?")
    params = []
    for param in query.split("&") if question else ():
        name, eq, value = param.partition("=")
        if value and unquote(name) not in _PLAIN_PARAMS:
            value = "***"
        params.append(name + eq + value)
    shown = f"{scheme}{sep}{userinfo}{before}{question}{'&'.join(params)}"
    return shown + (hash_sign + "***" if hash_sign else "")


def _malformed(url: str, kind: str, why: str) -> ValueError:
    return ValueError(f"{_shown(url)!r} {why}: use {_FORMS[kind]}")


def _scheme_of(url: str) -> str:
    if "://" not in url:
        shown = redacted_url(url) if "@" not in url else url.rpartition("@")[2]
        hint = "; did you mean redis://" + shown + "?" if shown and ":" in shown else ""
        raise ValueError(
            f"{shown!r} is not a Redis URL (no scheme){hint} use {_FORMS['standalone']}, "
            f"{_FORMS['sentinel']} or {_FORMS['cluster']}"
        )
    scheme = url.partition("://")[0].lower()
    if scheme not in _SCHEMES:
        close = difflib.get_close_matches(scheme, list(_SCHEMES), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}://?)" if close else ""
        raise ValueError(
            f"{_shown(url)!r} is not a Redis URL: unknown scheme {scheme}://{hint}; "
            f"use {_FORMS['standalone']}, {_FORMS['sentinel']} or {_FORMS['cluster']}"
        )
    return scheme


def _flag(url: str, kind: str, name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise _malformed(url, kind, f"has {name}={value!r} (give yes or no)")


def _hosts(url: str, kind: str, hostlist: str, default_port: int) -> tuple[Address, ...]:
    found: list[Address] = []
    for item in hostlist.split(","):
        item = item.strip()
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else rest
            if rest and not rest.startswith(":"):
                raise _malformed(url, kind, f"has a bad host {item!r}")
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise _malformed(url, kind, "names no host" if not hostlist else "has an empty host")
        if not port_text:
            port = default_port
        elif port_text.isdigit() and 0 < int(port_text) < 65536:
            port = int(port_text)
        else:
            raise _malformed(url, kind, f"has a bad port {port_text!r} for host {host!r}")
        found.append((host, port))
    return tuple(found)


def _query(url: str, kind: str, query: str, allowed: frozenset[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            known = ", ".join(sorted(allowed))
            raise _malformed(url, kind, f"has an unknown parameter {name!r}{hint}; known: {known}")
        if name in params:
            raise _malformed(url, kind, f"gives {name} twice")
        params[name] = value
    return params


def _ssl_options(url: str, kind: str, params: Mapping[str, str], tls: bool) -> dict[str, Any]:
    given = {k: v for k, v in params.items() if k in _TLS_PARAMS}
    if given and not tls:
        raise _malformed(url, kind, f"sets {min(given)} without TLS (use rediss+{kind}://)")
    options: dict[str, Any] = dict(given)
    reqs = options.get("ssl_cert_reqs")
    if reqs is not None and reqs.lower() not in _CERT_REQS:
        raise _malformed(url, kind, f"has ssl_cert_reqs={reqs!r} (give {'/'.join(_CERT_REQS)})")
    if reqs is not None:
        options["ssl_cert_reqs"] = reqs.lower()
    if "ssl_check_hostname" in options:
        options["ssl_check_hostname"] = _flag(
            url, kind, "ssl_check_hostname", options["ssl_check_hostname"]
        )
    return options


def _userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    """(username, password, the host list) of a netloc that may list several hosts."""
    userinfo, at, hostlist = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if colon else None, hostlist


def _describe_standalone(url: str) -> Topology:
    try:
        options = _parse_url(url)
        if "path" not in options:  # redis-py only checks the scheme: check the rest
            parts = urlsplit(url)
            _ = parts.port
            if not parts.hostname:
                raise ValueError("no host")
            db_path = unquote(parts.path).strip("/")
            if db_path and not db_path.isdigit():
                raise ValueError("bad db")
    except ValueError:
        raise _malformed(url, "standalone", "is not a valid Redis URL") from None
    path = options.get("path")
    return Topology(
        kind=Kind.STANDALONE,
        hosts=() if path else ((str(options["host"]), int(options.get("port", REDIS_PORT))),),
        db=int(options.get("db", 0) or 0),
        tls=url.lower().startswith("rediss://"),
        socket_path=path,
        username=options.get("username"),
        password=options.get("password"),
        url=url,
    )


def describe(url: str) -> Topology:
    """The :class:`Topology` of ``url``; ``ValueError`` with one line showing the right form
    when it is malformed. The line masks the password (also one whose unencoded ``/ ? #``
    broke the URL) and the value of every query parameter that could be a secret (a
    misspelt ``sentinel_pasword=`` included). No I/O."""
    url = url.strip()
    scheme = _scheme_of(url)
    kind = _SCHEMES[scheme]
    if kind == "standalone":
        return _describe_standalone(url)
    tls = scheme.startswith("rediss")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _malformed(url, kind, "cannot be parsed") from None
    if parts.fragment:
        raise _malformed(url, kind, "has a '#' (percent-encode it as %23 in a password)")
    username, password, hostlist = _userinfo(parts.netloc)
    default_port = SENTINEL_PORT if kind == "sentinel" else REDIS_PORT
    try:
        hosts = _hosts(url, kind, hostlist, default_port)
    except ValueError:
        if "@" in parts.netloc or "@" not in url:
            raise
        # "user:pa/ss@host": the host part ended at the '/', so its "port" is the password
        raise _malformed(
            url, kind, "has an '@' after its host part (percent-encode / ? # in a password)"
        ) from None
    allowed = _TLS_PARAMS | (_SENTINEL_PARAMS if kind == "sentinel" else frozenset())
    params = _query(url, kind, parts.query, allowed)
    ssl = _ssl_options(url, kind, params, tls)
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    while segments and segments[-1] == "":
        segments.pop()
    if kind == "cluster":
        if segments not in ([], ["0"]):
            raise _malformed(url, kind, "names a database other than 0 (Cluster has only 0)")
        return Topology(
            kind=Kind.CLUSTER,
            hosts=hosts,
            tls=tls,
            username=username,
            password=password,
            ssl=tuple(sorted(ssl.items())),
            url=url,
        )
    if not segments or not segments[0]:
        raise _malformed(url, kind, "names no service (the master's name in sentinel.conf)")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise _malformed(url, kind, f"has a bad database {'/'.join(segments[1:])!r}")
    sentinel_tls = tls
    if "sentinel_tls" in params:
        sentinel_tls = _flag(url, kind, "sentinel_tls", params["sentinel_tls"])
    return Topology(
        kind=Kind.SENTINEL,
        hosts=hosts,
        db=int(segments[1]) if len(segments) == 2 else 0,
        tls=tls,
        service=segments[0],
        username=username,
        password=password,
        sentinel_username=params.get("sentinel_username") or None,
        sentinel_password=params.get("sentinel_password") or None,
        sentinel_tls=sentinel_tls,
        ssl=tuple(sorted(ssl.items())),
        url=url,
    )


# ------------------------------------------------------------------ Sentinel: the lookup
def _label(client: redis.Redis | aredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


def _state(raw: object) -> Mapping[str, Any]:
    """SENTINEL MASTER's reply as redis-py parses it (typed loosely by redis-py)."""
    assert isinstance(raw, dict)
    return raw


def _sentinel_failure(exc: BaseException, service: str) -> str:
    """Why asking a sentinel about ``service`` failed, in a few words (after its address)."""
    if isinstance(exc, AuthenticationError):
        return "refused the sentinel password (sentinel_password=...)"
    if any(isinstance(link, ssl.SSLCertVerificationError) for link in _chain(exc)):
        # redis-py's text is cut below before it says why: name the setting instead
        return "has a TLS certificate that ssl_ca_certs does not trust"
    if isinstance(exc, ResponseError) and "no such master" in str(exc).lower():
        return f"does not monitor {service!r}"
    return " ".join(str(exc).split())[:80] or type(exc).__name__


def _master_up(state: Mapping[str, Any]) -> bool:
    """A sentinel's SENTINEL MASTER reply says the master is up (as redis-py's
    ``check_master_state`` with no minimum of other sentinels)."""
    return bool(state.get("is_master") and not state.get("is_sdown") and not state.get("is_odown"))


class _Lookup:
    """One master lookup across the sentinels: the time budget and what each one said."""

    def __init__(self, service: str, budget_s: float | None) -> None:
        self.service = service
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.notes: list[str] = []
        self.cause: BaseException | None = None

    def may_ask(self, number: int) -> bool:
        """The first sentinel is always asked; the others while the budget lasts."""
        if number == 0 or self.deadline is None or time.monotonic() < self.deadline:
            return True
        self.notes.append("time budget spent")
        return False

    def failed(self, where: str, exc: BaseException) -> None:
        self.cause = exc
        self.notes.append(f"{where} {_sentinel_failure(exc, self.service)}")

    def answer(self, where: str, state: Mapping[str, Any]) -> Address | None:
        """The master's address if this sentinel sees it up, else None (noted)."""
        if _master_up(state):
            return str(state["ip"]), int(state["port"])
        self.notes.append(f"{where} sees it down ({state.get('flags', '?')}; failover under way?)")
        return None

    def error(self, cls: type[Exception]) -> Exception:
        error = cls(f"no master for service {self.service!r}: {'; '.join(self.notes)}")
        error.__cause__ = self.cause
        return error


class _Sentinel(ssentinel.Sentinel):
    """redis-py's Sentinel with a bounded lookup that says what each sentinel answered."""

    lookup_budget_s: float | None = None

    def discover_master(self, service_name: str) -> Address:
        lookup = _Lookup(service_name, self.lookup_budget_s)
        for number, sentinel in enumerate(list(self.sentinels)):
            if not lookup.may_ask(number):
                break
            try:
                state = _state(sentinel.sentinel_master(service_name))
            except (RedisError, OSError) as exc:
                lookup.failed(_label(sentinel), exc)
                continue
            address = lookup.answer(_label(sentinel), state)
            if address is not None:  # ask this one first next time (as redis-py does)
                self.sentinels.remove(sentinel)
                self.sentinels.insert(0, sentinel)
                return address
        raise lookup.error(ssentinel.MasterNotFoundError)


class _AsyncSentinel(asentinel.Sentinel):
    """The asyncio twin of :class:`_Sentinel`."""

    lookup_budget_s: float | None = None

    async def discover_master(self, service_name: str) -> Address:
        lookup = _Lookup(service_name, self.lookup_budget_s)
        for number, sentinel in enumerate(list(self.sentinels)):
            if not lookup.may_ask(number):
                break
            try:
                state = _state(await sentinel.sentinel_master(service_name))
            except (RedisError, OSError, TimeoutError) as exc:
                lookup.failed(_label(sentinel), exc)
                continue
            address = lookup.answer(_label(sentinel), state)
            if address is not None:
                self.sentinels.remove(sentinel)
                self.sentinels.insert(0, sentinel)
                return address
        raise lookup.error(asentinel.MasterNotFoundError)


class _SentinelMaster(redis.Redis):
    """The master client of a Sentinel URL; closing it also closes the sentinel clients."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
                sentinel.close()


class _AsyncSentinelMaster(aredis.Redis):
    """The asyncio master client of a Sentinel URL; ``aclose`` closes the sentinels too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            # (each sentinel client in turn, as the sync close does: Sentinel.aclose() is
            # redis-py 8.1's, and older versions are allowed)
            for sentinel in self.connection_pool.sentinel_manager.sentinels:  # type: ignore[attr-defined]
                await sentinel.aclose()


# redis-py leaves the Sentinel constructors untyped: named once here with their types.
_new_sentinel: Callable[..., _Sentinel] = _Sentinel
_new_async_sentinel: Callable[..., _AsyncSentinel] = _AsyncSentinel


def _sentinel_parts(
    topo: Topology, options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], float | None]:
    """(the master's connection options, the sentinels', the lookup budget)."""
    ssl = dict(topo.ssl)
    node: dict[str, Any] = {"username": topo.username, "password": topo.password}
    if topo.tls:
        node.update(ssl=True, **ssl)
    node.update(options)
    node["db"] = topo.db
    sentinel: dict[str, Any] = {k: options[k] for k in _SENTINEL_SHARED if k in options}
    sentinel.setdefault("retry", Retry(NoBackoff(), 0))
    sentinel.update(username=topo.sentinel_username, password=topo.sentinel_password)
    if topo.sentinel_tls:
        sentinel.update(ssl=True, **ssl)
    timeouts = [options.get(k) for k in ("socket_connect_timeout", "socket_timeout")]
    budget = max((float(t) for t in timeouts if t is not None), default=None)
    return node, sentinel, budget


def _cluster_options(topo: Topology, options: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {"username": topo.username, "password": topo.password}
    if topo.tls:
        merged.update(ssl=True, **dict(topo.ssl))
    merged.update(options)
    merged.pop("db", None)
    return merged


# ------------------------------------------------------------------------------ clients
def sync_client(url: str, **options: Any) -> SyncClient:
    """A synchronous client of ``url`` (see the module docstring for the forms); ``options``
    are redis-py's connection options (socket timeouts, ``retry``, ``decode_responses``...)."""
    topo = describe(url)
    if topo.kind == Kind.STANDALONE:
        return redis.Redis.from_url(topo.url, **options)
    if topo.kind == Kind.CLUSTER:
        nodes = [_SyncNode(host, port) for host, port in topo.hosts]
        try:
            return scluster.RedisCluster(startup_nodes=nodes, **_cluster_options(topo, options))
        except RedisClusterException as exc:  # no node answered: an error callers catch
            raise RedisConnectionError(str(exc)) from exc
    node, sentinel_kwargs, budget = _sentinel_parts(topo, options)
    manager = _new_sentinel(list(topo.hosts), sentinel_kwargs=sentinel_kwargs)
    manager.lookup_budget_s = budget
    assert topo.service is not None
    master_for: Callable[..., redis.Redis] = manager.master_for  # untyped in redis-py
    return master_for(topo.service, redis_class=_SentinelMaster, **node)


def async_client(url: str, **options: Any) -> AsyncClient:
    """The asyncio counterpart of :func:`sync_client` (no I/O until the first command)."""
    topo = describe(url)
    if topo.kind == Kind.STANDALONE:
        return aredis.Redis.from_url(topo.url, **options)
    if topo.kind == Kind.CLUSTER:
        nodes = [_AsyncNode(host, port) for host, port in topo.hosts]
        return acluster.RedisCluster(startup_nodes=nodes, **_cluster_options(topo, options))
    node, sentinel_kwargs, budget = _sentinel_parts(topo, options)
    manager = _new_async_sentinel(list(topo.hosts), sentinel_kwargs=sentinel_kwargs)
    manager.lookup_budget_s = budget
    assert topo.service is not None
    client: aredis.Redis = manager.master_for(
        topo.service, redis_class=_AsyncSentinelMaster, **node
    )
    return client


# ----------------------------------------------------------------------- inspection
_SLOTS = 16384
_LAG_WARN_S = 10  # a replica that has not acknowledged for this long is falling behind


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _node(run: Callable[..., Awaitable[Any]], address: str) -> dict[str, Any]:
    """One server's role, persistence and replicas (with their lag), from INFO (and CONFIG
    GET where allowed: managed services often refuse it)."""
    repl = await run("INFO", "replication")
    pers = await run("INFO", "persistence")
    config: dict[str, str] = {}
    with contextlib.suppress(ResponseError):  # one round trip for every parameter (Redis 7)
        raw = await run("CONFIG GET", "appendfsync", "save", "maxmemory-policy", "maxmemory")
        config = {_text(k): _text(v) for k, v in dict(raw).items()}
    master_offset = int(repl.get("master_repl_offset", 0))
    replicas = []
    for n in range(int(repl.get("connected_slaves", 0))):
        entry = repl.get(f"slave{n}")
        if not isinstance(entry, dict):
            continue
        offset = int(entry.get("offset", 0))
        replicas.append(
            {
                "address": f"{entry.get('ip')}:{entry.get('port')}",
                "state": str(entry.get("state", "?")),
                "offset": offset,
                "lag_bytes": max(0, master_offset - offset),
                "lag_s": int(entry.get("lag", 0)),
            }
        )
    saved = pers.get("rdb_last_save_time")
    return {
        "address": address,
        "role": str(repl.get("role", "?")),
        "replication_offset": master_offset,
        "persistence": {
            "aof": bool(int(pers.get("aof_enabled", 0))),
            "appendfsync": config.get("appendfsync"),
            "rdb_save": config.get("save"),  # None: CONFIG refused; "": no snapshots
            "rdb_last_save_age_s": int(time.time() - int(saved)) if saved else None,
            "rdb_changes_since_last_save": int(pers.get("rdb_changes_since_last_save", 0)),
            "rdb_last_bgsave_ok": pers.get("rdb_last_bgsave_status", "ok") == "ok",
            "aof_last_write_ok": pers.get("aof_last_write_status", "ok") == "ok",
            "loading": bool(int(pers.get("loading", 0))),
        },
        "eviction": {  # None: CONFIG refused
            "policy": config.get("maxmemory-policy"),
            "maxmemory": config.get("maxmemory"),
        },
        "replicas": replicas,
    }


async def _sentinel_view(sentinel: aredis.Redis, service: str) -> dict[str, Any]:
    where = _label(sentinel)
    try:
        state = _state(await sentinel.sentinel_master(service))
    except (RedisError, OSError) as exc:  # (TimeoutError is an OSError)
        return {"address": where, "ok": False, "error": _sentinel_failure(exc, service)}
    return {
        "address": where,
        "ok": True,
        "master": f"{state.get('ip')}:{state.get('port')}",
        "master_up": _master_up(state),
        "flags": str(state.get("flags", "")),
        "quorum": int(state.get("quorum", 0)),
        "other_sentinels": int(state.get("num-other-sentinels", 0)),
        "replicas": int(state.get("num-slaves", 0)),
    }


async def _inspect_sentinel(client: aredis.Redis, report: dict[str, Any]) -> None:
    pool = client.connection_pool
    manager: _AsyncSentinel = pool.sentinel_manager  # type: ignore[attr-defined]
    service: str = pool.service_name  # type: ignore[attr-defined]
    report["service"] = service
    report["sentinels"] = list(
        await asyncio.gather(*(_sentinel_view(s, service) for s in manager.sentinels))
    )
    host, port = await pool.get_master_address()  # type: ignore[attr-defined]
    report["masters"] = [await _node(client.execute_command, f"{host}:{port}")]


async def _inspect_cluster(client: acluster.RedisCluster, report: dict[str, Any]) -> None:
    info = await client.cluster_info()
    report["cluster"] = {
        "state": str(info.get("cluster_state")),
        "slots_ok": int(info.get("cluster_slots_ok", 0)),
        "known_nodes": int(info.get("cluster_known_nodes", 0)),
    }
    masters = []
    for node in client.get_primaries():

        async def run(*args: Any, _node: Any = node) -> Any:
            return await client.execute_command(*args, target_nodes=_node)

        masters.append(await _node(run, f"{node.host}:{node.port}"))
    report["masters"] = masters


def _problems(report: dict[str, Any]) -> list[str]:
    """What `notifier check` should warn about, one line each."""
    out: list[str] = []
    sentinels = report.get("sentinels", [])
    answering = [s for s in sentinels if s["ok"]]
    for s in sentinels:
        if not s["ok"]:
            out.append(f"sentinel {s['address']} {s['error']}")
    if sentinels and answering:
        quorum = max(s["quorum"] for s in answering)
        if len(answering) < quorum:
            out.append(
                f"only {len(answering)} of {len(sentinels)} sentinels answer, quorum {quorum}: "
                "no failover is possible"
            )
        if len({s["master"] for s in answering}) > 1:
            out.append("the sentinels name different masters (a failover under way?)")
    cluster = report.get("cluster")
    if cluster and (cluster["state"] != "ok" or cluster["slots_ok"] < _SLOTS):
        out.append(f"cluster state {cluster['state']}, {cluster['slots_ok']}/{_SLOTS} slots ok")
    for master in report.get("masters", []):
        where = master["address"]
        if master["role"] != "master":
            out.append(f"{where} is a {master['role']}, not a master: writes fail (READONLY)")
        p = master["persistence"]
        if p["rdb_save"] is None:
            out.append(
                f"{where}: CONFIG GET refused (a managed Redis?): make sure it persists (AOF) "
                "and never evicts"
            )
        elif not p["aof"] and p["rdb_save"] == "":
            out.append(f"{where}: no persistence (no AOF, no RDB save): a restart loses the queue")
        elif not p["aof"]:
            out.append(
                f"{where}: RDB only: a crash loses alerts queued since the last snapshot; set "
                "appendonly yes (deploy/redis-notifier.conf)"
            )
        policy, maxmemory = master["eviction"]["policy"], master["eviction"]["maxmemory"]
        if policy is not None and (
            (policy != "noeviction" and maxmemory not in (None, "0"))
            or policy.startswith("allkeys")
        ):
            out.append(
                f"{where}: maxmemory-policy {policy} may evict queued alerts; use noeviction"
            )
        if not p["rdb_last_bgsave_ok"] or not p["aof_last_write_ok"]:
            out.append(f"{where}: persistence is failing (writes will get MISCONF): see its log")
        if report["topology"] == Kind.SENTINEL and not master["replicas"]:
            out.append(f"{where} has no replica: a failover has nothing to promote")
        for replica in master["replicas"]:
            if replica["state"] != "online" or replica["lag_s"] >= _LAG_WARN_S:
                out.append(
                    f"replica {replica['address']} of {where}: {replica['state']}, last ack "
                    f"{replica['lag_s']} s ago, {replica['lag_bytes']} bytes behind"
                )
    return out


async def inspect(target: str | AsyncClient, *, timeout: float = 2.0) -> dict[str, Any]:
    """What ``notifier check`` shows about Redis: the topology, each master with its
    persistence and its replicas' lag (bytes behind the master's replication offset, and
    seconds since the replica's last acknowledgement), the sentinels' view (Sentinel), the
    cluster's state (Cluster), and ``problems``: one line per thing to warn about.

    ``target`` is a URL (a client is made with ``timeout`` and closed) or an asyncio client
    from :func:`async_client` / ``redis.asyncio.Redis``. Redis errors (the master cannot be
    found or reached) are raised: :func:`producer.explain_redis_error` says them in one line.
    """
    if isinstance(target, str):
        client = async_client(
            target,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return await inspect(client, timeout=timeout)
        finally:
            await client.aclose()
    report: dict[str, Any]
    if isinstance(target, acluster.RedisCluster):
        report = {"topology": Kind.CLUSTER}
        await _inspect_cluster(target, report)
    elif isinstance(target.connection_pool, asentinel.SentinelConnectionPool):
        report = {"topology": Kind.SENTINEL}
        await _inspect_sentinel(target, report)
    else:
        kwargs = target.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        report = {"topology": Kind.STANDALONE}
        report["masters"] = [await _node(target.execute_command, str(where))]
    report["problems"] = _problems(report)
    return report


def _persistence_text(p: Mapping[str, Any]) -> str:
    aof = f"AOF on (appendfsync {p['appendfsync'] or '?'})" if p["aof"] else "AOF off"
    if p["rdb_save"] is None:
        rdb = "RDB save unknown (CONFIG refused)"
    else:
        rdb = f"RDB save {p['rdb_save']!r}" if p["rdb_save"] else "no RDB save"
    return f"{aof}, {rdb}"


def format_inspection(report: Mapping[str, Any]) -> list[str]:
    """:func:`inspect`'s report as lines for ``notifier check`` (problems as ``WARNING``)."""
    lines: list[str] = []
    kind = report["topology"]
    if kind == Kind.SENTINEL:
        sentinels: Sequence[Mapping[str, Any]] = report["sentinels"]
        answering = [s for s in sentinels if s["ok"]]
        quorum = max((s["quorum"] for s in answering), default=0)
        lines.append(
            f"topology sentinel: service {report['service']!r}, {len(answering)}/"
            f"{len(sentinels)} sentinel(s) answer, quorum {quorum}"
        )
    elif kind == Kind.CLUSTER:
        c = report["cluster"]
        lines.append(
            f"topology cluster: state {c['state']}, {c['slots_ok']}/{_SLOTS} slots ok, "
            f"{c['known_nodes']} node(s), {len(report['masters'])} master(s)"
        )
    else:
        lines.append("topology standalone")
    for master in report["masters"]:
        lines.append(
            f"{master['role']} {master['address']}: {_persistence_text(master['persistence'])}"
        )
        for r in master["replicas"]:
            lines.append(
                f"  replica {r['address']}: {r['state']}, {r['lag_bytes']} bytes behind, "
                f"last ack {r['lag_s']} s ago"
            )
    lines += [f"WARNING: {problem}" for problem in report["problems"]]
    return lines
