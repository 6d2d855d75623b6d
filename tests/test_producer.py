"""The producer clients (producer/client.py) against the private redis-server.

Unavailability is tested against servers these tests own: a port with nothing listening
(refused) and a socket that completes the TCP handshake but never answers (blackhole).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from producer import AsyncNotifier, Event, InvalidEvent, Keys, Notifier, NotifierUnavailable
from producer.event import MAX_EVENT_BYTES
from tests.support.helpers import queued

QUICK_S = 1.5  # a strategy must never hang on its notifier


@pytest.fixture(autouse=True)
def _no_notifier_env(monkeypatch):
    monkeypatch.delenv("NOTIFIER_REDIS_URL", raising=False)
    monkeypatch.delenv("NOTIFIER_KEY_PREFIX", raising=False)


@pytest.fixture
def blackhole_url() -> Iterator[str]:
    """A server that accepts connections and reads nothing, answers nothing."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    done.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


class NoRedis:
    """A client stand-in that fails the test if any command reaches it."""

    calls: list[str]

    def __init__(self) -> None:
        self.calls = []

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.calls.append(name)
            raise AssertionError(f"Redis was called: {name}")

        return call


# -- sync Notifier ----------------------------------------------------------------------------


def test_send_lpushes_onto_the_queue_and_returns_the_id(redis_url, r):
    with Notifier(redis_url) as n:
        first = n.send("止损触发 600519", strategy="ma_cross", data={"price": 1700.5})
        second = n.send(body="second")
    assert len(first) == 32 and first != second
    events = queued(r)
    assert [e.id for e in events] == [first, second]  # the oldest is taken first
    e = events[0]
    assert e.subject == "止损触发 600519"
    assert e.strategy == "ma_cross"
    assert e.data == {"price": 1700.5}
    assert e.kind == "info" and e.severity == "info"
    assert e.ts is not None and abs(e.ts - time.time()) < 5
    raw = r.lindex("notifier:queue", -1)
    assert "止损触发".encode() in raw  # UTF-8 on the wire, not \\u escapes


def test_send_keeps_given_id_ts_and_fields(redis_url, r):
    with Notifier(redis_url) as n:
        event_id = n.send(
            "filled", id="order-42.fill", ts="2026-11-25T09:30:00+08:00", kind="fill",
            severity="critical", to=["ops@example.com"], body="text",
        )  # fmt: skip
    assert event_id == "order-42.fill"
    (e,) = queued(r)
    assert e.id == "order-42.fill"
    assert e.ts == 1795570200.0
    assert (e.kind, e.severity, e.to, e.body) == ("fill", "critical", ["ops@example.com"], "text")


def test_signal_shape(redis_url, r):
    with Notifier(redis_url) as n:
        event_id = n.signal("ma_cross", "600519.SH", "buy", 1700.5, 100, reason="golden cross")
    (e,) = queued(r)
    assert e.id == event_id
    assert e.kind == "signal"
    assert e.strategy == "ma_cross"
    assert e.subject is None  # the worker renders it: [BUY] 600519.SH 100 @ 1700.50 · ma_cross
    assert e.data == {
        "symbol": "600519.SH", "side": "BUY", "price": 1700.5, "qty": 100,
        "reason": "golden cross",
    }  # fmt: skip


def test_custom_prefix(redis_url, r):
    with Notifier(redis_url, key_prefix="team-a") as n:
        n.send("s")
    assert r.llen("team-a:queue") == 1
    assert r.llen("notifier:queue") == 0


def test_url_and_prefix_from_the_environment(redis_url, r, monkeypatch):
    monkeypatch.setenv("NOTIFIER_REDIS_URL", redis_url)
    monkeypatch.setenv("NOTIFIER_KEY_PREFIX", "envprefix")
    with Notifier() as n:
        assert n.keys == Keys("envprefix")
        n.send("s")
    assert r.llen("envprefix:queue") == 1


