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

On a Redis Cluster the prefix is wrapped in a hash tag: ``{notifier}:queue``,
``{notifier}:processing:<wid>``, ... Redis hashes only what is between the braces, so every
key of one prefix is in one hash slot, on one node, and every Lua script and MULTI of
notifier (which move an event between several of these keys in one step) may run there;
the cluster client refuses a command whose keys are in different slots. A prefix that
already holds a tag (``NOTIFIER_KEY_PREFIX={desk1}`` or ``desk:{1}``) is used as given.

On a standalone Redis and behind Sentinel the names stay exactly as they were (no braces):
producers in other languages LPUSH onto ``notifier:queue`` today, and that name is part of
the public contract. So the same prefix names different keys on a Cluster (with braces)
and on one server (without): every producer and worker of one Cluster finds the topology
in its URL (``redis+cluster://``, :func:`is_cluster`) and agrees; a script that pushes by
hand to a Cluster uses ``{notifier}:queue``. Moving a deployment from one server to a
Cluster is a move of its Redis, not of a live queue: drain it, or set a tagged prefix
(``{notifier}``) on the single server beforehand, which names the same keys on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Keys", "has_hash_tag", "is_cluster"]

# The URL schemes of a Redis Cluster (producer.topology parses the rest of such a URL).
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def has_hash_tag(name: str) -> bool:
    """Whether Redis Cluster hashes only a part of ``name``: a ``{`` followed later by a
    ``}`` with at least one character between them (the first such pair counts)."""
    start = name.find("{")
    return start >= 0 and name.find("}", start + 2) >= 0 and name[start + 1] != "}"


def is_cluster(target: object) -> bool:
    """Whether ``target``, a Redis URL or a redis-py client, is a Redis Cluster."""
    if isinstance(target, str):
        return target.strip().partition("://")[0].lower() in _CLUSTER_SCHEMES
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return isinstance(target, RedisCluster | AsyncRedisCluster)


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix; with ``cluster``, all in one hash slot (see above)."""

    prefix: str = "notifier"
    cluster: bool = field(default=False, kw_only=True)
    base: str = field(init=False, repr=False, compare=False)  # what every name starts with

    def __post_init__(self) -> None:
        tagged = self.cluster and not has_hash_tag(self.prefix)
        object.__setattr__(self, "base", f"{{{self.prefix}}}" if tagged else self.prefix)

    @classmethod
    def for_redis(cls, prefix: str, target: object) -> Keys:
        """The keys of ``prefix`` on ``target`` (a Redis URL or client): with a hash tag on
        a Cluster, as they always were elsewhere."""
        return cls(prefix, cluster=is_cluster(target))

    def _k(self, *parts: str) -> str:
        return ":".join((self.base, *parts))

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
