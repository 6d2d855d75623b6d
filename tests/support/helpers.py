"""Helpers shared by the test modules (plain functions and classes; the fixtures built on them
live in ``tests/conftest.py``).

- constants: the test mail addresses, Redis key names, QQ's reply texts;
- :func:`clean_env`, :func:`settings_from`: settings from the test only;
- :func:`wait_until`: poll a condition;
- ``notifier run`` subprocesses (from the ``worker_proc`` fixture): :func:`log_of`,
  :func:`wait_for_log`, :func:`wait_started`, :func:`start_worker`, :func:`run_cli`,
  :func:`kill9`, :func:`kill9_holding`;
- Redis: :func:`rclient`, :func:`event`, :func:`push`, :func:`queued`, :func:`dead_letters`,
  :func:`counters`, :func:`leftovers` (compare with :data:`EMPTY`), :func:`unsettled`,
  :func:`processing_of`, :func:`worker_id_of`, :func:`raw_ids`;
- what the SMTP test server received: :func:`delivered`, :func:`mail_ids`, :func:`ids_in`,
  :func:`is_digest`, :func:`text_of`, :func:`html_of`, :func:`wait_delivered`,
  :func:`slow_down`;
- in-process delivery with a fake clock: :class:`FakeClock`, :func:`settings_for`, :class:`Rig`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from producer.event import Event, parse_event
from producer.keys import Keys
from worker.channels import Channel
from worker.core import build_core
from worker.devtools.smtp_server import Received, SMTPTestServer
from worker.queue import Queue
from worker.settings import Settings
from worker.settle import Outcome

REPO_ROOT = Path(__file__).resolve().parents[2]
MAIL_FROM = "量化提醒 <alerts@example.com>"
MAIL_TO = "trader@example.com"

PREFIX = "notifier"
KEYS = Keys(PREFIX)
QUEUE = f"{PREFIX}:queue"
RETRY = f"{PREFIX}:retry"
DEAD = f"{PREFIX}:dead"
COUNTERS = f"{PREFIX}:counters"

QQ_THROTTLE = (
    "Connection frequency limited. "
    "http://service.mail.qq.com/cgi-bin/help?subtype=1&&id=20022&&no=1000722"
)
QQ_535 = (
    "Login Fail. Please enter your authorization code to login. More information in "
    "http://service.mail.qq.com/cgi-bin/help?subtype=1&&id=28&&no=1001256"
)

EVENT_ID_IN_DIGEST = re.compile(r"\(event ([!-~]+?)\)")
DIGEST_SUBJECT = re.compile(r"\[DIGEST\] (\d+) alerts: (.+?)(?: · (.+))?")
START_TIMEOUT_S = 20.0


# -- settings ----------------------------------------------------------------------------------


def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings come from the test only: no NOTIFIER_* variable, no credentials directory,
    and an empty working directory (no .env file)."""
    for name in list(os.environ):
        if name.startswith("NOTIFIER_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)


def settings_from(**fields: Any) -> Settings:
    """Settings built from ``fields`` (and the environment), never from a .env file."""
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


# -- polling -----------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    what: str = "condition",
    interval: float = 0.02,
) -> float:
    """Poll until ``predicate()`` is truthy; the seconds it took (AssertionError on timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


# -- worker subprocesses (the ``worker_proc`` fixture) -----------------------------------------


def log_of(proc: subprocess.Popen[bytes]) -> str:
    """What the process wrote so far (stdout and stderr)."""
    path: Path = proc.log_path  # type: ignore[attr-defined]
    return path.read_text("utf-8", "replace") if path.exists() else ""


def wait_for_log(proc: subprocess.Popen[bytes], text: str, timeout: float = 10.0) -> str:
    """Wait until ``text`` is in the process's log; the log. Fails as soon as the process
    has exited without writing it."""
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None  # before reading: its last words count
        log = log_of(proc)
        if text in log:
            return log
        if exited:
            raise AssertionError(f"exited with {proc.returncode} before logging {text!r}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {timeout} s:\n{log}")
        time.sleep(0.02)


def wait_started(proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S) -> str:
    """Wait until the worker logs that it started (after its SMTP warm-up); the log."""
    return wait_for_log(proc, " started: ", timeout)


def write_dotenv(worker_proc: Any, dotenv: str) -> None:
    """Write ``dotenv`` as the .env of the next process ``worker_proc`` starts."""
    cwd = worker_proc.tmp_path / f"worker-{len(worker_proc.procs) + 1}"
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / ".env").write_text(dotenv, encoding="utf-8")


def start_worker(worker_proc: Any, env: dict[str, str], dotenv: str | None = None) -> Any:
    """``notifier run`` with ``env`` (and ``dotenv`` as its .env), once it has started."""
    if dotenv is not None:
        write_dotenv(worker_proc, dotenv)
    proc = worker_proc(env)
    wait_started(proc)
    return proc


def run_cli(
    worker_proc: Any,
    env: dict[str, str],
    *args: str,
    timeout: float = 30,
    dotenv: str | None = None,
) -> tuple[int, str]:
    """``python -m worker ARGS`` (the ``notifier`` command): exit code and output."""
    if dotenv is not None:
        write_dotenv(worker_proc, dotenv)
    proc = worker_proc.spawn([sys.executable, "-m", "worker", *args], env)
    rc = proc.wait(timeout=timeout)
    return rc, log_of(proc)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def kill9_holding(
    r: redis.Redis, proc: subprocess.Popen[bytes], worker_id: str | None = None
) -> tuple[float, set[str]]:
    """kill -9 the worker ``proc``: when, and the ids of the events it held in flight (its
    processing list; ``worker_id`` found in the heartbeats after the kill if not given)."""
    kill9(proc)
    killed_at = time.time()
    held = raw_ids(processing_of(r, worker_id or worker_id_of(r, proc.pid)))
    return killed_at, held


# -- Redis -------------------------------------------------------------------------------------


def rclient(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def event(event_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": event_id, "subject": f"alert {event_id}", "ts": time.time(), **fields}


def push(r: redis.Redis, *events: dict[str, Any] | str | bytes) -> None:
    """LPUSH the events in one command (a dict is JSON-encoded; str and bytes go as they are)."""
    raws = [json.dumps(ev, ensure_ascii=False) if isinstance(ev, dict) else ev for ev in events]
    if raws:
        r.lpush(QUEUE, *raws)


def queued(r: redis.Redis, prefix: str = PREFIX) -> list[Event]:
    """The queue's events, oldest first (producers LPUSH, the worker takes from the right)."""
    return [parse_event(raw) for raw in reversed(r.lrange(f"{prefix}:queue", 0, -1))]