def test_send_event_assigns_an_id(redis_url, r):
    with Notifier(redis_url) as n:
        event_id = n.send_event(Event(subject="s"))
        assert n.send_event(Event(subject="s", id="mine")) == "mine"
    assert [e.id for e in queued(r)] == [event_id, "mine"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"subject": "a\r\nBcc: x@example.com"}, "subject: "),
        ({"subject": None}, "at least one of"),
        ({"subject": "s", "data": {"levels": [1, 2]}}, "value of 'levels' is a list"),
        ({"subject": "s", "to": ["not-an-address"]}, "not a plain address"),
        ({"subject": "s", "id": "has space"}, "id: "),
        ({"subject": "s", "body": "x" * MAX_EVENT_BYTES}, "limit is 65536 bytes"),
    ],
)
def test_invalid_event_before_any_redis_call(kwargs, words):
    spy = NoRedis()
    n = Notifier(client=spy)  # type: ignore[arg-type]
    subject = kwargs.pop("subject")
    with pytest.raises(InvalidEvent, match=words.replace("[", r"\[")):
        n.send(subject, **kwargs)
    assert spy.calls == []


def test_oversized_event_object_is_refused_by_send_event():
    spy = NoRedis()
    n = Notifier(client=spy)  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="limit is 65536 bytes"):
        n.send_event(Event(body="止" * MAX_EVENT_BYTES))
    assert spy.calls == []


def test_unavailable_when_refused(refused_redis_url):
    n = Notifier(refused_redis_url)
    t0 = time.monotonic()
    with pytest.raises(NotifierUnavailable, match="unreachable"):
        n.send("s")
    assert time.monotonic() - t0 < QUICK_S
    n.close()


def test_unavailable_when_the_server_never_answers(blackhole_url):
    n = Notifier(blackhole_url)
    t0 = time.monotonic()
    with pytest.raises(NotifierUnavailable) as info:
        n.send("s")
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < QUICK_S  # the 0.5 s command timeout fired
    assert isinstance(info.value, ConnectionError)  # callers may catch ConnectionError
    n.close()


def test_timeout_is_configurable(blackhole_url):
    n = Notifier(blackhole_url, timeout=0.1)
    t0 = time.monotonic()
    with pytest.raises(NotifierUnavailable):
        n.send("s")
    assert time.monotonic() - t0 < 0.4
    n.close()


# -- AsyncNotifier ------------------------------------------------------------------------------


async def test_async_send_and_signal(redis_url, r):
    async with AsyncNotifier(redis_url) as n:
        first = await n.send("止损触发 600519", strategy="ma_cross", data={"price": 1700.5})
        second = await n.signal("grid", "BTC-USDT", "sell", 97250.0, 0.05, severity="warning")
    events = queued(r)
    assert [e.id for e in events] == [first, second]
    assert events[0].subject == "止损触发 600519"
    assert events[1].kind == "signal" and events[1].severity == "warning"
    assert events[1].data == {"symbol": "BTC-USDT", "side": "SELL", "price": 97250.0, "qty": 0.05}


async def test_async_custom_prefix_and_send_event(redis_url, r):
    async with AsyncNotifier(redis_url, key_prefix="p2") as n:
        event_id = await n.send_event(Event(body="b"))
    raw = r.rpop("p2:queue")
    assert json.loads(raw)["id"] == event_id
    assert r.exists("notifier:queue") == 0


async def test_async_invalid_event_before_any_redis_call():
    spy = NoRedis()
    n = AsyncNotifier(client=spy)  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="subject: "):
        await n.send("a\nb")
    with pytest.raises(InvalidEvent, match="limit is 65536 bytes"):
        await n.send(body="x" * MAX_EVENT_BYTES)
    assert spy.calls == []


async def test_async_unavailable_when_refused(refused_redis_url):
    t0 = time.monotonic()
    async with AsyncNotifier(refused_redis_url) as n:
        with pytest.raises(NotifierUnavailable, match="unreachable"):
            await n.send("s")
    assert time.monotonic() - t0 < QUICK_S


