"""``notifier bench``, its lab: the real worker, end to end, against the old recipe, in one run.

Everything runs on 127.0.0.1 ports this command picked (never 6379) and is stopped at the end:

* a throwaway ``redis-server`` (emptied between scenarios);
* the SMTP servers: aiosmtpd with implicit TLS + AUTH + PIPELINING (a trustme certificate;
  in this process, it records when each message arrived), a private Postfix ``smtpd``
  (PIPELINING + CHUNKING, STARTTLS) and Postfix's ``smtp-sink`` (loopback speed);
* the generic webhook's receiver (:class:`~worker.devtools.emulators.webhook.WebhookEmulator`,
  HTTPS with the same trustme CA, verifying each signed request; in this process, it records
  when each request arrived), the worker's channel ``desk-hook`` from a channels file;
* :class:`~worker.devtools.proxy.LatencyProxy` in its own process, adding the chosen round
  trip (and emulating the TCP handshake) and counting the round trips;
* the worker as users run it: ``python -m worker run`` with ``NOTIFIER_*`` settings, in a
  temp dir, its readiness taken from ``NOTIFY_SOCKET`` (``READY=1`` after the SMTP logins);
* the old recipe in its own process: for every message ``smtplib.SMTP_SSL`` (a new TCP
  connection and TLS handshake), login, sendmail, quit;
* a bare aiosmtplib sender in its own process with as many warm connections as the worker.

Latency is the worker's own record of each delivery (``<prefix>:deliveries``: event ``ts``
set by the producer just before its LPUSH, to the server's 250), cross-checked with the time
the aiosmtpd server received the message. CPU is ``utime + stime`` of the process
(``/proc/<pid>/stat``) over the measured window, divided by the messages; peak RSS is
``VmHWM``. Ratios come from one run on one machine: compare them, not absolute figures, across
machines. Progress goes to stderr; stdout gets the Markdown report (or JSON with ``--json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from producer.event import event_from_dict
from producer.keys import Keys

from ..devtools import free_port
from ..devtools.postfix import PostfixServer
from ..devtools.proxy import ProxyProcess
from ..metrics import percentile
from ..records import DeliveryRecord
from .helpers import proc_cpu_s, proc_memory_mb

if TYPE_CHECKING:
    from ..devtools.emulators.webhook import WebhookEmulator
    from ..devtools.redis_server import RedisServer
    from ..devtools.smtp_server import SMTPTestServer  # needs aiosmtpd (the dev extra)

PREFIX = "notifier"
KEYS = Keys(PREFIX)
USER, PASSWORD = "bench@example.com", "bench-auth-code-16"
MAIL_FROM, MAIL_TO = "bench@example.com", "trader@example.com"
SMTP_SINK = "/usr/sbin/smtp-sink"
HOOK, HOOK_SECRET = "desk-hook", "bench-webhook-signing-secret"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class BenchError(RuntimeError):
    """The benchmark itself could not run (not a missed target)."""


@dataclass(frozen=True, slots=True)
class Plan:
    trickle: int  # events of the trickle scenarios
    old: int  # old-recipe messages
    burst: int
    steady_rate: float  # events/s
    steady_s: float
    saturation: int
    rss_total: int
    rss_checkpoint: int
    rss_cap_s: float  # the RSS run stops there even if not every event was sent
    lanes: int = 16
    acked: int = 300  # producer sends of each kind (plain, replicas=1) in the acked scenario

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(10, 5, 200, 500.0, 2.0, 2_000, 10_000, 2_000, 30.0, acked=30)
        return cls(30, 20, 200, 500.0, 10.0, 10_000, 100_000, 10_000, 150.0)


@dataclass(slots=True)
class Row:
    """One line of the table; None shows as a dash (not measured or not meaningful)."""

    scenario: str
    events: int
    _: KW_ONLY
    throughput: float | None = None  # msg/s
    p50: float | None = None  # ms
    p95: float | None = None
    p99: float | None = None
    round_trips: float | None = None  # per message
    cpu_ms: float | None = None  # per message
    rss_mb: float | None = None  # peak
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ReplicaPair:
    """A Redis master with a replica (stopped with the lab), the replica's link through
    ``proxy`` if it has one."""

    master: RedisServer
    proxy: ProxyProcess | None


@dataclass(slots=True)
class Target:
    name: str
    limit: str
    measured: str
    ok: bool | None  # None: not measured


# ====================================================================== small helpers
def _ms(values_s: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    v = sorted(values_s)
    if not v:
        return None, None, None
    return percentile(v, 50) * 1000, percentile(v, 95) * 1000, percentile(v, 99) * 1000


def latencies(records: Sequence[DeliveryRecord]) -> list[float]:
    """The latency of every event these records delivered (a digest: each of its events)."""
    return [x for r in records for x in r.event_latencies]


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _sample_event(tag: str, i: int, ts: float) -> dict[str, Any]:
    """A typical alert (signal with a data table), in the wire contract."""
    return {
        "v": 1,
        "id": f"bench-{tag}-{i:06d}",
        "ts": ts,
        "strategy": "ma_cross",
        "kind": "signal",
        "subject": f"bench {tag} {i:06d} 买入信号 600519.SH",
        "data": {"symbol": "600519.SH", "side": "BUY", "price": 1700.5 + i % 100, "qty": 100},
    }


def _raw_events(tag: str, n: int, ts: float) -> list[str]:
    return [
        json.dumps(_sample_event(tag, i, ts), ensure_ascii=False, separators=(",", ":"))
        for i in range(n)
    ]


def _message_bytes() -> bytes:
    """The mail the worker sends for a sample event (for the old recipe and bare senders)."""
    from ..compose import Composer
    from ..mailer import message_bytes

    event = event_from_dict(_sample_event("x", 0, time.time()))
    composer = Composer(mail_from=MAIL_FROM)
    return message_bytes(composer.compose(event, event_id=event.id or "x", recipients=[MAIL_TO]))


# ====================================================================== processes
class SmtpSink:
    """Postfix's ``smtp-sink`` on a free loopback port (PIPELINING, no AUTH: ``-a``)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        argv = [SMTP_SINK, "-a", "-h", "sink.bench"]
        if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
            argv += ["-u", "nobody"]
        for _ in range(3):
            port = free_port()
            with self.log.open("ab") as out:
                proc = subprocess.Popen(
                    [*argv, f"127.0.0.1:{port}", "256"],
                    stdout=out,
                    stderr=out,
                    stdin=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and proc.poll() is None:
                # Only once our process is alive; its banner names the host we gave it.
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=1) as s,
                ):
                    if b"sink.bench" in s.recv(200):
                        self.port, self._proc = port, proc
                        return self
                time.sleep(0.02)
            proc.kill()
            proc.wait()
        raise BenchError(f"smtp-sink did not start: {self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


class WorkerProcess:
    """``python -m worker run`` with the given settings; ready once it sent ``READY=1``."""

    command: Sequence[str] = ("-m", "worker", "run")  # after sys.executable

    def __init__(self, lab: Lab, name: str, settings: dict[str, str]) -> None:
        self.lab = lab
        self.name = name
        self.settings = settings
        self.log = lab.tmp / f"worker-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def environment(self) -> dict[str, str]:
        """This process's environment without the service manager's and notifier's variables,
        then the bench's settings, then this worker's."""
        inherited = ("NOTIFIER_", "NOTIFY_", "WATCHDOG_", "LISTEN_", "CREDENTIALS_DIRECTORY")
        env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        env.update(
            NOTIFIER_REDIS_URL=self.lab.redis_url,
            NOTIFIER_KEY_PREFIX=PREFIX,
            NOTIFIER_WORKER_ID=f"bench-{self.name}",
            NOTIFIER_SMTP_HOST="127.0.0.1",
            NOTIFIER_MAIL_FROM=MAIL_FROM,
            NOTIFIER_MAIL_TO=MAIL_TO,
            NOTIFIER_METRICS_PORT=str(free_port()),
            NOTIFIER_LOG_LEVEL="INFO",
        )
        env.update(self.settings)
        return env

    def start(self) -> WorkerProcess:
        env = self.environment()
        sock_path = self.lab.tmp / f"notify-{self.name}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(sock_path))
            env["NOTIFY_SOCKET"] = str(sock_path)
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, *self.command],
                    cwd=self.lab.tmp,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"worker exited ({self.proc.returncode}): {self.tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(f"worker not ready in {READY_TIMEOUT_S:.0f} s: {self.tail()}")
                sock.settimeout(0.1)
                try:
                    msg = sock.recv(4096).decode("utf-8", "replace")
                except TimeoutError:
                    continue
                if "READY=1" in msg.splitlines():
                    if "PAUSED" in msg:
                        raise BenchError(f"worker paused at start: {msg!r}; {self.tail()}")
                    return self
        finally:
            sock.close()  # later STATUS= datagrams fail fast (ECONNREFUSED), never block
            with contextlib.suppress(FileNotFoundError):
                sock_path.unlink()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return " | ".join(text.splitlines()[-lines:])

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def memory_mb(self) -> tuple[float, float]:
        return proc_memory_mb(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.lab.notes.append(
                    f"worker {self.name}: did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM "
                    "(killed; after the measurement)"
                )


# ====================================================================== the lab
class Lab:
    """The servers of one bench run (started on demand, stopped by :meth:`close`)."""

    def __init__(self, tmp: Path, rtt_ms: float, plan: Plan) -> None:
        from ..devtools.redis_server import RedisServer

        self.tmp, self.rtt_ms, self.plan = tmp, rtt_ms, plan
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.notes: list[str] = []
        self._stack = contextlib.ExitStack()
        self._cache: dict[str, Any] = {}
        server = RedisServer(dir=tmp / "redis")
        server.start()
        self._stack.callback(server.stop)
        self.redis_url = server.url
        self.redis = redis.Redis.from_url(self.redis_url)
        self._stack.callback(self.redis.close)
        self.message = _message_bytes()
        self.message_file = tmp / "message.eml"
        self.message_file.write_bytes(self.message)

    def close(self) -> None:
        self._stack.close()

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- TLS (trustme) ------------------------------------------------------------------
    @property
    def tls(self) -> dict[str, Any]:
        def make() -> dict[str, Any]:
            import ssl

            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            ca_file, chain = self.tmp / "ca.pem", self.tmp / "server-chain.pem"
            ca.cert_pem.write_to_path(str(ca_file))
            cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(ctx)
            return {"ca_file": ca_file, "chain": chain, "server_context": ctx}

        tls: dict[str, Any] = self._once("tls", make)
        return tls

    # -- servers ------------------------------------------------------------------------
    def aiosmtpd(self) -> SMTPTestServer:
        """aiosmtpd with implicit TLS + AUTH + PIPELINING (started once)."""

        def make() -> SMTPTestServer:
            from ..devtools.smtp_server import SMTPTestServer

            smtp = SMTPTestServer(
                tls="ssl",
                ssl_context=self.tls["server_context"],
                auth={USER: PASSWORD},
                pipelining=True,
            )
            smtp.start()
            self._stack.callback(smtp.stop)
            return smtp

        smtp: SMTPTestServer = self._once("aiosmtpd", make)
        return smtp

    def webhook(self) -> WebhookEmulator:
        """The webhook receiver over HTTPS, checking each request's signature (started once)."""

        def make() -> WebhookEmulator:
            from ..devtools.emulators.webhook import WebhookEmulator

            hook = WebhookEmulator(ssl_context=self.tls["server_context"], secret=HOOK_SECRET)
            hook.start()
            self._stack.callback(hook.stop)
            return hook

        hook: WebhookEmulator = self._once("webhook", make)
        return hook

    def postfix(self) -> PostfixServer:
        def make() -> PostfixServer:
            server = PostfixServer(tls_chain_file=self.tls["chain"])
            server.start()
            self._stack.callback(server.stop)
            return server

        server: PostfixServer = self._once("postfix", make)
        return server

    def sink(self) -> SmtpSink:
        def make() -> SmtpSink:
            sink = SmtpSink(self.tmp / "smtp-sink.log").start()
            self._stack.callback(sink.stop)
            return sink

        sink: SmtpSink = self._once("sink", make)
        return sink

    def proxy(self, port: int) -> ProxyProcess:
        """The latency proxy in front of ``port`` (one per target, started once)."""

        def make() -> ProxyProcess:
            proxy = ProxyProcess("127.0.0.1", port, rtt_ms=self.rtt_ms).start()
            self._stack.callback(proxy.stop)
            return proxy

        proxy: ProxyProcess = self._once(f"proxy-{port}", make)
        return proxy

    # -- Redis --------------------------------------------------------------------------
    def replica_pair(self, *, via_proxy: bool) -> ReplicaPair:
        """A master and a replica of their own (started once each way). ``via_proxy``: the
        replica replicates through the latency proxy (``replicaof`` the proxy's port), one
        chosen round trip away; else on the loopback. Ready once the replica acknowledged a
        write (``WAIT``)."""

        def make() -> ReplicaPair:
            from ..devtools.redis_server import RedisServer
            from ..devtools.redis_topology import wait_replicated

            name = "far" if via_proxy else "near"
            master = RedisServer(
                dir=self.tmp / f"master-{name}", extra_args=("--repl-diskless-sync-delay", "0")
            )
            master.start()
            self._stack.callback(master.stop)
            proxy = self.proxy(master.port) if via_proxy else None
            upstream = proxy.port if proxy is not None else master.port
            replica = RedisServer(
                dir=self.tmp / f"replica-{name}",
                extra_args=("--replicaof", "127.0.0.1", str(upstream)),
            )
            replica.start()
            self._stack.callback(replica.stop)
            wait_replicated(("127.0.0.1", master.port))
            return ReplicaPair(master, proxy)

        pair: ReplicaPair = self._once(f"replica-pair-{via_proxy}", make)
        return pair

    def reset(self) -> None:
        self.redis.flushall()

    def delivered(self) -> int:
        return int(self.redis.hget(KEYS.counters, "delivered") or 0)

    def records(self) -> list[DeliveryRecord]:
        """The worker's records of what it delivered (sent events and digests), newest first."""
        raw: list[bytes] = self.redis.lrange(KEYS.deliveries, 0, -1)  # type: ignore[assignment]
        return [r for r in map(DeliveryRecord.from_json, raw) if r.delivered]

    def push_raw(self, events: Sequence[str], *, chunk: int = 1000) -> None:
        """LPUSH many events in one round trip (one transaction)."""
        pipe = self.redis.pipeline(transaction=True)
        for i in range(0, len(events), chunk):
            pipe.lpush(KEYS.queue, *events[i : i + chunk])
        pipe.execute()

    def wait_delivered(
        self,
        worker: WorkerProcess,
        n: int,
        timeout: float,
        every: float = 0.01,
        on_poll: Callable[[int], None] | None = None,
    ) -> float:
        """Poll until ``n`` deliveries are counted; the time.time() when seen."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.delivered()
            if on_poll is not None:
                on_poll(got)
            if got >= n:
                return time.time()
            if not worker.alive():
                raise BenchError(f"worker died after {got}/{n} deliveries: {worker.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"only {got}/{n} delivered within {timeout:.0f} s: {worker.tail()}"
                )
            time.sleep(every)

    @contextlib.contextmanager
    def worker(self, name: str, settings: dict[str, str]) -> Iterator[WorkerProcess]:
        self.reset()
        w = WorkerProcess(self, name, settings)
        try:
            yield w.start()
        finally:
            w.stop()

    # -- settings -----------------------------------------------------------------------
    def tls_auth_settings(self, port: int, lanes: int | None = None) -> dict[str, str]:
        s = {
            "NOTIFIER_SMTP_PORT": str(port),
            "NOTIFIER_SMTP_TLS": "ssl",
            "NOTIFIER_SMTP_CA_FILE": str(self.tls["ca_file"]),
            "NOTIFIER_SMTP_USERNAME": USER,
            "NOTIFIER_SMTP_PASSWORD": PASSWORD,
        }
        if lanes:
            s["NOTIFIER_CONCURRENCY"] = str(lanes)
        return s

    def sink_settings(self, lanes: int | None = None) -> dict[str, str]:
        s = {"NOTIFIER_SMTP_PORT": str(self.sink().port), "NOTIFIER_SMTP_TLS": "none"}
        if lanes:
            s["NOTIFIER_CONCURRENCY"] = str(lanes)
        return s

    def webhook_settings(self, url: str) -> dict[str, str]:
        """Every event to the webhook channel only (a channels file and a routes file); e-mail
        (configured, unused) on smtp-sink."""
        channels, routes = self.tmp / "channels.toml", self.tmp / "routes.toml"
        channels.write_text(
            f'[[channel]]\nname = "{HOOK}"\ntype = "webhook"\nurl = "{url}"\n'
            f'ca_file = "{self.tls["ca_file"]}"\nsecret = "{HOOK_SECRET}"\n',
            encoding="utf-8",
        )
        routes.write_text(f'[default]\nchannels = ["{HOOK}"]\n', encoding="utf-8")
        return {
            **self.sink_settings(),
            "NOTIFIER_CHANNELS_FILE": str(channels),
            "NOTIFIER_ROUTES_FILE": str(routes),
        }

    def add_target(
        self,
        name: str,
        *,
        limit: str,
        measured: float | None,
        ok: bool | None,
        fmt: str = "{:.1f} ms",
    ) -> None:
        """A line of the targets table: ``ok`` None means informative (no pass or fail)."""
        shown = "not measured" if measured is None else fmt.format(measured)
        self.targets.append(Target(name, limit, shown, None if measured is None else ok))
