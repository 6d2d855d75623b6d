"""producer/topology.py: one Redis URL, a client for standalone, Sentinel or Cluster.

No I/O first: :func:`describe` for every URL form, its one-line errors, and that no password
(the URL's nor ``sentinel_password``) ever shows. Then against real servers started here
(worker/devtools/redis_topology.py, each in its own directory on free loopback ports): a
Sentinel set with both passwords (master, replica, three sentinels) and a three-master
Cluster. The kill-and-failover tests start a Sentinel set of their own, so the shared one
keeps its master.

Timeouts are the producer's (0.5 s, no retries) unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.redis_errors import redacted_url
from producer.topology import (
    REDIS_ERRORS,
    Kind,
    async_client,
    describe,
    format_inspection,
    inspect,
    sync_client,
)
from worker.devtools.redis_topology import ClusterSet, SentinelSet

# Distinctive, so that a leak anywhere is found by a substring search.
PASSWORD = "pw-Master-7f3a"
SENTINEL_PASSWORD = "pw-Sentinel-91cd"
SECRETS = (PASSWORD, SENTINEL_PASSWORD)
TIMEOUT_S = 0.5


def fast() -> dict[str, Any]:
    """The producer's connection options: 0.5 s socket timeouts, no retries."""
    return {
        "socket_timeout": TIMEOUT_S,
        "socket_connect_timeout": TIMEOUT_S,
        "retry": Retry(NoBackoff(), 0),
    }


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a password shows in {text!r}"


def error_texts(exc: BaseException) -> str:
    """str and repr of an error and of every error in its chain."""
    parts: list[str] = []
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        parts += [str(link), repr(link)]
        link = link.__cause__ or link.__context__
    return "\n".join(parts)


def sentinel_url(
    ports: list[int], *, service: str = "mymaster", sentinel_password: str | None
) -> str:
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    query = f"?sentinel_password={sentinel_password}" if sentinel_password else ""
    return f"redis+sentinel://:{PASSWORD}@{hosts}/{service}/0{query}"


# -- fixtures ----------------------------------------------------------------------------


def _sentinel_set(directory: Path) -> SentinelSet:
    return SentinelSet(directory, password=PASSWORD, sentinel_password=SENTINEL_PASSWORD)


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """Shared by the module: never killed."""
    with _sentinel_set(tmp_path_factory.mktemp("sentinel-set")) as servers:
        yield servers


@pytest.fixture
def own_sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    """A set of the test's own, for the tests that kill its master."""
    with _sentinel_set(tmp_path / "sentinel-set") as servers:
        yield servers


@pytest.fixture(scope="module")
def cluster_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSet]:
    with ClusterSet(tmp_path_factory.mktemp("cluster-set")) as servers:
        yield servers