async def test_async_unavailable_when_the_server_never_answers(blackhole_url):
    t0 = time.monotonic()
    async with AsyncNotifier(blackhole_url) as n:
        with pytest.raises(NotifierUnavailable):
            await n.signal("s", "600519.SH", "BUY", 1.0, 1)
    assert 0.4 <= time.monotonic() - t0 < QUICK_S


# -- keywords everywhere ------------------------------------------------------------------------


def test_every_argument_can_be_given_by_keyword(redis_url, r):
    with Notifier(redis_url=redis_url) as n:
        sent = n.send(subject="止损触发", body="text", strategy="ma_cross")
        signal = n.signal(
            strategy="ma_cross", symbol="600519.SH", side="buy", price=1700.5, qty=100
        )
        error = n.error(strategy="ma_cross", error="feed lost")
    events = queued(r)
    assert [e.id for e in events] == [sent, signal, error]
    assert (events[0].subject, events[0].body) == ("止损触发", "text")
    assert events[1].data == {"symbol": "600519.SH", "side": "BUY", "price": 1700.5, "qty": 100}
    assert events[2].kind == "error" and events[2].strategy == "ma_cross"


async def test_every_argument_can_be_given_by_keyword_async(redis_url, r):
    async with AsyncNotifier(redis_url=redis_url) as n:
        await n.send(subject="s", body="b")
        await n.signal(strategy="grid", symbol="BTC-USDT", side="sell", price=97250.0, qty=0.05)
        await n.error(strategy="grid", error=ValueError("bad tick"))
    events = queued(r)
    assert events[0].subject == "s"
    assert events[1].data == {"symbol": "BTC-USDT", "side": "SELL", "price": 97250.0, "qty": 0.05}
    assert events[2].subject is not None and "ValueError: bad tick" in events[2].subject


def test_signal_takes_an_id_a_time_and_data_fields(redis_url, r):
    """``id`` and ``ts`` are the event's (idempotency, latency); ``data=`` carries fields
    whose names are close to a keyword (``sides``), other keywords are data fields too."""
    with Notifier(redis_url) as n:
        event_id = n.signal(
            "ma_cross", "600519.SH", "BUY", 1700.5, 100, id="order-7", ts=1795570200,
            data={"sides": 2}, reason="golden cross",
        )  # fmt: skip
    assert event_id == "order-7"
    (e,) = queued(r)
    assert (e.id, e.ts) == ("order-7", 1795570200.0)
    assert e.data is not None
    assert (e.data["sides"], e.data["reason"]) == (2, "golden cross")


@pytest.mark.parametrize(
    ("call", "wrong", "right"),
    [
        (lambda n: n.send(subjet="x"), "subjet", "subject"),
        (lambda n: n.send("x", severty="critical"), "severty", "severity"),
        (lambda n: n.send("x", dedup_windows=60), "dedup_windows", "dedup_window_s"),
        (
            lambda n: n.signal("s", "600519.SH", "BUY", 1.0, 1, severty="critical"),
            "severty",
            "severity",
        ),
        (lambda n: n.signal("s", "600519.SH", "BUY", 1.0, 1, stratgy="x"), "stratgy", "strategy"),
    ],
)
def test_a_misspelt_keyword_names_the_closest_field(call, wrong, right):
    spy = NoRedis()
    n = Notifier(client=spy)  # type: ignore[arg-type]
    with pytest.raises(TypeError) as info:
        call(n)
    assert f"'{wrong}'" in str(info.value)
    assert f"did you mean '{right}'?" in str(info.value)
    assert spy.calls == []


async def test_a_misspelt_keyword_names_the_closest_field_async():
    n = AsyncNotifier(client=NoRedis())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'boddy'.*did you mean 'body'"):
        await n.send("x", boddy="text")


def test_an_unknown_keyword_far_from_any_field_lists_the_fields():
    n = Notifier(client=NoRedis())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'zzz'.*event fields: body, data, dedup_key"):
        n.send("x", zzz=1)


# -- settings from the environment and an env file -------------------------------------------

