"""The systemd notify protocol (sd_notify) and a watchdog that pings only while the work moves.

The protocol is a few lines, so there is no dependency: a service started with
``Type=notify`` finds a ``AF_UNIX``/``SOCK_DGRAM`` socket in ``$NOTIFY_SOCKET`` (a path, or
``@name`` for the abstract namespace) and sends newline-separated ``KEY=value`` assignments
in one datagram: ``READY=1`` when started, ``STATUS=...`` for ``systemctl status``,
``STOPPING=1`` on shutdown and ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC``
microseconds when the unit sets ``WatchdogSec=``. Outside systemd ``$NOTIFY_SOCKET`` is
unset and every call is a cheap no-op that returns False.

A watchdog that pings from a timer of its own proves only that the event loop runs. Here
the worker's loops (fetch, scheduler, senders) ``beat`` a :class:`ProgressMonitor` when
they make progress or finish an idle wait, and :meth:`SystemdNotifier.run_watchdog` sends
``WATCHDOG=1`` only while every registered loop has beaten within the watchdog interval.
A hung loop therefore stops the pings and systemd restarts the worker
(``Restart=on-failure``); unacknowledged events wait in the worker's processing list and
are recovered on the next start.

Typical use by the daemon::

    monitor = ProgressMonitor()
    notifier = SystemdNotifier()
    monitor.register("fetch")                    # and beat("fetch") in the fetch loop
    watchdog = asyncio.create_task(notifier.run_watchdog(monitor, status=describe))
    ...                                          # Redis and SMTP login work
    notifier.ready("delivering: queue 0, 1 SMTP connection")
    ...
    notifier.stopping()
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable

__all__ = [
    "ProgressMonitor",
    "SystemdNotifier",
    "notify",
    "watchdog_interval",
]

logger = logging.getLogger(__name__)

#: Bounds a send when systemd's socket queue is momentarily full, so a busy or frozen
#: PID 1 can delay the event loop by this much at most, never hang it.
_SEND_TIMEOUT_S = 0.5

#: How often run_watchdog refreshes STATUS= when the unit has no WatchdogSec=.
STATUS_PERIOD_S = 15.0


def _socket_address(raw: str) -> str | None:
    """The address in ``$NOTIFY_SOCKET``: a filesystem path or ``@name`` (abstract)."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None  # e.g. "vsock:..." (systemd ≥ 253 for VMs): not for a host daemon