@pytest.fixture
def black_holes() -> Iterator[list[int]]:
    """Three loopback ports that accept connections (the kernel's backlog) and never answer."""
    socks = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            socks.append(sock)
        yield [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


# -- describe: every form ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected", "text"),
    [
        (
            "redis://:pw@localhost:6379/2",
            {"kind": Kind.STANDALONE, "hosts": (("localhost", 6379),), "db": 2, "tls": False},
            "standalone: localhost:6379 db 2",
        ),
        (
            "rediss://alice:pw@cache.example:6380/0",
            {"kind": Kind.STANDALONE, "hosts": (("cache.example", 6380),), "tls": True},
            "standalone: cache.example:6380 db 0 (TLS)",
        ),
        (
            "redis://h",
            {"kind": Kind.STANDALONE, "hosts": (("h", 6379),), "db": 0, "password": None},
            "standalone: h:6379 db 0",
        ),
        (
            "unix:///run/redis/redis.sock?db=3",
            {"kind": Kind.STANDALONE, "hosts": (), "socket_path": "/run/redis/redis.sock", "db": 3},
            "standalone: /run/redis/redis.sock db 3",
        ),
        (
            "  redis+sentinel://:pw@s1:26380,s2,[::1]:26381/mymaster/4?sentinel_password=sp  ",
            {
                "kind": Kind.SENTINEL,
                "hosts": (("s1", 26380), ("s2", 26379), ("::1", 26381)),
                "service": "mymaster",
                "db": 4,
                "tls": False,
                "sentinel_tls": False,
                "password": "pw",
                "sentinel_password": "sp",
            },
            "sentinel: service 'mymaster' db 4 from 3 sentinel(s) s1:26380, s2:26379, ::1:26381",
        ),
        (
            "redis+sentinel://s1/mymaster",
            {"kind": Kind.SENTINEL, "hosts": (("s1", 26379),), "db": 0, "password": None},
            "sentinel: service 'mymaster' db 0 from 1 sentinel(s) s1:26379",
        ),
        (
            "redis+sentinel://bob:p%40ss@s1/m/?sentinel_username=sen&sentinel_password=x%26y",
            {"username": "bob", "password": "p@ss", "sentinel_username": "sen"},
            "sentinel: service 'm' db 0 from 1 sentinel(s) s1:26379",
        ),
        (
            "rediss+sentinel://s1/m?ssl_cert_reqs=NONE&ssl_check_hostname=no",
            {
                "tls": True,
                "sentinel_tls": True,
                "ssl": (("ssl_cert_reqs", "none"), ("ssl_check_hostname", False)),
            },
            "sentinel: service 'm' db 0 (TLS) from 1 sentinel(s) s1:26379",
        ),
        (
            "rediss+sentinel://s1/m?sentinel_tls=no",
            {"tls": True, "sentinel_tls": False},
            "sentinel: service 'm' db 0 (TLS) from 1 sentinel(s) s1:26379 (plain)",
        ),
        (
            "redis+sentinel://s1/m?sentinel_tls=yes",
            {"tls": False, "sentinel_tls": True},
            "sentinel: service 'm' db 0 from 1 sentinel(s) s1:26379 (TLS)",
        ),
        (
            "redis+cluster://:pw@n1:7000,n2/0",
            {"kind": Kind.CLUSTER, "hosts": (("n1", 7000), ("n2", 6379)), "db": 0, "tls": False},
            "cluster: 2 seed node(s) n1:7000, n2:6379",
        ),
        (
            "redis+cluster://n1",
            {"kind": Kind.CLUSTER, "hosts": (("n1", 6379),), "service": None},
            "cluster: 1 seed node(s) n1:6379",
        ),
        (
            "rediss+cluster://n1:7000?ssl_ca_certs=/etc/ca.pem",
            {"kind": Kind.CLUSTER, "tls": True, "ssl": (("ssl_ca_certs", "/etc/ca.pem"),)},
            "cluster: 1 seed node(s) n1:7000 (TLS)",
        ),
        (
            "REDIS+CLUSTER://n1/",
            {"kind": Kind.CLUSTER, "hosts": (("n1", 6379),)},
            "cluster: 1 seed node(s) n1:6379",
        ),
    ],
)
def test_describe_every_form(url: str, expected: dict[str, Any], text: str) -> None:
    topo = describe(url)
    for name, value in expected.items():
        assert getattr(topo, name) == value, name
    assert str(topo) == text
    assert topo.url == url.strip()


