"""Private Redis topologies for the tests: a Sentinel set and a three-master Cluster.

Both are built from :class:`~worker.devtools.redis_server.RedisServer` processes on free
loopback ports, each in its own directory, and never touch a Redis they did not start
(port 6379 included).

:class:`SentinelSet`: one master, one replica and three sentinels (quorum 2,
``down-after-milliseconds`` 1000, a short ``failover-timeout``, ``parallel-syncs`` 1).
The sentinels start already knowing each other and the replica (``known-sentinel`` /
``known-replica`` in their configuration files, with ids chosen here), so the set is ready
as soon as the processes are, instead of after the two-second hello and ten-second INFO
rounds that discovery would take. :meth:`SentinelSet.kill_master` kills the master with
SIGKILL; :meth:`SentinelSet.wait_failover` returns the new master's address and the
seconds since the kill once every sentinel names it and it answers as a master;
:meth:`SentinelSet.restart_old_master` starts the killed master again (same port and
directory, empty: a host that comes back) and :meth:`SentinelSet.wait_rejoined` waits until
the sentinels have made it a replica of the new master: 10 s after the restart (Sentinel
reconfigures an instance that reports the wrong role only once it has done so for 8 s, and
asks a replica for INFO every 10 s: at the second INFO after the restart).

:class:`ClusterSet`: three ``--cluster-enabled`` masters with the 16384 slots split in
three (``CLUSTER ADDSLOTSRANGE``), distinct config epochs, ``CLUSTER MEET``, ready when
every node reports ``cluster_state:ok``. Each node's cluster bus gets its own free port
(``--cluster-port``) rather than port + 10000, which may be taken or out of range.

Valkey: Debian 12 (bookworm), the release these machines run, does not ship
``valkey-server`` (it arrives with Debian 13), so both sets run ``redis-server``.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from . import LocalServer, free_port
from .redis_server import RedisServer, RedisServerError, _redis_executable

__all__ = ["ClusterSet", "SentinelServer", "SentinelSet", "TLSFiles", "wait_replicated"]

Address = tuple[str, int]
HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
READY_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """PEM files of a TLS-only :class:`SentinelSet`: every server's certificate and key, and
    the CA that issued them (which the servers, the sentinels and the clients trust)."""

    cert: Path
    key: Path
    ca: Path

    def options(self, port: int) -> list[tuple[str, str]]:
        """Server options that move the server to TLS on ``port`` (plain TCP off), with TLS
        to the master (replicas) and to every server and peer (sentinels) as well."""
        return [
            ("port", "0"),
            ("tls-port", str(port)),
            ("tls-cert-file", str(self.cert)),
            ("tls-key-file", str(self.key)),
            ("tls-ca-cert-file", str(self.ca)),
            ("tls-auth-clients", "no"),
            ("tls-replication", "yes"),
        ]


def _client(
    address: Address, password: str | None = None, tls: TLSFiles | None = None
) -> redis.Redis:
    """A short-lived admin connection (no retries, short timeouts; TLS with ``tls``)."""
    return redis.Redis(
        host=address[0],
        port=address[1],
        password=password,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        decode_responses=True,
        ssl=tls is not None,
        ssl_ca_certs=str(tls.ca) if tls else None,
    )


def _wait(condition: str, check: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``check()`` (errors count as "not yet") until true, or raise naming ``condition``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise RedisServerError(f"{condition} within {timeout} s (last error: {last!r})")


def wait_replicated(
    master: Address, replicas: int = 1, password: str | None = None, tls: TLSFiles | None = None
) -> None:
    """Until a write on ``master`` is acknowledged by ``replicas`` replicas (``WAIT``).
    Redis 7 streams writes to a new replica only after its first REPLCONF ACK (sent once a
    second): waiting for it keeps a test's or a bench's first WAIT from spending that
    second. The key it writes is deleted again."""

    def acked() -> bool:
        with _client(master, password, tls) as r:
            r.set("notifier-devtools:ready", 1)  # a write: it moves the offset
            r.delete("notifier-devtools:ready")
            return int(r.wait(replicas, 50)) >= replicas

    _wait(f"{replicas} replica(s) acknowledging a write on {master[1]}", acked)


class _PasswordServer(RedisServer):
    """A ``redis-server`` that may have ``requirepass``; with ``tls`` it speaks TLS only, on
    its port."""

    def __init__(
        self,
        *,
        dir: Path,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        tls: TLSFiles | None = None,
    ) -> None:
        super().__init__(dir=dir, port=port, extra_args=extra_args)
        self.tls = tls

    def _argv(self, port: int) -> list[str]:
        argv = super()._argv(port)
        for name, value in self.tls.options(port) if self.tls else ():
            argv += [f"--{name}", value]  # after --port: the last one counts
        return argv

    def _wrap(self, sock: socket.socket) -> socket.socket:
        if self.tls is None:
            return sock
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        return context.wrap_socket(sock, server_hostname=HOST)


class SentinelServer(_PasswordServer):
    """``redis-server sentinel.conf --sentinel`` (the Debian ``redis-sentinel`` package is the
    same binary under another name: not needed). Sentinel rewrites its configuration file, so
    the file is written anew before every start."""

    ready_mark = b"+monitor master"  # it never logs "Ready to accept connections"

    def __init__(
        self, *, dir: Path, port: int, config: list[str], tls: TLSFiles | None = None
    ) -> None:
        super().__init__(dir=dir, port=port, tls=tls)
        self.config = list(config)
        self.config_path = self.dir / "sentinel.conf"

    def _argv(self, port: int) -> list[str]:
        tls = self.tls.options(port) if self.tls else []
        lines = [
            f"port {port}",
            *(f"{name} {value}" for name, value in tls),
            f"bind {HOST}",
            "protected-mode no",
            f"dir {self.dir}",
            f"logfile {self.log_path}",
            *self.config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        return [_redis_executable(), str(self.config_path), "--sentinel"]


class SentinelSet(LocalServer):
    """A master, ``replicas`` replicas and ``sentinels`` sentinels on 127.0.0.1.

    ``password`` protects the master and replicas (``requirepass``/``masterauth``, and the
    sentinels' ``auth-pass``); ``sentinel_password`` protects the sentinels
    (``requirepass`` and ``sentinel-pass`` between them). :attr:`url` is the
    ``redis+sentinel://`` URL of the set with both.

    ``tls`` (:class:`TLSFiles`): every server and sentinel speaks TLS only (``port 0``,
    ``tls-port``, ``tls-replication yes``), the set's own admin connections too, and
    :attr:`url` is ``rediss+sentinel://...&ssl_ca_certs=<the CA file>``.
    """

    def __init__(
        self,
        dir: Path,
        *,
        service: str = "mymaster",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.dir = Path(dir)
        self.tls = tls
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self.data: list[RedisServer] = []  # [master, replica, ...] as started
        self.sentinels: list[SentinelServer] = []
        self._n_replicas = replicas
        self._n_sentinels = sentinels
        self.killed: Address | None = None
        self.killed_at: float | None = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def sentinel_addresses(self) -> list[Address]:
        return [(HOST, s.port) for s in self.sentinels]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinel_addresses)
        auth = f":{self.password}@" if self.password else ""
        params = [f"sentinel_password={self.sentinel_password}"] if self.sentinel_password else []
        if self.tls:
            params.append(f"ssl_ca_certs={quote(str(self.tls.ca))}")
        query = "?" + "&".join(params) if params else ""
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{auth}{hosts}/{self.service}/0{query}"

    def master_address(self) -> Address:
        """The master as the first sentinel that answers names it."""
        for address in self.sentinel_addresses:
            try:
                with _client(address, self.sentinel_password, self.tls) as s:
                    host, port = s.sentinel_get_master_addr_by_name(self.service)
                    return str(host), int(port)
            except (redis.RedisError, OSError):
                continue
        raise RedisServerError(f"no sentinel of {self.service!r} answers")

    def server_at(self, address: Address) -> RedisServer:
        for server in self.data:
            if server.port == address[1]:
                return server
        raise RedisServerError(f"{address} is not a server of this set")

    # -- lifecycle ------------------------------------------------------------------------

    def _data_args(self) -> tuple[str, ...]:
        args: tuple[str, ...] = ("--repl-diskless-sync-delay", "0")
        if self.password:
            args += ("--requirepass", self.password, "--masterauth", self.password)
        return args

    def start(self) -> SentinelSet:
        if self.sentinels:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        master = _PasswordServer(
            dir=self.dir / "master", extra_args=self._data_args(), tls=self.tls
        )
        self.data.append(master)
        master.start()
        for n in range(self._n_replicas):
            replica = _PasswordServer(
                dir=self.dir / f"replica-{n + 1}",
                extra_args=(*self._data_args(), "--replicaof", HOST, str(master.port)),
                tls=self.tls,
            )
            self.data.append(replica)
            replica.start()
        for server in self.data[1:]:
            _wait(f"replica {server.port} in sync with the master", self._in_sync(server.port))
        # Redis 7 streams writes to a new replica only after its first REPLCONF ACK (sent
        # once a second): wait until a write is acknowledged, so that a test's first WAIT
        # does not spend that second.
        wait_replicated((HOST, master.port), self._n_replicas, self.password, self.tls)
        self._start_sentinels(master.port)
        return self

    def _in_sync(self, port: int) -> Callable[[], bool]:
        def check() -> bool:
            with _client((HOST, port), self.password, self.tls) as r:
                return bool(r.info("replication").get("master_link_status") == "up")

        return check

    def _start_sentinels(self, master_port: int) -> None:
        ports = [free_port() for _ in range(self._n_sentinels)]
        ids = [secrets.token_hex(20) for _ in ports]
        name = self.service
        for n, (port, myid) in enumerate(zip(ports, ids, strict=True)):
            config = [
                f"sentinel myid {myid}",
                f"sentinel monitor {name} {HOST} {master_port} {self.quorum}",
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 1",
            ]
            if self.password:
                config.append(f"sentinel auth-pass {name} {self.password}")
            if self.sentinel_password:
                config += [
                    f"requirepass {self.sentinel_password}",
                    f"sentinel sentinel-pass {self.sentinel_password}",
                ]
            config += [
                f"sentinel known-replica {name} {HOST} {replica.port}" for replica in self.data[1:]
            ]
            config += [
                f"sentinel known-sentinel {name} {HOST} {other_port} {other_id}"
                for other_port, other_id in zip(ports, ids, strict=True)
                if other_port != port
            ]
            sentinel = SentinelServer(
                dir=self.dir / f"sentinel-{n + 1}", port=port, config=config, tls=self.tls
            )
            self.sentinels.append(sentinel)
            sentinel.start()
        for address in self.sentinel_addresses:
            _wait(
                f"sentinel {address[1]} sees the master, its replicas and peers",
                self._ready(address),
            )

    def _ready(self, address: Address) -> Callable[[], bool]:
        def check() -> bool:
            with _client(address, self.sentinel_password, self.tls) as s:
                state = s.sentinel_master(self.service)
            return bool(
                state["is_master"]
                and not state["is_sdown"]
                and int(state["num-slaves"]) >= self._n_replicas
                and int(state["num-other-sentinels"]) >= self._n_sentinels - 1
            )

        return check

    def kill_master(self) -> Address:
        """SIGKILL the current master (found through the sentinels); returns its address."""
        address = self.master_address()
        self.killed_at = time.monotonic()
        self.server_at(address).kill()
        self.killed = address
        return address

    def wait_failover(self, timeout: float = 20.0) -> tuple[Address, float]:
        """Once every sentinel names a new master and it answers ``role:master``: its address
        and the seconds since :meth:`kill_master`."""
        assert self.killed is not None and self.killed_at is not None, "kill_master() first"
        found: list[Address] = []

        def switched() -> bool:
            named = set()
            for address in self.sentinel_addresses:
                with _client(address, self.sentinel_password, self.tls) as s:
                    host, port = s.sentinel_get_master_addr_by_name(self.service)
                named.add((str(host), int(port)))
            if len(named) != 1 or self.killed in named:
                return False
            (new,) = named
            with _client(new, self.password, self.tls) as r:
                if r.info("replication")["role"] != "master":
                    return False
            found[:] = [new]
            return True

        _wait(f"no failover of {self.service!r}", switched, timeout)
        return found[0], time.monotonic() - self.killed_at

    def restart_old_master(self) -> RedisServer:
        """Start the master :meth:`kill_master` killed again, on its port, in its directory,
        as a host that comes back: a master with an empty data set (no persistence) until
        the sentinels, which now count it a replica of the new master, send it ``REPLICAOF``
        (see :meth:`wait_rejoined`)."""
        assert self.killed is not None, "kill_master() first"
        return self.server_at(self.killed).start()

    def wait_rejoined(self, timeout: float = 20.0) -> float:
        """Once the restarted old master replicates from the new one (link up): the seconds
        since :meth:`kill_master`."""
        assert self.killed is not None and self.killed_at is not None, "kill_master() first"
        _wait("the old master rejoining as a replica", self._in_sync(self.killed[1]), timeout)
        return time.monotonic() - self.killed_at

    def stop(self) -> None:
        for server in [*self.sentinels, *self.data]:
            server.stop()


class ClusterSet(LocalServer):
    """``masters`` Redis Cluster masters on 127.0.0.1, all slots assigned, no replicas."""

    def __init__(self, dir: Path, *, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.dir = Path(dir)
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        self.bus_ports: list[int] = []
        self._n = masters

    @property
    def addresses(self) -> list[Address]:
        return [(HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.addresses) + "/0"

    def start(self) -> ClusterSet:
        if self.nodes:
            return self
        for n in range(self._n):
            node_dir = self.dir / f"node-{n + 1}"
            bus_port = free_port()
            self.bus_ports.append(bus_port)
            args = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_dir / "nodes.conf"),
                "--cluster-port",
                str(bus_port),
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
            )
            node = RedisServer(dir=node_dir, extra_args=args)
            self.nodes.append(node)
            node.start()
        share = CLUSTER_SLOTS // self._n
        for n, address in enumerate(self.addresses):
            first = n * share
            last = CLUSTER_SLOTS - 1 if n == self._n - 1 else first + share - 1
            with _client(address) as node:
                node.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
                node.execute_command("CLUSTER SET-CONFIG-EPOCH", n + 1)
        with _client(self.addresses[0]) as first_node:
            for (host, port), bus_port in zip(self.addresses, self.bus_ports, strict=True):
                if port != self.nodes[0].port:
                    first_node.execute_command("CLUSTER MEET", host, port, bus_port)
        for address in self.addresses:
            _wait(f"cluster node {address[1]} reports cluster_state:ok", self._ok(address))
        return self

    def _ok(self, address: Address) -> Callable[[], bool]:
        def check() -> bool:
            with _client(address) as node:
                info = node.cluster("INFO")
            return bool(
                info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == self._n
            )

        return check

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