async def sent_marks(q: Queue, ids: list[str]) -> list[bool]:
    """Which of these ids carry the "delivered" mark."""
    return [bool(await q.redis.exists(q.keys.sent(i))) for i in ids]


def dead_letters(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in r.lrange(DEAD, 0, -1)]


def counters(r: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(COUNTERS).items()}


def leftovers(r: redis.Redis) -> dict[str, int]:
    """Events still in the queue, the retry set or any processing list (all three counted)."""
    processing = sum(r.llen(k) for k in r.scan_iter(f"{PREFIX}:processing:*"))
    return {"queue": r.llen(QUEUE), "retry": r.zcard(RETRY), "processing": processing}


EMPTY = {"queue": 0, "retry": 0, "processing": 0}


def unsettled(r: redis.Redis) -> dict[str, int]:
    """Whatever is not settled, by key, only where non-empty: queue, retry, digest groups,
    every processing list and every digest hold."""
    out = {"queue": r.llen(QUEUE), "retry": r.zcard(RETRY),
           "digests": r.zcard(f"{PREFIX}:digests")}  # fmt: skip
    for pattern in (f"{PREFIX}:processing:*", f"{PREFIX}:held:*"):
        for key in r.scan_iter(pattern):
            out[key.decode()] = r.llen(key)
    return {k: v for k, v in out.items() if v}


