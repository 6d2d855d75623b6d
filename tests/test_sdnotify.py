"""worker.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import sdnotify
from worker.sdnotify import ProgressMonitor, SystemdNotifier, notify, watchdog_interval


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The suite itself may run under systemd: never talk to the real manager.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket set as $NOTIFY_SOCKET, the way systemd provides it."""
    path = tmp_path / "notify.sock"
    assert len(os.fsencode(path)) < 108, "AF_UNIX paths are limited to 107 bytes"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``, decoded."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def collect(sock: socket.socket, duration: float) -> list[str]:
    """Datagrams arriving on ``sock`` during the next ``duration`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + duration
    out = []
    while (remaining := deadline - loop.time()) > 0:
        try:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), remaining)
        except TimeoutError:
            break
        out.append(data.decode())
    return out


# --- the protocol ----------------------------------------------------------------------


def test_ready_status_stopping_are_delivered_verbatim(systemd):
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.ready("delivering: queue 0, 1 SMTP connection")
    assert notifier.status("queue 3, sent 120, p95 0.41 s")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert received(systemd) == [
        "READY=1\nSTATUS=delivering: queue 0, 1 SMTP connection",
        "STATUS=queue 3, sent 120, p95 0.41 s",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping: finishing in-flight sends",
    ]


def test_notify_joins_lines_into_one_datagram(systemd):
    assert notify("READY=1", "STATUS=paused: SMTP login rejected (535), fix the password")
    assert received(systemd) == [
        "READY=1\nSTATUS=paused: SMTP login rejected (535), fix the password"
    ]


def test_status_is_kept_on_one_line(systemd):
    # A newline inside STATUS= would start a new assignment (e.g. a forged READY=1).
    assert SystemdNotifier().status("line one\nREADY=1")
    assert received(systemd) == ["STATUS=line one READY=1"]


def test_utf8_status(systemd):
    assert SystemdNotifier().status("止损触发 sent")
    assert received(systemd) == ["STATUS=止损触发 sent"]


def test_unencodable_text_does_not_raise(systemd):
    assert SystemdNotifier().status("bad \udcff byte")
    assert received(systemd) == ["STATUS=bad ? byte"]


def test_abstract_socket(monkeypatch):
    name = f"notifier-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert SystemdNotifier().ready("ok")
        assert received(sock) == ["READY=1\nSTATUS=ok"]


def test_without_notify_socket_nothing_is_sent():
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notify("READY=1") is False
    assert notifier.ready("ok") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


@pytest.mark.parametrize("value", ["", "vsock:2:1234", "@"])
def test_unusable_notify_socket_returns_false(monkeypatch, value):
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify("READY=1") is False


def test_socket_errors_do_not_raise(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    with caplog.at_level(logging.DEBUG, logger="worker.sdnotify"):
        assert notify("READY=1") is False
    assert "cannot send" in caplog.text
    # A path that is not a socket at all.
    (tmp_path / "plain").write_text("")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "plain"))
    assert SystemdNotifier().watchdog() is False


# --- WATCHDOG_USEC ---------------------------------------------------------------------


def test_watchdog_interval_unset():
    assert watchdog_interval() is None


def test_watchdog_interval_from_usec(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 30.0


def test_watchdog_interval_for_another_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


@pytest.mark.parametrize("usec", ["0", "-5", "thirty", "1.5"])
def test_watchdog_interval_invalid_usec(monkeypatch, usec):
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert watchdog_interval() is None


def test_watchdog_interval_invalid_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "self")
    assert watchdog_interval() is None


# --- ProgressMonitor -------------------------------------------------------------------


def test_progress_monitor_with_explicit_times():
    now = 100.0
    monitor = ProgressMonitor(clock=lambda: now)
    assert monitor.healthy(5.0)  # nothing registered: nothing can be stalled
    monitor.register("fetch")
    monitor.register("sender-0")
    assert monitor.names == ["fetch", "sender-0"]
    assert monitor.stalled(5.0, now=105.0) == []  # exactly max_age is not older
    assert monitor.stalled(5.0, now=105.5) == ["fetch", "sender-0"]
    now = 104.0
    monitor.beat("fetch")
    assert monitor.age("fetch", now=106.0) == 2.0
    assert monitor.stalled(5.0, now=106.0) == ["sender-0"]
    assert not monitor.healthy(5.0, now=106.0)
    monitor.unregister("sender-0")
    monitor.unregister("never-registered")
    assert monitor.healthy(5.0, now=106.0)


def test_progress_monitor_uses_monotonic_time():
    monitor = ProgressMonitor()
    monitor.register("fetch")
    assert monitor.healthy(60.0)
    assert monitor.stalled(60.0, now=time.monotonic() + 61.0) == ["fetch"]


def test_beat_registers_an_unknown_loop():
    monitor = ProgressMonitor()
    monitor.beat("scheduler")
    assert monitor.names == ["scheduler"]


# --- run_watchdog ----------------------------------------------------------------------

INTERVAL = 0.4  # watchdog interval for the tests: a tick every 0.2 s


async def test_watchdog_stops_while_a_loop_hangs_and_resumes(systemd, caplog):
    monitor = ProgressMonitor()
    running = {"fetch": asyncio.Event(), "sender": asyncio.Event()}

    async def fake_loop(name: str) -> None:
        monitor.register(name)
        while True:
            await running[name].wait()  # a cleared event is a hung loop
            monitor.beat(name)
            await asyncio.sleep(0.02)

    for event in running.values():
        event.set()
    loops = [asyncio.create_task(fake_loop(name)) for name in running]
    ticks = 0

    def status() -> str:
        nonlocal ticks
        ticks += 1
        return f"tick {ticks}"

    watchdog = asyncio.create_task(
        SystemdNotifier().run_watchdog(monitor, interval=INTERVAL, status=status)
    )
    try:
        # Both loops beat: WATCHDOG=1 with the live status on every tick.
        healthy = await collect(systemd, 3 * INTERVAL)
        assert len(healthy) >= 4, healthy
        assert all(m.startswith("WATCHDOG=1\nSTATUS=tick ") for m in healthy), healthy

        # The sender hangs. Within one interval plus a tick it counts as stalled...
        running["sender"].clear()
        with caplog.at_level(logging.WARNING, logger="worker.sdnotify"):
            await asyncio.sleep(INTERVAL + INTERVAL / 2 + 0.1)
            received(systemd)  # pings from before the stall was noticed
            # ...and from then on systemd hears nothing, so its watchdog would fire.
            hung = await collect(systemd, 3 * INTERVAL)
        assert hung == []
        assert "sender" in caplog.text
        assert "fetch" not in caplog.text  # only the hung loop is named
        assert monitor.stalled(INTERVAL) == ["sender"]

        # It beats again: the pings resume.
        running["sender"].set()
        resumed = await collect(systemd, 3 * INTERVAL)
        assert len(resumed) >= 4, resumed
        assert all(m.startswith("WATCHDOG=1\n") for m in resumed), resumed
    finally:
        watchdog.cancel()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    with pytest.raises(asyncio.CancelledError):
        await watchdog
    assert watchdog.cancelled()


async def test_watchdog_interval_defaults_to_watchdog_usec(systemd, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", str(int(INTERVAL * 1_000_000)))
    monitor = ProgressMonitor()
    task = asyncio.create_task(SystemdNotifier().run_watchdog(monitor))
    try:
        messages = await collect(systemd, INTERVAL)
    finally:
        task.cancel()
    assert messages and set(messages) == {"WATCHDOG=1"}
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_without_watchdog_only_status_is_sent(systemd, monkeypatch):
    monkeypatch.setattr(sdnotify, "STATUS_PERIOD_S", 0.05)
    task = asyncio.create_task(
        SystemdNotifier().run_watchdog(ProgressMonitor(), status=lambda: "queue 0")
    )
    try:
        messages = await collect(systemd, 0.3)
    finally:
        task.cancel()
    assert len(messages) >= 2
    assert set(messages) == {"STATUS=queue 0"}
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_failing_status_callback_does_not_stop_the_watchdog(systemd, caplog):
    def status() -> str:
        raise RuntimeError("boom")

    task = asyncio.create_task(
        SystemdNotifier().run_watchdog(ProgressMonitor(), interval=0.2, status=status)
    )
    try:
        messages = await collect(systemd, 0.35)
    finally:
        task.cancel()
    assert len(messages) >= 2
    assert set(messages) == {"WATCHDOG=1"}
    assert "boom" in caplog.text
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_watchdog_without_systemd_just_waits():
    # No NOTIFY_SOCKET: nothing to send, but the task lives until cancelled like the others.
    task = asyncio.create_task(
        SystemdNotifier().run_watchdog(ProgressMonitor(), interval=0.05, status=lambda: "x")
    )
    await asyncio.sleep(0.15)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_watchdog_rejects_a_nonpositive_interval():
    with pytest.raises(ValueError, match="positive"):
        await SystemdNotifier().run_watchdog(ProgressMonitor(), interval=0)
