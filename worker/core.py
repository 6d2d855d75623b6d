"""One factory for the delivery core, used by the service and by the tests.

    settings ─► Core: queue (guarded), accounts, composer, metrics, settler, deliverer

The service adds the loops (fetch, lanes, scheduler, keeper, heartbeat, watchdog); a test
drives :meth:`Core.deliverer` directly on a real Redis with its own clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aredis

from producer.keys import Keys

from .accounts import Account
from .compose import Composer
from .deliver import Deliverer
from .metrics import Metrics
from .queue import Guard, Queue, connect
from .settings import Settings
from .settle import Outcome, Settler

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
    accounts: list[Account]
    composer: Composer
    metrics: Metrics
    settler: Settler
    deliverer: Deliverer


def build_core(
    settings: Settings,
    *,
    redis: aredis.Redis | None = None,
    clock: Clock | None = None,
    guard: Guard | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_retry: Callable[[], None] | None = None,
) -> Core:
    """The core of one worker from its settings; ``redis`` defaults to a new client of
    ``REDIS_URL``, ``clock`` to the system's, ``guard`` to none (errors are raised)."""
    clock = clock or SystemClock()
    client = redis if redis is not None else connect(settings.redis_url)
    keys = Keys(settings.key_prefix)
    queue = Queue(
        client,
        keys,
        settings.worker_id,
        sent_ttl_s=settings.sent_ttl_s,
        deliveries_kept=settings.deliveries_kept,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
        clock=clock.monotonic,
        guard=guard,
    )
    accounts = [Account(a, i, delivery=settings) for i, a in enumerate(settings.accounts())]
    assert settings.mail_from is not None  # required by Settings.require_mail()
    composer = Composer(
        mail_from=settings.mail_from,
        template_dir=settings.template_dir,
        thread_by_day=settings.thread_by_day,
    )
    metrics = Metrics(settings.latency_target_s)
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
        settings, queue, accounts, composer, metrics, settler=settler, clock=clock.time
    )
    return Core(
        settings=settings,
        redis=client,
        keys=keys,
        queue=queue,
        accounts=accounts,
        composer=composer,
        metrics=metrics,
        settler=settler,
        deliverer=deliverer,
    )