def processing_of(r: redis.Redis, worker_id: str) -> list[bytes]:
    return list(r.lrange(f"{PREFIX}:processing:{worker_id}", 0, -1))


def worker_id_of(r: redis.Redis, pid: int) -> str:
    """The id of the worker process ``pid``, from the heartbeats (which outlive a kill -9
    by their TTL); the default ``<hostname>-<pid>`` if none is found."""
    for key in r.scan_iter(f"{PREFIX}:worker:*"):
        info = r.get(key)
        if info and json.loads(info).get("pid") == pid:
            return key.decode().removeprefix(f"{PREFIX}:worker:")
    return f"{socket.gethostname()}-{pid}"


def raw_ids(raws: Iterable[bytes]) -> set[str]:
    """The ids of raw events (as the queue and the processing lists hold them)."""
    return {json.loads(raw)["id"] for raw in raws}


# -- what the SMTP server received -------------------------------------------------------------


def _message(mail: Received | EmailMessage) -> EmailMessage:
    return mail.message if isinstance(mail, Received) else mail


def text_of(mail: Received | EmailMessage) -> str:
    """The text/plain part."""
    part = _message(mail).get_body(("plain",))
    assert part is not None, "no text part"
    return str(part.get_content())


def html_of(mail: Received | EmailMessage) -> str:
    """The text/html part."""
    part = _message(mail).get_body(("html",))
    assert part is not None, "no HTML part"
    return str(part.get_content())


def is_digest(mail: Received | EmailMessage) -> bool:
    return _message(mail)["X-Notifier-Digest"] is not None


def ids_in(mail: Received | EmailMessage) -> list[str]:
    """The event ids a mail carries: the ones a digest lists, or its own."""
    if is_digest(mail):
        return EVENT_ID_IN_DIGEST.findall(text_of(mail))
    return [str(_message(mail)["X-Notifier-Event-Id"])]


def mail_ids(messages: Iterable[Received]) -> Counter[str]:
    """Event id -> how many mails carried it (individually or listed in a digest)."""
    seen: Counter[str] = Counter()
    for m in messages:
        seen.update(ids_in(m))
    return seen


def delivered(smtp: SMTPTestServer) -> Counter[str]:
    """How many times the server accepted a message for each event id (digests not read)."""
    return Counter(str(m.message["X-Notifier-Event-Id"]) for m in smtp.messages)


def wait_delivered(
    smtp: SMTPTestServer, ids: Iterable[str], timeout: float, *, digests: bool = False
) -> float:
    """Wait until every event of ``ids`` was delivered (with ``digests``: on its own or listed
    in a digest); the seconds it took."""
    wanted = set(ids)

    def got() -> set[str]:
        return set(mail_ids(smtp.messages) if digests else delivered(smtp))

    try:
        return wait_until(lambda: wanted <= got(), timeout, f"{len(wanted)} deliveries")
    except AssertionError:
        missing = sorted(wanted - got())
        raise AssertionError(
            f"{len(missing)} of {len(wanted)} events not delivered within {timeout} s: "
            f"{missing[:10]} (server: connections={smtp.connections}, "
            f"transactions={smtp.transactions}, failed={smtp.failed}, dropped={smtp.dropped})"
        ) from None


def slow_down(smtp: SMTPTestServer, delay_s: float, stage: str = "MAIL") -> None:
    """Make the server take ``delay_s`` before it answers ``stage`` (MAIL, RCPT or DATA).

    Wraps the recording handler's hook (aiosmtpd looks hooks up on each new connection);
    call it before the worker connects. A delay at MAIL keeps events in flight without
    widening the window between the server accepting a message and the client hearing
    250 (a client killed in that window causes a duplicate, RFC 1047); a delay at DATA
    widens it, as a slow provider does.
    """
    handler = smtp._handler
    name = f"handle_{stage}"
    original = getattr(handler, name)

    async def slow(*args: Any) -> str:
        await asyncio.sleep(delay_s)
        return await original(*args)

    setattr(handler, name, slow)