DOTENV = """\
# the worker's .env: the producer reads only NOTIFIER_REDIS_URL and NOTIFIER_KEY_PREFIX
NOTIFIER_SMTP_PASSWORD=abcdefghijklmnop
export NOTIFIER_REDIS_URL="{url}"   # quoted, exported
NOTIFIER_KEY_PREFIX = fromfile  # a comment
"""


@pytest.fixture
def dotenv_file(tmp_path, redis_url):
    path = tmp_path / ".env"
    path.write_text(DOTENV.format(url=redis_url), encoding="utf-8")
    return path


def test_env_file_given_to_the_constructor(dotenv_file, r):
    with Notifier(env_file=dotenv_file) as n:
        assert n.keys == Keys("fromfile")
        n.send("s")
    assert r.llen("fromfile:queue") == 1


async def test_env_file_from_notifier_env_file(dotenv_file, r, monkeypatch):
    monkeypatch.setenv("NOTIFIER_ENV_FILE", str(dotenv_file))
    async with AsyncNotifier() as n:
        await n.send("s")
    assert r.llen("fromfile:queue") == 1


def test_arguments_beat_the_environment_which_beats_the_env_file(dotenv_file, r, monkeypatch):
    monkeypatch.setenv("NOTIFIER_KEY_PREFIX", "fromenv")
    with Notifier(env_file=dotenv_file) as n:
        assert n.keys == Keys("fromenv")
    with Notifier(env_file=dotenv_file, key_prefix="fromarg") as n:
        assert n.keys == Keys("fromarg")
    monkeypatch.setenv("NOTIFIER_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing there
    with Notifier(env_file=dotenv_file) as n, pytest.raises(NotifierUnavailable):
        n.send("s")


def test_a_missing_env_file_is_one_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "nope.env"
    with pytest.raises(ValueError, match=r"^env_file=.*nope\.env: cannot read it \(No such file"):
        Notifier(env_file=missing)
    monkeypatch.setenv("NOTIFIER_ENV_FILE", str(missing))
    with pytest.raises(ValueError, match=r"^NOTIFIER_ENV_FILE=.*nope\.env: cannot read it"):
        AsyncNotifier()


@pytest.mark.parametrize(
    "line",
    [
        "NOTIFIER_REDIS_URL=redis://h:1/0",
        "NOTIFIER_REDIS_URL = redis://h:1/0 # comment",
        "export NOTIFIER_REDIS_URL=redis://h:1/0",
        "NOTIFIER_REDIS_URL='redis://:p#w@h:1/0'  # the # is quoted",
        'NOTIFIER_REDIS_URL="redis://:p w\\"x@h:1/0"',
        "NOTIFIER_REDIS_URL=redis://:p#w@h:1/0",
        "NOTIFIER_REDIS_URL=",
        "notifier_redis_url=redis://lower:1/0",
        "  NOTIFIER_REDIS_URL=redis://indented:1/0",
    ],
)
def test_env_file_lines_read_like_the_worker_reads_them(tmp_path, line):
    """The worker reads .env with python-dotenv (through pydantic-settings, case-insensitive);
    the producer's tiny reader must agree on every line form a user may write."""
    from dotenv import dotenv_values

    from producer.env import read_env_file

    path = tmp_path / ".env"
    path.write_text(line + "\n", encoding="utf-8")
    expected = {k.upper(): v for k, v in dotenv_values(path).items() if v is not None}
    assert read_env_file(path) == expected


def test_the_producer_imports_neither_the_worker_nor_its_settings_library():
    import subprocess
    import sys

    code = (
        "import sys, producer; from producer import Notifier; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('worker', 'pydantic_settings', 'dotenv', 'jinja2', 'aiosmtplib')); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("bad", [-1, "2", True, float("nan")])
def test_a_bad_retry_budget_is_refused_before_sending(bad):
    spy = NoRedis()
    n = Notifier(client=spy)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^retry_s=.*: give a number of seconds, 0 or more"):
        n.send("s", retry_s=bad)
    with pytest.raises(ValueError, match=r"^timeout=.*: give a number of seconds above 0"):
        Notifier(client=spy, timeout=0)  # type: ignore[arg-type]
    assert spy.calls == []