def notify(*lines: str) -> bool:
    """Send ``lines`` (``KEY=value`` each) as one datagram to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when there is no socket to send to
    or the send failed. Never raises: a lost notification is logged at debug level.
    """
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw:
        return False
    address = _socket_address(raw)
    if address is None:
        logger.debug("sd_notify: unsupported NOTIFY_SOCKET %r", raw)
        return False
    payload = "\n".join(lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto(payload, address)
    except (OSError, ValueError) as exc:  # OSError includes timeouts; ValueError: NUL in path
        logger.debug("sd_notify: cannot send %r to %s: %s", payload, raw, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog interval in seconds from ``$WATCHDOG_USEC``, or None when not enabled.

    None also when ``$WATCHDOG_PID`` names another process: the watchdog is then meant
    for that process (e.g. our parent), not for us.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            logger.debug("sd_notify: ignoring invalid WATCHDOG_PID %r", pid)
            return None
    try:
        value = int(usec)
    except ValueError:
        logger.debug("sd_notify: ignoring invalid WATCHDOG_USEC %r", usec)
        return None
    if value <= 0:
        return None
    return value / 1_000_000


def _one_line(text: str) -> str:
    """STATUS= takes a single line: a newline would start another assignment."""
    return " ".join(text.splitlines())


class ProgressMonitor:
    """When each of the worker's loops last made progress (``time.monotonic`` seconds).

    A loop calls :meth:`register` once, then :meth:`beat` whenever it makes progress or is
    idle but alive (a fetch loop whose blocking wait just timed out on an empty queue).
    A loop that ends on purpose calls :meth:`unregister` so it does not count as stalled.
    Every wait inside a loop (a blocking fetch, an SMTP command) must therefore end, by its
    own timeout, well within the watchdog interval (``WatchdogSec=30`` in the unit).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}

    def register(self, name: str) -> None:
        """Watch a loop from now on (registering counts as its first beat)."""
        self._last[name] = self._clock()

    def unregister(self, name: str) -> None:
        """Stop watching a loop (it finished on purpose); unknown names are ignored."""
        self._last.pop(name, None)

    def beat(self, name: str) -> None:
        """Record that the loop is making progress (registers it if needed)."""
        self._last[name] = self._clock()

    @property
    def names(self) -> list[str]:
        """The registered loops, sorted."""
        return sorted(self._last)

    def age(self, name: str, now: float | None = None) -> float:
        """Seconds since the loop's last beat (KeyError when not registered)."""
        return (self._clock() if now is None else now) - self._last[name]

    def stalled(self, max_age_s: float, now: float | None = None) -> list[str]:
        """The loops (sorted) whose last beat is more than ``max_age_s`` seconds old."""
        now = self._clock() if now is None else now
        return sorted(name for name, last in self._last.items() if now - last > max_age_s)

    def healthy(self, max_age_s: float, now: float | None = None) -> bool:
        """True when no registered loop has stalled (also when none is registered)."""
        return not self.stalled(max_age_s, now)


class SystemdNotifier:
    """The messages the daemon sends to systemd. Each returns :func:`notify`'s result."""

    @property
    def enabled(self) -> bool:
        """Whether there is a notify socket (the process runs under ``Type=notify``)."""
        return bool(os.environ.get("NOTIFY_SOCKET"))

    def ready(self, status: str) -> bool:
        """Start-up is complete; ``status`` says in what state (e.g. paused on bad config)."""
        return notify("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Show ``text`` in ``systemctl status``."""
        return notify(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        """A graceful stop has begun."""
        return notify("STOPPING=1", "STATUS=stopping: finishing in-flight sends")

    def watchdog(self) -> bool:
        """Reset systemd's watchdog timer (only when the work is really progressing)."""
        return notify("WATCHDOG=1")

    async def run_watchdog(
        self,
        monitor: ProgressMonitor,
        *,
        interval: float | None = None,
        status: Callable[[], str] | None = None,
    ) -> None:
        """Ping the watchdog every ``interval / 2`` seconds while ``monitor`` is healthy.

        ``interval`` defaults to :func:`watchdog_interval` (``WatchdogSec=``) and is also
        the age beyond which a loop counts as stalled. While a loop is stalled a warning
        names it and nothing is sent, so systemd restarts the worker when the interval
        runs out. ``status``, when given, is called on every tick and sent as ``STATUS=``
        (every :data:`STATUS_PERIOD_S` seconds when there is no watchdog). Runs until
        cancelled; cancellation propagates.
        """
        if interval is None:
            interval = watchdog_interval()
        if interval is not None and interval <= 0:
            raise ValueError(f"watchdog interval must be positive, not {interval!r}")
        period = interval / 2 if interval is not None else STATUS_PERIOD_S
        was_stalled: list[str] = []
        while True:
            lines: list[str] = []
            if interval is not None:
                stalled = monitor.stalled(interval)
                if stalled:
                    logger.warning(
                        "watchdog: no progress for over %.1f s from %s; not pinging systemd",
                        interval,
                        ", ".join(stalled),
                    )
                elif was_stalled:
                    logger.info("watchdog: %s progressing again", ", ".join(was_stalled))
                was_stalled = stalled
                if stalled:
                    await asyncio.sleep(period)
                    continue
                lines.append("WATCHDOG=1")
            if status is not None:
                try:
                    lines.append(f"STATUS={_one_line(status())}")
                except Exception as exc:  # a status bug must not stop the watchdog
                    logger.warning("watchdog: status callback failed: %r", exc)
            if lines:
                notify(*lines)
            await asyncio.sleep(period)