# -- describe: mistakes, in one line -----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:6379", ["unknown scheme http://", "use redis://"]),
        ("redis+sentinal://s1/m", ["unknown scheme", "did you mean redis+sentinel://?"]),
        ("rediss+clustr://n1", ["did you mean rediss+cluster://?"]),
        ("localhost:6379", ["no scheme", "did you mean redis://localhost:6379?"]),
        ("redis+sentinel://s1,s2", ["names no service", "/service_name[/db]"]),
        ("redis+sentinel://s1/", ["names no service"]),
        ("redis+sentinel://s1/m/x", ["bad database 'x'"]),
        ("redis+sentinel://s1/m/1/2", ["bad database '1/2'"]),
        ("redis+sentinel://s1:99999/m", ["bad port '99999' for host 's1'"]),
        ("redis+sentinel://s1,,s2/m", ["empty host"]),
        (
            "redis+sentinel://s1/m?sentinel_pasword=x",
            ["unknown parameter 'sentinel_pasword'", "did you mean sentinel_password?", "known: "],
        ),
        ("redis+sentinel://s1/m?socket_timeout=1", ["unknown parameter 'socket_timeout'"]),
        ("redis+cluster://n1?sentinel_password=x", ["unknown parameter 'sentinel_password'"]),
        ("redis+cluster://n1?ssl_ca_cert=/ca", ["did you mean ssl_ca_certs?"]),
        ("redis+sentinel://s1/m?sentinel_tls=yes&sentinel_tls=no", ["gives sentinel_tls twice"]),
        ("redis+sentinel://s1/m?sentinel_tls=maybe", ["sentinel_tls='maybe' (give yes or no)"]),
        ("redis+cluster://n1/1", ["database other than 0 (Cluster has only 0)"]),
        ("redis+cluster://n1/0/1", ["database other than 0"]),
        (
            "redis+sentinel://s1/m?ssl_ca_certs=/ca",
            ["ssl_ca_certs without TLS", "rediss+sentinel://"],
        ),
        ("redis+cluster://n1?ssl_certfile=/c", ["ssl_certfile without TLS", "rediss+cluster://"]),
        ("rediss+cluster://n1?ssl_cert_reqs=maybe", ["(give none/optional/required)"]),
        ("redis://h:port/0", ["is not a valid Redis URL", "use redis://"]),
        ("redis://h/abc", ["is not a valid Redis URL"]),
    ],
)
def test_describe_mistakes_are_one_line(url: str, says: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        describe(url)
    message = str(info.value)
    assert "\n" not in message
    for part in says:
        assert part in message
    assert info.value.__cause__ is None  # no chained parser traceback to show


# -- redaction ---------------------------------------------------------------------------

FULL_URL = (
    f"redis+sentinel://app:{PASSWORD}@s1:26379,s2:26379/mymaster/0"
    f"?sentinel_username=sen&sentinel_password={SENTINEL_PASSWORD}"
)


def test_topology_shows_no_password() -> None:
    topo = describe(FULL_URL)
    assert (topo.password, topo.sentinel_password) == SECRETS  # kept, for the client
    for shown in (str(topo), repr(topo), topo.redacted, redacted_url(FULL_URL)):
        assert_no_secret(shown)
    assert topo.redacted.count("***") == 2
    assert "app:***@s1:26379,s2:26379/mymaster/0" in topo.redacted
    assert "sentinel_username=sen" in topo.redacted  # what is no secret stays readable
    cluster = describe(f"rediss+cluster://app:{PASSWORD}@n1,n2")
    assert_no_secret(str(cluster) + repr(cluster) + cluster.redacted)


@pytest.mark.parametrize(
    "url",
    [
        f"redis+sentinal://:{PASSWORD}@s1/m",  # bad scheme
        f"htp://:{PASSWORD}@s1/m",
        f":{PASSWORD}@localhost:6379",  # no scheme
        f"redis+sentinel://:{PASSWORD}@s1,s2?sentinel_password={SENTINEL_PASSWORD}",  # no service
        f"redis+sentinel://:{PASSWORD}@s1/m?sentinel_password={SENTINEL_PASSWORD}&x=1",
        # a typo in the parameter's name must not show its value
        f"redis+sentinel://:{PASSWORD}@s1/m?sentinel_pasword={SENTINEL_PASSWORD}",
        f"redis+sentinel://:{PASSWORD}@s1/m?sentinel_password={SENTINEL_PASSWORD}"
        f"&sentinel_password={SENTINEL_PASSWORD}",
        f"redis+cluster://:{PASSWORD}@n1/3",
        f"redis+cluster://:{PASSWORD}@n1?ssl_ca_certs=/ca&pass={SENTINEL_PASSWORD}",
        f"redis+sentinel://:{PASSWORD}@s1:0/m",
        f"redis://:{PASSWORD}@h:port/0",
        f"redis://:{PASSWORD}@h/0?passwd={SENTINEL_PASSWORD}&db=x",
        # an unencoded '#' ends the host part early: the password is still masked
        f"redis+sentinel://:{PASSWORD}#1@s1/m",
        f"redis://:{PASSWORD}#1@h:6379/0",
        f"redis+cluster://u:{PASSWORD}?x@n1",
    ],
)
def test_errors_show_no_password(url: str) -> None:
    with pytest.raises(ValueError) as info:
        describe(url)
    assert_no_secret(str(info.value))
    assert "\n" not in str(info.value)


# -- Sentinel: clients -------------------------------------------------------------------


def test_sync_client_writes_and_reads_through_the_master(sentinel_set: SentinelSet) -> None:
    client = sync_client(sentinel_set.url, **fast())
    assert isinstance(client, redis.Redis)
    try:
        client.delete("topo:sync")
        assert client.lpush("topo:sync", "a", "b") == 2
        assert client.lrange("topo:sync", 0, -1) == [b"b", b"a"]
        assert client.wait(1, 2000) == 1  # the replica has it
        host, port = sentinel_set.master_address()
        with redis.Redis(host=host, port=port, password=PASSWORD) as direct:
            assert direct.llen("topo:sync") == 2
            assert direct.info("replication")["role"] == "master"
        manager = client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
        assert len(manager.sentinels) == 3
        asked = [c for s in manager.sentinels for c in s.connection_pool._available_connections]
        assert asked and all(c.is_connected for c in asked)
    finally:
        client.close()
    assert not any(c.is_connected for c in asked)  # closing it closed the sentinels' too


def test_async_client_writes_and_reads_through_the_master(sentinel_set: SentinelSet) -> None:
    async def main() -> None:
        client = async_client(sentinel_set.url, **fast())
        try:
            await client.delete("topo:async")
            assert await client.lpush("topo:async", "x") == 1
            assert await client.rpop("topo:async") == b"x"
            await client.set("topo:async:k", "v")
            assert await client.wait(1, 2000) == 1
            host, port = sentinel_set.master_address()
            with redis.Redis(host=host, port=port, password=PASSWORD) as direct:
                assert direct.get("topo:async:k") == b"v"
            manager = client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
            pools = [s.connection_pool for s in manager.sentinels]
            asked = [c for p in pools for c in p._available_connections]
            assert asked and all(c.is_connected for c in asked)
        finally:
            await client.aclose()
        assert not any(c.is_connected for c in asked)  # aclose closed the sentinels' too

    asyncio.run(main())


@pytest.mark.parametrize(
    ("sentinel_password", "service", "says"),
    [
        (
            "wrong-Sentinel-0000",
            "mymaster",
            "refused the sentinel password (sentinel_password=...)",
        ),
        (None, "mymaster", "refused the sentinel password"),
        (SENTINEL_PASSWORD, "nosuch", "does not monitor 'nosuch'"),
    ],
)
def test_sentinel_lookup_errors_say_why(
    sentinel_set: SentinelSet, sentinel_password: str | None, service: str, says: str
) -> None:
    ports = [port for _, port in sentinel_set.sentinel_addresses]
    url = sentinel_url(ports, service=service, sentinel_password=sentinel_password)
    client = sync_client(url, **fast())
    try:
        with pytest.raises(REDIS_ERRORS) as info:
            client.ping()
    finally:
        client.close()
    text = error_texts(info.value)
    assert f"no master for service {service!r}" in str(info.value)
    assert str(info.value).count(says) == 3  # each sentinel was asked, each said why
    assert_no_secret(text)
    assert "wrong-Sentinel-0000" not in text


def test_inspect_sentinel(sentinel_set: SentinelSet) -> None:
    report = asyncio.run(inspect(sentinel_set.url))
    master = "{}:{}".format(*sentinel_set.master_address())
    replica = f"127.0.0.1:{sentinel_set.data[1].port}"
    assert report["topology"] == Kind.SENTINEL
    assert report["service"] == "mymaster"
    assert len(report["sentinels"]) == 3
    for view in report["sentinels"]:
        assert view["ok"] and view["master"] == master and view["master_up"]
        assert (view["quorum"], view["other_sentinels"], view["replicas"]) == (2, 2, 1)
    (m,) = report["masters"]
    assert (m["address"], m["role"]) == (master, "master")
    (r,) = m["replicas"]
    assert (r["address"], r["state"]) == (replica, "online")
    assert 0 <= r["lag_bytes"] < 10_000 and 0 <= r["lag_s"] < 5
    assert m["persistence"]["aof"] is False and m["persistence"]["rdb_save"] == ""
    assert m["persistence"]["rdb_last_bgsave_ok"] and m["persistence"]["aof_last_write_ok"]
    assert report["problems"] == [
        f"{master}: no persistence (no AOF, no RDB save): a restart loses the queue"
    ]
    lines = format_inspection(report)
    assert lines[0] == "topology sentinel: service 'mymaster', 3/3 sentinel(s) answer, quorum 2"
    assert lines[1] == f"master {master}: AOF off, no RDB save"
    assert lines[2].startswith(f"  replica {replica}: online, ")
    assert lines[2].endswith(" s ago") and "bytes behind, last ack" in lines[2]
    assert lines[3] == f"WARNING: {report['problems'][0]}"
    assert_no_secret(repr(report) + "\n".join(lines))


def test_inspect_takes_a_client_and_sees_persistence(sentinel_set: SentinelSet) -> None:
    host, port = sentinel_set.master_address()

    async def main() -> dict[str, Any]:
        client = async_client(sentinel_set.url, **fast())
        try:
            return await inspect(client)
        finally:
            await client.aclose()

    with redis.Redis(host=host, port=port, password=PASSWORD) as direct:
        direct.config_set("appendonly", "yes")
        direct.config_set("appendfsync", "always")
        try:
            # AOF on: the rewrite that starts it must be done before INFO says aof_enabled
            deadline = time.monotonic() + 5
            while direct.info("persistence")["aof_rewrite_in_progress"]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            report = asyncio.run(main())
        finally:
            direct.config_set("appendonly", "no")
    (m,) = report["masters"]
    assert m["persistence"]["aof"] is True
    assert m["persistence"]["appendfsync"] == "always"
    assert report["problems"] == []
    assert (
        format_inspection(report)[1]
        == f"master {host}:{port}: AOF on (appendfsync always), no RDB save"
    )


# -- Sentinel: failover ------------------------------------------------------------------


def _follow_sync(servers: SentinelSet) -> dict[str, Any]:
    client = sync_client(servers.url, **fast())
    try:
        client.set("before", "1")
        assert client.wait(1, 2000) == 1
        old = servers.kill_master()
        killed = time.monotonic()
        spent: list[float] = []
        errors: list[BaseException] = []
        while True:
            started = time.monotonic()
            try:
                client.lpush("after", "2")
                break
            except REDIS_ERRORS as exc:  # anything else fails the test
                spent.append(time.monotonic() - started)
                errors.append(exc)
            assert time.monotonic() - killed < 20, "the client never found the new master"
            time.sleep(0.05)
        back_s = time.monotonic() - killed
        new, failover_s = servers.wait_failover()
        assert new != old
        assert client.get("before") == b"1" and client.lrange("after", 0, -1) == [b"2"]
        with redis.Redis(host=new[0], port=new[1], password=PASSWORD) as direct:
            assert direct.lrange("after", 0, -1) == [b"2"]  # written on the new master
        return {"errors": errors, "spent": spent, "back_s": back_s, "failover_s": failover_s}
    finally:
        client.close()


def _follow_async(servers: SentinelSet) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        client = async_client(servers.url, **fast())
        try:
            await client.set("before", "1")
            assert await client.wait(1, 2000) == 1
            old = servers.kill_master()
            killed = time.monotonic()
            spent: list[float] = []
            errors: list[BaseException] = []
            while True:
                started = time.monotonic()
                try:
                    await client.lpush("after", "2")
                    break
                except REDIS_ERRORS as exc:
                    spent.append(time.monotonic() - started)
                    errors.append(exc)
                assert time.monotonic() - killed < 20, "the client never found the new master"
                await asyncio.sleep(0.05)
            back_s = time.monotonic() - killed
            assert await client.get("before") == b"1"
            assert await client.lrange("after", 0, -1) == [b"2"]
            host, port = await client.connection_pool.get_master_address()  # type: ignore[attr-defined]
            assert (host, port) != old
            return {"errors": errors, "spent": spent, "back_s": back_s, "new": (host, port)}
        finally:
            await client.aclose()

    outcome = asyncio.run(main())
    new, outcome["failover_s"] = servers.wait_failover()
    assert new == outcome["new"]
    return outcome


@pytest.mark.parametrize("follow", [_follow_sync, _follow_async], ids=["sync", "async"])
def test_one_client_follows_a_failover_and_fails_fast_meanwhile(
    own_sentinel_set: SentinelSet, follow: Any
) -> None:
    outcome = follow(own_sentinel_set)
    errors, spent = outcome["errors"], outcome["spent"]
    assert errors, "no call failed: the election was not seen"
    assert max(spent) < 2 * TIMEOUT_S, f"a call took {max(spent):.3f} s"
    for exc in errors:
        assert_no_secret(error_texts(exc))
    print(
        f"{follow.__name__}: new master named {outcome['failover_s']:.2f} s after the kill, "
        f"client writing again after {outcome['back_s']:.2f} s; {len(errors)} failed calls, "
        f"slowest {max(spent) * 1000:.1f} ms, kinds {sorted({type(e).__name__ for e in errors})}"
    )


# -- Sentinel: black holes ---------------------------------------------------------------


def test_lookup_against_black_holes_ends_within_its_budget(black_holes: list[int]) -> None:
    """The docstring: budget = the larger socket timeout; a lookup lasts at most the budget
    plus one sentinel's timeout (1 s here), however many sentinels there are."""
    url = sentinel_url(black_holes, sentinel_password=SENTINEL_PASSWORD)
    client = sync_client(url, **fast())
    started = time.monotonic()
    try:
        with pytest.raises(REDIS_ERRORS) as info:
            client.lpush("q", "x")
    finally:
        spent = time.monotonic() - started
        client.close()
    # not 1.5 s (three timeouts); at least one timeout (the black hole was asked)
    assert TIMEOUT_S * 0.9 <= spent < 2 * TIMEOUT_S + 0.15, spent
    assert "time budget spent" in str(info.value)
    assert_no_secret(error_texts(info.value))
    print(f"sync lookup against 3 black holes: {spent:.3f} s")


def test_async_lookup_against_black_holes_ends_within_its_budget(black_holes: list[int]) -> None:
    url = sentinel_url(black_holes, sentinel_password=SENTINEL_PASSWORD)

    async def main() -> tuple[float, BaseException]:
        client = async_client(url, **fast())
        started = time.monotonic()
        try:
            await client.lpush("q", "x")
        except REDIS_ERRORS as exc:
            return time.monotonic() - started, exc
        finally:
            await client.aclose()
        raise AssertionError("a black hole answered")

    spent, exc = asyncio.run(main())
    assert TIMEOUT_S * 0.9 <= spent < 2 * TIMEOUT_S + 0.15, spent
    assert "time budget spent" in str(exc)
    assert_no_secret(error_texts(exc))
    print(f"async lookup against 3 black holes: {spent:.3f} s")


# -- Cluster -----------------------------------------------------------------------------

KEYS = [f"topo:{n}" for n in range(30)]


def _nodes_holding_keys(cluster_set: ClusterSet) -> int:
    holding = 0
    for host, port in cluster_set.addresses:
        with redis.Redis(host=host, port=port) as node:
            holding += node.dbsize() > 0
    return holding


def test_cluster_sync_client(cluster_set: ClusterSet) -> None:
    client = sync_client(cluster_set.url, **fast())
    try:
        assert type(client).__name__ == "RedisCluster"
        for key in KEYS:
            client.set(key, key.upper())
        assert [client.get(key) for key in KEYS] == [key.upper().encode() for key in KEYS]
        assert _nodes_holding_keys(cluster_set) == 3  # the keys were spread over the slots
        client.delete(*KEYS[:1])
        assert client.exists(KEYS[0]) == 0
    finally:
        client.close()


def test_cluster_async_client(cluster_set: ClusterSet) -> None:
    async def main() -> list[Any]:
        client = async_client(cluster_set.url, **fast())
        try:
            for key in KEYS:
                await client.set(key, "a")
            got = [await client.get(key) for key in KEYS]
            await client.lpush("{topo}:queue", "e1", "e2")
            got.append(await client.lrange("{topo}:queue", 0, -1))
            await client.delete("{topo}:queue")
            return got
        finally:
            await client.aclose()

    got = asyncio.run(main())
    assert got == [b"a"] * len(KEYS) + [[b"e2", b"e1"]]
    assert _nodes_holding_keys(cluster_set) == 3


def test_inspect_cluster(cluster_set: ClusterSet) -> None:
    report = asyncio.run(inspect(cluster_set.url))
    assert report["topology"] == Kind.CLUSTER
    assert report["cluster"] == {"state": "ok", "slots_ok": 16384, "known_nodes": 3}
    addresses = {f"{h}:{p}" for h, p in cluster_set.addresses}
    assert {m["address"] for m in report["masters"]} == addresses
    assert all(m["role"] == "master" and m["replicas"] == [] for m in report["masters"])
    assert not [p for p in report["problems"] if "cluster" in p]
    lines = format_inspection(report)
    assert lines[0] == "topology cluster: state ok, 16384/16384 slots ok, 3 node(s), 3 master(s)"
    assert {line.split(":", 1)[0] for line in lines[1:4]} == {
        f"master {a.split(':')[0]}" for a in addresses
    }
    assert sum(line.startswith("master ") for line in lines) == 3


def test_cluster_sync_client_without_a_node_is_a_redis_error(refused_redis_url: str) -> None:
    port = refused_redis_url.rsplit(":", 1)[1].split("/")[0]
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError):
        sync_client(f"redis+cluster://:{PASSWORD}@127.0.0.1:{port}", **fast())
    assert time.monotonic() - started < 2 * TIMEOUT_S


