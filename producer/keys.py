"""Every Redis key name of notifier, in one place (shared by the producer and the worker).

All keys live under a prefix (setting ``KEY_PREFIX``, default ``notifier``):

==========================  ===========  ======================================================
key                         type         holds
==========================  ===========  ======================================================
``<p>:queue``               list         events waiting; producers LPUSH, workers take the
                                         oldest from the right end (retries go to that end)
``<p>:processing:<wid>``    list         events a worker has fetched and not yet settled
``<p>:retry``               sorted set   events waiting for a retry, scored by due time
``<p>:dead``                list         dead letters (JSON: event text, reason, error, ...)
``<p>:sent:<id>``           string       "delivered" mark with a TTL: a repeat id is a no-op
``<p>:sending:<id>``        string       claim of the process sending that id right now
``<p>:workers``             set          worker ids that own a processing list
``<p>:worker:<wid>``        string       heartbeat (JSON info) with a short TTL
``<p>:deliveries``          list         capped record of recent outcomes for ``stats``
``<p>:counters``            hash         lifetime counters: delivered, retried, dead, ...
``<p>:paused``              string       set while SMTP sending is paused on a config error
``<p>:rate:<account>``      sorted set   sends of an SMTP account in the last minute (limit)
``<p>:held:<group>``        list         events held for one digest mail (rate limit reached)
``<p>:digests``             sorted set   digest groups, scored by when they may be sent
``<p>:suppress:<key>``      hash         repeat-suppression window of one ``dedup_key``
``<p>:seen``                sorted set   strategies' last sign of life (unix time): a heartbeat
                                         (``ZADD <p>:seen GT <time> <strategy>``) or an event
``<p>:last``                hash         strategy -> JSON {subject, ts} of its last event
``<p>:watch``               hash         strategy -> JSON state of its watch (silence episodes)
==========================  ===========  ======================================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "notifier"

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def queue(self) -> str:
        return self._k("queue")

    @property
    def retry(self) -> str:
        return self._k("retry")

    @property
    def dead(self) -> str:
        return self._k("dead")

    @property
    def workers(self) -> str:
        return self._k("workers")

    @property
    def deliveries(self) -> str:
        return self._k("deliveries")

    @property
    def counters(self) -> str:
        return self._k("counters")

    @property
    def paused(self) -> str:
        return self._k("paused")

    @property
    def digests(self) -> str:
        return self._k("digests")

    @property
    def seen(self) -> str:
        return self._k("seen")

    @property
    def last(self) -> str:
        return self._k("last")

    @property
    def watch(self) -> str:
        return self._k("watch")

    def rate(self, account: str) -> str:
        return self._k("rate", account)

    def held(self, group: str) -> str:
        return self._k("held", group)

    def suppress(self, dedup_key: str) -> str:
        return self._k("suppress", dedup_key)

    def processing(self, worker_id: str) -> str:
        return self._k("processing", worker_id)

    def heartbeat(self, worker_id: str) -> str:
        return self._k("worker", worker_id)

    def sent(self, event_id: str) -> str:
        return self._k("sent", event_id)

    def sending(self, event_id: str) -> str:
        return self._k("sending", event_id)
