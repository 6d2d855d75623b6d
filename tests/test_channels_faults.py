"""The e-mail fault tests, for an IM channel (issue 11): real ``notifier run`` subprocesses, a
real redis-server, the test SMTP server and the webhook emulator over loopback HTTPS.

Events are routed to ``["email", "hook"]`` (one delivery per channel, each with its own sent
mark, claim and retries) or, for the throttle test, to e-mail with ``fallback = ["hook"]``.
The emulator runs in this process (threads); what it accepted is its ``received`` list (one
payload per delivery, carrying the event id), what the SMTP server accepted is one
``X-Notifier-Event-Id`` per mail.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import (
    EMPTY,
    QQ_THROTTLE,
    dead_letters,
    delivered,
    event,
    kill9_holding,
    leftovers,
    log_of,
    processing_of,
    push,
    rclient,
    slow_down,
    wait_for_log,
    wait_until,
)
from worker.devtools.emulators.webhook import WebhookEmulator
from worker.devtools.http_server import EmulatedRequest, Reply

# Fast retries so that a test sees several attempts in a second (as tests/test_faults.py).
FAST = {"retry_base_s": 0.05, "retry_max_s": 0.5, "heartbeat_ttl_s": 3}
FAN_OUT = '[default]\nchannels = ["email", "hook"]\n'


class Hook(WebhookEmulator):
    """The webhook receiver, slow on every request (``delay_s``) and answering 502 to a share
    of them (``fail_rate``), both changeable while it runs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay_s = 0.0
        self.fail_rate = 0.0
        self.refused = 0
        self._rng = random.Random(20261201)

    def answer(self, req: EmulatedRequest) -> Reply:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            fail = self.fail_rate > 0 and self._rng.random() < self.fail_rate
            if fail:
                self.refused += 1
        if fail:
            return Reply(502, {"error": "bad gateway"})
        return super().answer(req)

    def got(self) -> Counter[str]:
        """Event id -> how many times the receiver accepted it."""
        with self._lock:
            return Counter(str(p["id"]) for p in self.received)

    def first_received_at(self) -> dict[str, float]:
        """Event id -> when the receiver first got a request for it (accepted or not)."""
        with self._lock:
            requests = list(self.requests)
        out: dict[str, float] = {}
        for req in requests:
            out.setdefault(str(json.loads(req.body)["id"]), req.received_at)
        return out


@pytest.fixture
def hook(tls_ca):
    server = Hook(ssl_context=tls_ca.server_context()).start()
    # a worker killed mid-request leaves the reply unsent: not worth a traceback on stderr
    server._server.handle_error = lambda request, client_address: None  # type: ignore[union-attr,method-assign]
    yield server
    server.stop()


def channel_env(tmp_path: Path, tls_ca, hook: Hook, routes: str) -> dict[str, str]:
    """NOTIFIER_CHANNELS_FILE (the webhook ``hook``) and NOTIFIER_ROUTES_FILE (``routes``)."""
    channels = tmp_path / "channels.toml"
    channels.write_text(
        f'[[channel]]\nname = "hook"\ntype = "webhook"\nurl = "{hook.url}"\n'
        f'ca_file = "{tls_ca.ca_file}"\n',
        encoding="utf-8",
    )
    routes_file = tmp_path / "routes.toml"
    routes_file.write_text(routes, encoding="utf-8")
    return {"NOTIFIER_CHANNELS_FILE": str(channels), "NOTIFIER_ROUTES_FILE": str(routes_file)}


def wait_both(
    r, smtp, hook: Hook, ids: list[str], timeout: float
) -> tuple[Counter[str], Counter[str]]:
    """Wait until every event of ``ids`` reached both e-mail and the hook and nothing is left
    in the queue, the retry set or a processing list; then (a moment later, when a late copy
    would have arrived) how many times each id reached e-mail and the hook."""
    wanted = set(ids)

    def done() -> bool:
        return wanted <= set(delivered(smtp)) and wanted <= set(hook.got())

    try:
        wait_until(done, timeout, f"{len(ids)} events on both channels")
    except AssertionError:
        raise AssertionError(
            f"not delivered within {timeout} s: e-mail missing "
            f"{sorted(wanted - set(delivered(smtp)))[:10]}, hook missing "
            f"{sorted(wanted - set(hook.got()))[:10]}"
        ) from None
    wait_until(lambda: leftovers(r) == EMPTY, 10, "empty queue, retry and processing")
    time.sleep(0.3)
    return delivered(smtp), hook.got()


