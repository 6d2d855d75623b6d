"""One factory for the delivery core, used by the service and by the tests.

    settings ─► Core: queue (guarded), accounts, composer, metrics, settler, deliverer

The service adds the loops (fetch, lanes, scheduler, keeper, heartbeat, watchdog); a test
drives :meth:`Core.deliverer` directly on a real Redis with its own clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aredis

from producer.keys import Keys

from .channels import Channel, EmailChannel
from .channels.registry import build_channel
from .compose import Composer
from .deliver import Deliverer
from .metrics import Metrics
from .queue import Guard, Queue, connect
from .settings import Settings, SettingsError
from .settle import Outcome, Settler
from .watch import Watcher

__all__ = ["Clock", "Core", "SystemClock", "build_core"]


class Clock(Protocol):
    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(slots=True)
class Core:
    settings: Settings
    redis: aredis.Redis
    keys: Keys
    queue: Queue
    channels: list[Channel]  # the e-mail accounts, in failover order
    others: list[Channel]  # the other channels (NOTIFIER_CHANNELS_FILE, or given)
    composer: Composer
    metrics: Metrics
    settler: Settler
    deliverer: Deliverer
    watcher: Watcher  # signs of life; silence alerts with NOTIFIER_WATCH_FILE


def build_core(
    settings: Settings,
    *,
    redis: aredis.Redis | None = None,
    clock: Clock | None = None,
    guard: Guard | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_retry: Callable[[], None] | None = None,
    extra_channels: Sequence[Channel] = (),
) -> Core:
    """The core of one worker from its settings; ``redis`` defaults to a new client of
    ``REDIS_URL``, ``clock`` to the system's, ``guard`` to none (errors are raised).
    ``extra_channels`` are channels besides e-mail (named by routes), and follow the e-mail
    accounts as the fallback of routes that name none."""
    clock = clock or SystemClock()
    client = redis if redis is not None else connect(settings.redis_url)
    keys = Keys.for_redis(settings.key_prefix, client)
    queue = Queue(
        client,
        keys,
        settings.worker_id,
        sent_ttl_s=settings.sent_ttl_s,
        deliveries_kept=settings.deliveries_kept,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
        clock=clock.monotonic,
        wall_clock=clock.time,
        guard=guard,
    )
    assert settings.mail_from is not None  # required by Settings.require_mail()
    composer = Composer(
        mail_from=settings.mail_from,
        template_dir=settings.template_dir,
        thread_by_day=settings.thread_by_day,
    )
    # the e-mail channels in failover order: the primary account, then the failover accounts
    channels: list[Channel] = [
        EmailChannel(
            account, priority=i, delivery=settings, composer=composer, clock=clock.monotonic
        )
        for i, account in enumerate(settings.accounts())
    ]
    # the channels of NOTIFIER_CHANNELS_FILE (a route names them), then any given here
    others: list[Channel] = [
        build_channel(
            conf,
            priority=i,
            clock=clock.monotonic,
            wall_clock=clock.time,
            throttle_base_s=settings.throttle_base_s,
            retry_base_s=settings.retry_base_s,
            retry_max_s=settings.retry_max_s,
        )
        for i, conf in enumerate(settings.channels())
    ]
    others.extend(extra_channels)
    if settings.routes is not None and settings.routes_file is not None:
        try:
            settings.routes.check_channels((c.name for c in others), settings.routes_file)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    if settings.watch is not None:
        try:
            settings.watch.check_channels(c.name for c in others)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    metrics = Metrics(settings.latency_target_s)
    watcher = Watcher(
        queue, settings.watch, metrics=metrics, locale=settings.locale, clock=clock.time
    )
    settler = Settler(
        queue,
        metrics,
        latency_target_s=settings.latency_target_s,
        max_attempts=settings.max_attempts,
        on_outcome=on_outcome,
        on_retry=on_retry,
        clock=clock.time,
    )
    deliverer = Deliverer(
        settings,
        queue,
        channels,
        metrics,
        settler=settler,
        others=others,
        # channels given here (tests, the demo) stand in for a route's fallback
        default_fallback=[c.name for c in extra_channels],
        clock=clock.time,
        monotonic=clock.monotonic,
        on_seen=watcher.saw,
    )
    return Core(
        settings=settings,
        redis=client,
        keys=keys,
        queue=queue,
        channels=channels,
        others=others,
        composer=composer,
        metrics=metrics,
        settler=settler,
        deliverer=deliverer,
        watcher=watcher,
    )
