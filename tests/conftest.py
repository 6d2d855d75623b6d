"""Fixtures shared by every test: private Redis and SMTP servers, TLS, worker processes.

Nothing here connects to a server the tests did not start (never 127.0.0.1:6379).

Fixtures:

- ``tls_ca`` (session): :class:`~tests.support.tls.TLSAuthority` with ``ca_file``,
  ``server_context()`` and ``client_context()``.
- ``redis_server`` (session): a private :class:`~worker.devtools.redis_server.RedisServer`.
- ``redis_url`` (function): that server's URL, after ``FLUSHALL``.
- ``redis_factory(*, appendonly=False, port=None, start=True, extra_args=())``:
  more Redis servers, each with its own directory; all stopped at teardown.
- ``smtp_factory(*, tls="none", auth=None, pipelining=False, start=True, **kwargs)``:
  :class:`~worker.devtools.smtp_server.SMTPTestServer` instances (TLS servers get a
  ``tls_ca`` certificate); all stopped at teardown.
- ``smtp_server`` (function): a started plain server without AUTH.
- ``worker_env(redis_url, smtp, **overrides) -> dict[str, str]``: environment for a
  ``notifier run`` subprocess.
- ``worker_proc(env, *args) -> subprocess.Popen``: ``python -m worker run *args``; see
  :class:`WorkerProcesses`.
- ``r`` (function): a ``redis.Redis`` client of ``redis_url`` (a module may override it).
- ``refused_redis_url`` (function): a Redis URL on a loopback port that refuses connections.
- ``make_rig(smtp, clock=None, **settings)``: an in-process
  :class:`~tests.support.helpers.Rig` on ``redis_url``; all closed at teardown.

Plain helper functions live in :mod:`tests.support.helpers`.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import hypothesis
import pytest
import redis
import redis.asyncio as aredis

from tests.support.helpers import MAIL_FROM, MAIL_TO, REPO_ROOT, FakeClock, Rig, settings_for
from tests.support.tls import TLSAuthority
from worker.channels import Channel
from worker.devtools.redis_server import RedisServer
from worker.devtools.smtp_server import SMTPTestServer, TLSMode
from worker.queue import connect

# Property tests explore new examples on every developer run; CI (CI=true) runs a fixed set,
# so a landing never depends on a draw (a failure a developer run finds becomes a test).
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

_phase_reports = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item so fixtures can tell if the test failed."""
    report = yield
    item.stash.setdefault(_phase_reports, {})[report.when] = report
    return report


def _test_failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_phase_reports, {})
    return any(report.failed for report in reports.values())


_Server = TypeVar("_Server", RedisServer, SMTPTestServer)


def _keep(made: list[_Server], server: _Server, start: bool) -> _Server:
    """Remember ``server`` for the teardown and start it unless told not to."""
    made.append(server)
    if start:
        server.start()
    return server


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSAuthority:
    return TLSAuthority(tmp_path_factory.mktemp("tls"))