def extra(counts: Counter[str]) -> int:
    return sum(n - 1 for n in counts.values() if n > 1)


# -- kill -9 ---------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_send_to_a_slow_channel_loses_nothing(
    redis_url, smtp_server, hook, tls_ca, tmp_path, worker_proc, worker_env
):
    r = rclient(redis_url)
    hook.delay_s = 0.3  # a slow IM service: sends stay in flight
    slow_down(smtp_server, 0.05)
    env = worker_env(redis_url, smtp_server, **FAST) | channel_env(tmp_path, tls_ca, hook, FAN_OUT)
    victim = worker_proc(env | {"NOTIFIER_WORKER_ID": "victim"})
    worker_proc(env | {"NOTIFIER_WORKER_ID": "survivor"})
    wait_for_log(victim, " started: ", 20)
    ids = [f"ck9-{i:03d}" for i in range(60)]
    push(r, *(event(i) for i in ids))

    def hook_in_flight() -> bool:
        held = [json.loads(x) for x in processing_of(r, "victim")]
        return sum(1 for ev in held if (ev.get("_meta") or {}).get("channel") == "hook") >= 2

    # the hook is being sent to (each request takes 0.3 s) and the victim holds hook copies
    wait_until(
        lambda: len(hook.requests) >= 6 and hook_in_flight(), 10, "the victim sending to the hook"
    )
    _, in_flight = kill9_holding(r, victim, "victim")
    assert in_flight, "the victim held no events when it was killed"
    assert len(hook.got()) < len(ids), "everything was sent before the kill"
    worker_proc(env | {"NOTIFIER_WORKER_ID": "victim"})  # systemd restarts it

    mail, im = wait_both(r, smtp_server, hook, ids, 30)
    print(
        f"kill -9 with {len(in_flight)} in flight: {len(ids)} events, lost e-mail "
        f"{len(set(ids) - set(mail))} hook {len(set(ids) - set(im))}, duplicates e-mail "
        f"{extra(mail)} hook {extra(im)}"
    )
    assert set(mail) == set(ids) and set(im) == set(ids)
    assert extra(mail) <= len(in_flight) and extra(im) <= len(in_flight), (mail, im)
    assert dead_letters(r) == []


# -- Redis restart ---------------------------------------------------------------------


@pytest.mark.slow
def test_redis_restart_while_events_fan_out_loses_and_repeats_nothing(
    redis_factory, smtp_server, hook, tls_ca, tmp_path, worker_proc, worker_env
):
    server = redis_factory(appendonly=True)
    r = rclient(server.url)
    hook.delay_s = 0.05
    slow_down(smtp_server, 0.02)
    env = worker_env(server.url, smtp_server, max_attempts=40, **FAST) | channel_env(
        tmp_path, tls_ca, hook, FAN_OUT
    )
    proc = worker_proc(env)
    other = worker_proc(env)  # two workers: each finds the other's heartbeat gone at restart
    first = [f"crr-a{i:02d}" for i in range(40)]
    push(r, *(event(i) for i in first))
    wait_until(lambda: len(hook.got()) >= 8, 20, "the first deliveries to the hook")

    server.kill()  # a crash: only what appendfsync-always wrote survives
    assert len(hook.got()) < len(first), "everything was sent before Redis went"
    r.close()
    time.sleep(4.0)  # longer than the heartbeat TTL (3 s) and the back-off cap
    assert proc.poll() is None, log_of(proc)
    assert "Redis unreachable" in log_of(proc)

    server.start()  # same port, same directory
    r = rclient(server.url)
    second = [f"crr-b{i:02d}" for i in range(20)]
    push(r, *(event(i) for i in second))
    ids = first + second
    mail, im = wait_both(r, smtp_server, hook, ids, 30)
    print(
        f"Redis restart: {len(ids)} events, lost e-mail {len(set(ids) - set(mail))} hook "
        f"{len(set(ids) - set(im))}, duplicates e-mail {extra(mail)} hook {extra(im)}"
    )
    assert set(im) == set(ids) and set(mail) == set(ids)
    assert extra(im) == 0, {k: n for k, n in im.items() if n > 1}
    assert extra(mail) == 0, {k: n for k, n in mail.items() if n > 1}
    assert dead_letters(r) == []
    assert "Redis reachable again" in log_of(proc)
    assert proc.poll() is None and other.poll() is None