# -- standalone --------------------------------------------------------------------------


def test_standalone_clients_and_inspect(redis_url: str) -> None:
    client = sync_client(redis_url, **fast())
    try:
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        client.close()

    async def main() -> dict[str, Any]:
        aclient = async_client(redis_url, **fast())
        try:
            assert await aclient.get("k") == b"v"
        finally:
            await aclient.aclose()
        return await inspect(redis_url)

    report = asyncio.run(main())
    assert report["topology"] == Kind.STANDALONE
    (m,) = report["masters"]
    assert m["address"] == redis_url.removeprefix("redis://").removesuffix("/0")
    assert format_inspection(report)[0] == "topology standalone"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis+sentinel://:pa/ss@h:26379/m", "redis+sentinel://:***@h:26379/m"),
        ("redis://:pa#ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://u:pa?ss@h/0", "redis://u:***@h/0"),
        ("unix:///run/r.sock?db=0&password=pw", "unix:///run/r.sock?db=0&password=***"),
    ],
)
def test_redacted_url_masks_a_password_that_ends_the_host_part_early(url: str, shown: str) -> None:
    """An unencoded / ? # in a password ends urlsplit's host part early: the mask runs to
    the last '@' instead (the text of every log line and error that shows REDIS_URL)."""
    assert redacted_url(url) == shown
