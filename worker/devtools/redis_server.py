"""A private ``redis-server`` for integration tests.

Each :class:`RedisServer` runs its own ``redis-server`` subprocess bound to 127.0.0.1 on
a free port, with its own directory for the log and any persistence files. The tests
never talk to a Redis they did not start: the readiness check waits for this process to
log that it is ready before it sends a PING, so a port grabbed by someone else in the
meantime is never contacted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from . import LocalServer, free_port

__all__ = ["RedisServer", "RedisServerError"]

START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 10.0
_READY_MARK = b"Ready to accept connections"


def _redis_executable() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(found, os.X_OK):
        raise RedisServerError("redis-server not found: install it (apt-get install redis-server)")
    return found


class RedisServerError(RuntimeError):
    """The private redis-server could not be started or stopped."""


class RedisServer(LocalServer):
    """A ``redis-server`` subprocess on 127.0.0.1 that only this test process uses.

    ``port=None`` picks a free port at the first :meth:`start` and keeps it for every
    :meth:`restart`. With ``appendonly=True`` every write is fsynced to the AOF in
    ``dir`` (``--appendfsync always``), so a restart, even after :meth:`kill`, keeps
    every acknowledged write.
    """

    def __init__(
        self,
        *,
        dir: Path,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.dir = Path(dir)
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self._port = port
        self._port_fixed = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "redis.log"
        # Start-up errors (bad arguments) go to stderr before the log file is opened.
        self.output_path = self.dir / "redis.out"

    # -- properties -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("RedisServer has no port before start()")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer 127.0.0.1:{self._port} {state} dir={self.dir}>"

    # -- lifecycle --------------------------------------------------------------------

    def _argv(self, port: int) -> list[str]:
        options = {
            "port": str(port),
            "bind": "127.0.0.1",
            "protected-mode": "no",
            "daemonize": "no",
            "dir": str(self.dir),
            "logfile": str(self.log_path),
            "loglevel": "notice",
        }
        argv = [_redis_executable()]
        for name, value in options.items():
            argv += [f"--{name}", value]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--save", "", "--appendonly", "no"]
        argv += list(self.extra_args)
        return argv

    def start(self) -> RedisServer:
        """Start the server and wait (at most ~5 s) until it answers PING."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        # A port picked by us may be taken by the time redis binds it: pick another.
        attempts = 1 if self._port_fixed or self._port is not None else 3
        for attempt in range(attempts):
            if self._port is None:
                self._port = free_port()
            try:
                self._spawn_and_wait(self._port)
                return self
            except RedisServerError:
                if attempt == attempts - 1:
                    raise
                self._port = None
        raise AssertionError("unreachable")

    def _spawn_and_wait(self, port: int) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out_offset = self.output_path.stat().st_size if self.output_path.exists() else 0
        with self.output_path.open("ab") as output:
            self._proc = subprocess.Popen(
                self._argv(port),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RedisServerError(
                    f"redis-server on port {port} exited during start-up\n"
                    + self._tail(self.output_path, out_offset)
                    + "\n"
                    + self._tail(self.log_path, log_offset)
                )
            # Only ping once *our* process says it listens: never a foreign server.
            if self._logged_ready(log_offset) and self._ping(port):
                return
            time.sleep(0.02)
        self._terminate(signal.SIGKILL)
        raise RedisServerError(
            f"redis-server on port {port} did not answer PING within {START_TIMEOUT_S} s\n"
            + self._tail(self.log_path, log_offset)
        )

    # What the log says once the server listens (a sentinel logs its monitors instead).
    ready_mark = _READY_MARK

    def _logged_ready(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return self.ready_mark in log.read()
        except FileNotFoundError:
            return False

    @staticmethod
    def _tail(path: Path, offset: int = 0, lines: int = 40) -> str:
        try:
            with path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return f"--- {path}: missing ---"
        return f"--- {path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def _ping(self, port: int) -> bool:
        """A raw PING answered: PONG, or NOAUTH from a server with ``requirepass`` (it logged
        that it is ready first, so it is ours)."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
                sock = self._wrap(raw)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def _wrap(self, sock: socket.socket) -> socket.socket:
        """The readiness check's socket as the server expects it (TLS in a subclass)."""
        return sock

    def _terminate(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM) and wait for the process to exit."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Crash the server (SIGKILL): nothing is flushed beyond what fsync already did."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Stop if running, then start again on the same port with the same directory."""
        self.stop()
        return self.start()