# -- 5xx storm -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_5xx_storm_on_the_channel_delivers_everything_and_never_repeats_e_mail(
    redis_url, smtp_server, hook, tls_ca, tmp_path, worker_proc, worker_env
):
    r = rclient(redis_url)
    hook.fail_rate = 0.3
    hook.delay_s = 0.02
    env = worker_env(redis_url, smtp_server, max_attempts=30, **FAST) | channel_env(
        tmp_path, tls_ca, hook, FAN_OUT
    )
    proc = worker_proc(env)
    ids = [f"c5xx-{i:02d}" for i in range(50)]

    wait_for_log(proc, " started: ", 20)
    for i in range(0, len(ids), 5):  # a stream over ~1.5 s, into the storm
        push(r, *(event(x) for x in ids[i : i + 5]))
        time.sleep(0.15)
    # The storm lasts until the hook has answered 502 a dozen times, whatever the load (the
    # seeded draws make the count of 502s the same on every run).
    wait_until(lambda: hook.refused >= 12, 15, "a dozen 502s")
    hook.fail_rate = 0.0  # the storm is over
    mail, im = wait_both(r, smtp_server, hook, ids, 30)
    print(
        f"5xx storm: {hook.refused} 502s for {len(ids)} events; dead {len(dead_letters(r))}, "
        f"duplicates e-mail {extra(mail)} hook {extra(im)}"
    )
    assert dead_letters(r) == []
    assert mail == dict.fromkeys(ids, 1)  # e-mail once, whatever the hook's retries
    assert im == dict.fromkeys(ids, 1)
    assert smtp_server.transactions == len(ids)
    assert proc.poll() is None


# -- e-mail throttled -> the fallback channel ------------------------------------------


@pytest.mark.slow
def test_e_mail_throttled_goes_to_the_fallback_channel_fast_and_comes_back(
    redis_url, smtp_server, hook, tls_ca, tmp_path, worker_proc, worker_env
):
    r = rclient(redis_url)
    env = worker_env(redis_url, smtp_server, throttle_base_s=0.5, **FAST) | channel_env(
        tmp_path, tls_ca, hook, '[default]\nfallback = ["hook"]\n'
    )
    proc = worker_proc(env)
    wait_for_log(proc, " started: ", 20)
    smtp_server.fail_next("MAIL", 550, QQ_THROTTLE, count=100_000)  # QQ: 频率限制

    throttled = [f"cthr-{i:02d}" for i in range(40)]
    pushed_at: dict[str, float] = {}
    for i in range(0, len(throttled), 2):  # a stream over ~2 s
        for x in throttled[i : i + 2]:
            pushed_at[x] = time.time()
            push(r, event(x, ts=pushed_at[x]))
        time.sleep(0.1)
    wait_until(lambda: set(throttled) <= set(hook.got()), 10, "the events on the fallback hook")

    smtp_server.clear_faults()  # the throttle lifts
    time.sleep(1.2)  # the cool-down (at most 0.5 s, jittered below 1 s) is over
    later = [f"cthr-late-{i}" for i in range(6)]
    push(r, *(event(x) for x in later))
    wait_until(lambda: set(later) <= set(delivered(smtp_server)), 10, "e-mail after cool-down")
    wait_until(lambda: leftovers(r) == EMPTY, 10, "empty queue, retry and processing")
    time.sleep(0.3)

    mail, im = delivered(smtp_server), hook.got()
    received = hook.first_received_at()
    latency = sorted(received[x] - pushed_at[x] for x in throttled)
    every = Counter(mail) + Counter(im)
    lost = len(set(throttled + later) - set(every))
    print(
        f"e-mail throttled -> fallback hook: {len(throttled)} events, latency p50 "
        f"{statistics.median(latency) * 1000:.0f} ms max {latency[-1] * 1000:.0f} ms, "
        f"lost {lost}, duplicates {extra(every)}; after the cool-down {len(later)} of "
        f"{len(later)} by e-mail"
    )
    assert lost == 0 and extra(every) == 0, every
    assert latency[-1] < 1.0, latency
    assert set(im) == set(throttled)  # while throttled: the fallback
    assert set(mail) == set(later)  # after the cool-down: e-mail again, by itself
    assert smtp_server.failed >= 1  # e-mail was tried, and refused, before the fallback
    assert dead_letters(r) == []
    assert "throttled" in log_of(proc)