# -- in-process delivery with a fake clock -----------------------------------------------------

T0 = 1_900_000_000.0  # the fake clock's start (2030): far from the real time on purpose


class FakeClock:
    """Wall time and monotonic time that move only when told (``advance``)."""

    def __init__(self, start: float = T0) -> None:
        self.t = start
        self.mono = 1000.0

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.mono += seconds


def settings_for(redis_url: str, smtp: SMTPTestServer | None = None, **fields: Any) -> Settings:
    """Settings built from arguments only (no environment, no .env)."""
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "worker_id": "t1",
        "smtp_host": smtp.host if smtp else "127.0.0.1",
        "smtp_port": smtp.port if smtp else 2,
        "smtp_tls": "none",
        "mail_from": MAIL_FROM,
        "mail_to": [MAIL_TO],
        "concurrency": 1,
        "smtp_rate_per_minute": 0,
    }
    base.update(fields)
    return settings_from(**base)


class Rig:
    """One Deliverer with its Queue, accounts and recorded outcomes (no worker loops); the
    ``make_rig`` fixture makes them."""

    def __init__(
        self,
        settings: Settings,
        client: aredis.Redis,
        clock: FakeClock | None,
        channels: Sequence[Channel] = (),
    ) -> None:
        self.settings = settings
        self.redis = client
        self.clock = clock
        self.outcomes: list[Outcome] = []
        self.core = build_core(
            settings,
            redis=client,
            clock=clock,
            on_outcome=self.outcomes.append,
            extra_channels=channels,
        )
        self.queue = self.core.queue
        self.channels = self.core.channels
        self.composer = self.core.composer
        self.metrics = self.core.metrics
        self.deliverer = self.core.deliverer

    def now(self) -> float:
        return self.clock.time() if self.clock else time.time()

    def event(self, event_id: str, **fields: Any) -> dict[str, Any]:
        return {"id": event_id, "subject": f"alert {event_id}", "ts": self.now(), **fields}

    async def push(self, *events: dict[str, Any] | str) -> None:
        for ev in events:
            raw = ev if isinstance(ev, str) else json.dumps(ev, ensure_ascii=False)
            await self.redis.lpush(KEYS.queue, raw)

    async def run_queue(self, step_s: float = 0.0) -> int:
        """Fetch everything queued (oldest first) and handle it, one by one, like a lane."""
        n = 0
        while True:
            items = await self.queue.fetch_ready(100)
            if not items:
                return n
            for raw in items:
                await self.queue.heartbeat({})  # as the worker's keeper does
                await self.deliverer.handle(0, raw, self.now())
                n += 1
                if self.clock and step_s:
                    self.clock.advance(step_s)

    async def deliver(self, *events: dict[str, Any] | str) -> None:
        await self.push(*events)
        await self.run_queue()

    async def run_digest(self) -> bool:
        """Hand one due digest group to the deliverer; False when none is due."""
        taken = await self.queue.take_digest(self.now() if self.clock else None)
        if taken is None:
            return False
        await self.queue.heartbeat({})
        await self.deliverer.handle_digest(0, *taken)
        return True

    async def run_retries(self) -> int:
        """Move every retry (due or not) to the queue and handle it."""
        moved = await self.queue.schedule(now=float("inf"))
        await self.run_queue()
        return moved

    async def dead(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in await self.redis.lrange(KEYS.dead, 0, -1)]

    async def leftovers(self) -> dict[str, int]:
        d = await self.queue.depths()
        out = {"queue": d.queue, "retry": d.retry, "processing": d.processing, "held": d.held}
        out["digests"] = int(await self.redis.zcard(KEYS.digests))
        out["own processing"] = int(await self.redis.llen(self.queue.processing))
        return {k: v for k, v in out.items() if v}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))