# -- Redis -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(dir=tmp_path_factory.mktemp("redis-session"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.running:  # a test stopped or killed the shared server
        redis_server.start()
    assert redis_server.port != 6379
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    made: list[RedisServer] = []

    def make(
        *,
        appendonly: bool = False,
        port: int | None = None,
        start: bool = True,
        extra_args: tuple[str, ...] = (),
    ) -> RedisServer:
        server = RedisServer(
            dir=tmp_path / f"redis-{len(made) + 1}",
            port=port,
            appendonly=appendonly,
            extra_args=extra_args,
        )
        return _keep(made, server, start)

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def refused_redis_url() -> Iterator[str]:
    """A loopback port held by a bound socket that does not listen: connects are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    sock.close()


# -- SMTP --------------------------------------------------------------------------------


@pytest.fixture
def smtp_factory(tls_ca: TLSAuthority) -> Iterator[Callable[..., SMTPTestServer]]:
    made: list[SMTPTestServer] = []

    def make(
        *,
        tls: TLSMode = "none",
        auth: dict[str, str] | None = None,
        pipelining: bool = False,
        start: bool = True,
        **kwargs: Any,
    ) -> SMTPTestServer:
        if tls != "none":
            kwargs.setdefault("ssl_context", tls_ca.server_context())
        server = SMTPTestServer(tls=tls, auth=auth, pipelining=pipelining, **kwargs)
        return _keep(made, server, start)

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def smtp_server(smtp_factory: Callable[..., SMTPTestServer]) -> SMTPTestServer:
    return smtp_factory()


# -- the worker as a subprocess ----------------------------------------------------------


@pytest.fixture
def worker_env(tls_ca: TLSAuthority) -> Callable[..., dict[str, str]]:
    """``worker_env(redis_url, smtp, **overrides)``: environment for ``notifier run``.

    Overrides name settings without the prefix (``concurrency=4`` sets
    ``NOTIFIER_CONCURRENCY``) or in full (``NOTIFIER_X``); ``None`` removes a variable.
    """

    def make(redis_url: str, smtp: SMTPTestServer, **overrides: object) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "NOTIFIER_REDIS_URL": redis_url,
            "NOTIFIER_SMTP_HOST": smtp.host,
            "NOTIFIER_SMTP_PORT": str(smtp.port),
            "NOTIFIER_SMTP_TLS": smtp.tls,
            "NOTIFIER_MAIL_FROM": MAIL_FROM,
            "NOTIFIER_MAIL_TO": MAIL_TO,
            "NOTIFIER_METRICS_PORT": "0",
        }
        if smtp.auth:
            username, password = next(iter(smtp.auth.items()))
            env["NOTIFIER_SMTP_USERNAME"] = username
            env["NOTIFIER_SMTP_PASSWORD"] = password
        if smtp.tls != "none":
            env["NOTIFIER_SMTP_CA_FILE"] = str(tls_ca.ca_file)
        for key, value in overrides.items():
            name = key if key.startswith("NOTIFIER_") else f"NOTIFIER_{key.upper()}"
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        return env

    return make


class WorkerProcesses:
    """Starts worker subprocesses for one test and ends them at teardown.

    Each process runs in its own empty directory under ``tmp_path`` (so no ``.env`` is
    read) with stdout and stderr in ``tmp_path/worker-N.log`` (``proc.log_path``).
    ``PYTHONPATH`` gets the repository root appended, so ``worker`` imports without an
    installed package; ``PYTHONUNBUFFERED=1`` unless the env sets it.
    """

    def __init__(self, tmp_path: Path, grace_s: float = 5.0) -> None:
        self.tmp_path = tmp_path
        self.grace_s = grace_s
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, env: Mapping[str, str], *args: str) -> subprocess.Popen[bytes]:
        return self.spawn([sys.executable, "-m", "worker", "run", *args], env)

    def spawn(self, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        number = len(self.procs) + 1
        cwd = self.tmp_path / f"worker-{number}"
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = self.tmp_path / f"worker-{number}.log"
        full_env = dict(env)
        paths = [p for p in (full_env.get("PYTHONPATH"), str(REPO_ROOT)) if p]
        full_env["PYTHONPATH"] = os.pathsep.join(paths)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """SIGTERM everything still running, wait ``grace_s``, then SIGKILL the rest."""
        running = [proc for proc in self.procs if proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def dump_logs(self) -> None:
        for proc in self.procs:
            log_path: Path = proc.log_path  # type: ignore[attr-defined]
            text = log_path.read_text("utf-8", "replace") if log_path.exists() else ""
            command = shlex.join(str(arg) for arg in cast(list[str], proc.args))
            print(f"----- {command} (pid {proc.pid}, exit {proc.returncode})")
            print(f"----- log {log_path}")
            print(text, end="" if text.endswith("\n") else "\n")


@pytest.fixture
def worker_proc(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerProcesses]:
    procs = WorkerProcesses(tmp_path)
    yield procs
    procs.stop_all()
    if _test_failed(request.node):
        procs.dump_logs()


# -- in-process delivery -----------------------------------------------------------------


@pytest.fixture
async def make_rig(redis_url: str) -> AsyncIterator[Callable[..., Rig]]:
    """``make_rig(smtp, clock=None, **settings)``: a :class:`Rig` (settings from
    :func:`~tests.support.helpers.settings_for`) with its own Redis connection."""
    made: list[Rig] = []
    clients: list[aredis.Redis] = []

    def make(
        smtp: SMTPTestServer | None,
        clock: FakeClock | None = None,
        *,
        channels: Sequence[Channel] = (),
        **fields: Any,
    ) -> Rig:
        client = connect(redis_url)
        clients.append(client)
        rig = Rig(settings_for(redis_url, smtp, **fields), client, clock, channels)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.close()
    for client in clients:
        await client.aclose()
