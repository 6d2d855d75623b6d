"""Every Redis command and Lua script of the worker (key names: :mod:`producer.keys`).

Invariant: an event is in exactly one of queue, processing, retry, held or dead, or it has
been delivered. Each move below is one atomic step (LMOVE/BLMOVE, MULTI or a Lua script
declared with ``#!lua``, so that a full Redis refuses it whole):

* :meth:`Queue.fetch_ready`, :meth:`Queue.fetch_blocking`  queue -> processing:<wid>
* :meth:`Queue.claim`     the event id's claim (``sending:<id>``) for one handling
* :meth:`Queue.ack`       processing -> gone, + sent mark, claim released, record, counters
* :meth:`Queue.split`     delivered, + a retry of its own for refused recipients
* :meth:`Queue.retry`     processing -> retry zset scored by due time
* :meth:`Queue.bury`      processing -> dead
* :meth:`Queue.requeue`   processing -> front of queue (every channel paused, fenced)
* :meth:`Queue.drop`      processing -> gone (a duplicate, a suppressed repeat)
* :meth:`Queue.hold`      processing -> held:<group> (a digest); :meth:`Queue.take_digest` back
* :meth:`Queue.schedule`  due retry entries -> front of queue (safe with many workers)
* :meth:`Queue.recover`   processing lists of workers whose heartbeat expired -> queue
* :meth:`Queue.reconcile` what a lost fetch reply left in processing -> queue
* :meth:`Queue.watch_step` one strategy's silence state changes and its alert is queued

Settling (ack and the rest) acts only while the event is still in this worker's processing
list, so a worker that was taken for dead (and whose events were recovered), or a call
retried after a lost reply, never adds a second copy; it always releases this worker's own
claim. Every settling step writes the delivery record (:mod:`worker.records`) with it.
With a :class:`Guard` (the worker's, :mod:`worker.outage`), every operation waits out a
Redis outage; without one (the CLI, tests) errors are raised.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from producer.keys import Keys
from producer.topology import async_client

from .records import DeliveryRecord, Status

__all__ = ["Claim", "Depths", "Guard", "Queue", "connect", "follow_master"]

T = TypeVar("T")
P = ParamSpec("P")

# How many times :meth:`Queue.claim` follows a claim that changes hands while it looks at
# the owner's heartbeat before it answers 'busy' (look again later).
CLAIM_HANDOVERS = 3


class Guard(Protocol):
    """Runs one Redis operation, waiting out what a wait fixes (see :mod:`worker.outage`)."""

    async def __call__(
        self, op: Callable[[], Awaitable[T]], what: str, *, urgent: bool = False
    ) -> T: ...


def _guarded(
    what: str, *, urgent: bool = False
) -> Callable[
    [Callable[Concatenate[Queue, P], Awaitable[T]]], Callable[Concatenate[Queue, P], Awaitable[T]]
]:
    """Run the operation through the queue's guard (when it has one)."""

    def wrap(
        fn: Callable[Concatenate[Queue, P], Awaitable[T]],
    ) -> Callable[Concatenate[Queue, P], Awaitable[T]]:
        @functools.wraps(fn)
        async def guarded(self: Queue, /, *args: P.args, **kwargs: P.kwargs) -> T:
            async def once() -> T:
                try:
                    return await fn(self, *args, **kwargs)
                except (TypeError, AttributeError) as exc:
                    if not _closed_under_us(exc):
                        raise
                    raise RedisConnectionError(f"connection closed while in use ({exc})") from exc

            if self.guard is None:
                return await once()
            return await self.guard(once, what, urgent=urgent)

        return guarded

    return wrap


def _closed_under_us(exc: BaseException) -> bool:
    """A call on a connection that was closed while it was in use: redis-py 8.1 lets the
    asyncio transport's TypeError or AttributeError out of its connection instead of a
    ConnectionError (redis/redis-py#4287, #3546). Its asyncio cluster client causes it
    itself: on CLUSTERDOWN (a node that comes back) it closes every connection, also those
    that other tasks are using. Such an error is a lost connection, retried as one."""
    if not isinstance(exc, TypeError | AttributeError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == "redis.asyncio.connection":
            return True
        tb = tb.tb_next
    return False


def _counters(record: DeliveryRecord) -> list[str]:
    """The lifetime counters (``<prefix>:counters``) a settled record adds one to."""
    status = record.status
    if status in (Status.SENT, Status.DIGEST):
        return ["delivered"]
    name = {
        Status.SUPPRESSED: "suppressed",
        Status.DUPLICATE: "duplicates_skipped",
        Status.RETRY: "retried",
        Status.DEAD: "dead",
        Status.REQUEUED: "requeued",
        Status.HELD: "held",
        Status.FANOUT: "fanned_out",
    }[status]
    return [name, f"{name}:{record.reason}"] if record.reason else [name]


# Move up to ARGV[1] elements from the queue's right (oldest) end into the processing list.
FETCH_MANY = """#!lua
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not v then break end
  out[#out + 1] = v
end
return out
"""

# Move due retry entries (score <= ARGV[1], at most ARGV[2]) to the front (right end) of the
# queue, the earliest due ending up first in line.
SCHEDULE = """#!lua
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for i = #due, 1, -1 do
  redis.call('ZREM', KEYS[1], due[i])
  redis.call('RPUSH', KEYS[2], due[i])
end
return #due
"""

# Return one worker's processing list to the front of the queue (oldest first in line) and
# forget that worker, if it is still dead: the caller read its heartbeat gone, but it may
# have come back since. KEYS: workers, worker:<wid>, processing:<wid>, queue. ARGV[1] = the
# worker id; ARGV[2] = '1' for this worker's own list (its restart or graceful stop: moved
# whatever its heartbeat says, and it stays registered). Returns the number moved, or -1
# when the worker is alive.
RECOVER = """#!lua
local own = ARGV[2] == '1'
if not own and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local n = 0
while true do
  local v = redis.call('LMOVE', KEYS[3], KEYS[4], 'LEFT', 'RIGHT')
  if not v then break end
  n = n + 1
end
if not own then redis.call('SREM', KEYS[1], ARGV[1]) end
return n
"""

# After a lost reply on the fetch path (Redis restarted, a timeout), an event can sit in this
# worker's processing list although the worker never received it. Move every element that
# the worker does not hold (ARGV, with repeats) back to the front of the queue.
RECONCILE = """#!lua
local held = {}
for i = 1, #ARGV do held[ARGV[i]] = (held[ARGV[i]] or 0) + 1 end
local moved = 0
for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if (held[v] or 0) > 0 then
    held[v] = held[v] - 1
  else
    redis.call('LREM', KEYS[1], 1, v)
    redis.call('RPUSH', KEYS[2], v)
    moved = moved + 1
  end
end
return moved
"""

# Replay one dead letter: remove it (exactly that element) and queue its event text.
REPLAY = """#!lua
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


# Sliding-window rate limit of one SMTP account (shared by every worker): at most ARGV[3]
# sends in any ARGV[2] seconds. Returns '0' and records the send when allowed (or when
# ARGV[5] == '1': critical events are never held), else the seconds until a slot frees.
RATE = """#!lua
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n < limit or ARGV[5] == '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
  return '0'
end
local first = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
return tostring(math.max(0.001, tonumber(first[2]) + window - now))
"""

# Repeat suppression for one dedup key. The first event opens a window and is sent (with the
# count and start of the previous window, for "repeated N× in ..."); later events in the
# window are counted and suppressed; a retry of the window's own event is never suppressed.
SUPPRESS = """#!lua
local now = tonumber(ARGV[1])
local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if now < untl then
  if redis.call('HGET', KEYS[1], 'owner') == ARGV[3] then return {'send', '0', '0'} end
  local c = redis.call('HINCRBY', KEYS[1], 'count', 1)
  return {'suppressed', tostring(c), redis.call('HGET', KEYS[1], 'since')}
end
local prev = redis.call('HGET', KEYS[1], 'count') or '0'
local since = redis.call('HGET', KEYS[1], 'since') or '0'
redis.call('HSET', KEYS[1], 'until', tostring(now + tonumber(ARGV[2])), 'count', '0',
           'since', ARGV[1], 'owner', ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 86400000)
return {'send', prev, since}
"""

# Hold events for a digest: processing -> held:<group> (all of ARGV[5..]), make sure the
# group is scheduled (the earliest due time wins), record it. ARGV[1] = group, ARGV[2] = due,
# ARGV[3] = the record, ARGV[4] = records kept. KEYS: processing, held, digests, deliveries,
# counters.
HOLD = """#!lua
local moved = 0
for i = 5, #ARGV do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
local cur = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not cur or tonumber(cur) > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
end
redis.call('LPUSH', KEYS[4], ARGV[3])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[4]) - 1)
redis.call('HINCRBY', KEYS[5], 'held', moved)
return moved
"""


# Change one strategy's watch state if it is still what the evaluator read, and queue the
# alerts of that change with it (one step: when several workers evaluate at once, one wins
# and one alert goes out; a worker killed before this call changed nothing). KEYS: watch,
# queue. ARGV[1] = strategy, ARGV[2] = the state read ('' = none), ARGV[3] = the new state
# ('' = forget it), ARGV[4..] = alert events, to the oldest end of the queue (sent next).
WATCH_STEP = """#!lua
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (cur or '') ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
for i = 4, #ARGV do
  redis.call('RPUSH', KEYS[2], ARGV[i])
end
return 1
"""


# Take one digest group the caller found due: held:<group> -> processing (oldest first in
# the reply), if it is still due (another worker may have taken it since, and a new hold
# may have scheduled it again, later). KEYS: digests, held:<group>, processing. ARGV[1] =
# now, ARGV[2] = the group. Returns {} when it is not due (any more), else {'1', events...}.
TAKE_DIGEST = """#!lua
local due = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not due or tonumber(due) > tonumber(ARGV[1]) then return {} end
redis.call('ZREM', KEYS[1], ARGV[2])
local items = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
for _, v in ipairs(items) do redis.call('LPUSH', KEYS[3], v) end
table.insert(items, 1, '1')
return items
"""


# Claim an event id before sending it, so that two copies of one id (a producer that re-sent
# after its timeout, fetched together on two lanes or by two workers) are never sent at once.
# The claim is "<worker id>|<nonce of the run>|<token of this handling>"; ARGV[1] is ours,
# ARGV[2] its TTL (ms). 'sent': already delivered; 'claimed': ours now (also when the claim
# is already ours: the reply to an earlier call was lost). Another owner's claim is judged by
# its heartbeat, a key the caller must name, so it takes two calls:
#   1. KEYS: sent:<id>, sending:<id>: 'sent', 'claimed' or 'held <their claim>';
#   2. KEYS: the same + worker:<their wid>; ARGV[3] = their claim as read, ARGV[4] = their
#      nonce: 'busy' while that run's heartbeat lives, else the claim is taken over
#      ('claimed'); 'held <claim>' again if the claim changed hands in between. ARGV[4] = ''
#      takes it over at once: a claim of this very run that none of its handlings holds
#      (its release was lost, with a Sentinel master that died before replicating it).
# A claim that names no owner (not "<wid>|<nonce>|...") is taken over at once.
CLAIM = """#!lua
if redis.call('EXISTS', KEYS[1]) == 1 then return 'sent' end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] and string.match(cur, '^[^|]*|[^|]*|') then
  if cur ~= ARGV[3] then return 'held ' .. cur end
  local hb = redis.call('GET', KEYS[3])
  if ARGV[4] ~= '' and hb and string.find(hb, ARGV[4], 1, true) then return 'busy' end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 'claimed'
"""


# Delivered: out of processing, the sent mark, our claim released, an outcome record, the
# counter: one command (the hot path; a MULTI of seven costs several times the client CPU).
# The mark is set even when the event is no longer in this worker's processing list (it was
# returned to the queue while this worker, taken for dead, was still sending it): it was
# delivered, so the returned copy must be dropped as a duplicate. Returns 1 when it was held.
ACK = """#!lua
local held = redis.call('LREM', KEYS[1], 1, ARGV[1])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
if redis.call('GET', KEYS[3]) == ARGV[5] then redis.call('DEL', KEYS[3]) end
redis.call('LPUSH', KEYS[4], ARGV[3])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[4]) - 1)
redis.call('HINCRBY', KEYS[5], 'delivered', 1)
return held
"""


# Settle an event this worker holds: only if it is still in this worker's processing list
# (a worker thought dead and recovered by another, or a call retried after a lost reply,
# must not add a second copy to retry/dead/queue). Our claim on the id is released in any
# case: a claim whose owner no longer holds the event would stall the copy that does.
# ARGV: raw, op (zadd|lpush|rpush|none), member, score, our claim value ('' for none),
# record ('' for none), records kept, counters... KEYS: processing, target, claim key,
# deliveries, counters. Returns 1 when settled.
SETTLE = """#!lua
if ARGV[5] ~= '' and redis.call('GET', KEYS[3]) == ARGV[5] then redis.call('DEL', KEYS[3]) end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
local op = ARGV[2]
if op == 'zadd' then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
elseif op == 'lpush' then redis.call('LPUSH', KEYS[2], ARGV[3])
elseif op == 'rpush' then redis.call('RPUSH', KEYS[2], ARGV[3]) end
if ARGV[6] ~= '' then
  redis.call('LPUSH', KEYS[4], ARGV[6])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
end
for i = 8, #ARGV do redis.call('HINCRBY', KEYS[5], ARGV[i], 1) end
return 1
"""

# Fan an event out: processing -> one copy per channel at the front of the queue (right end),
# in one step, with its record. ARGV: raw, record, records kept, copies... KEYS: processing,
# queue, deliveries, counters. Returns 1 when the event was ours.
FAN_OUT = """#!lua
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
for i = 4, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('LPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
redis.call('HINCRBY', KEYS[4], 'fanned_out', 1)
return 1
"""

# Release claims that are still ours (KEYS: claim keys; ARGV: our value of each).
RELEASE = """#!lua
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then n = n + redis.call('DEL', KEYS[i]) end
end
return n
"""

# Renew this worker's heartbeat (and registration). Allowed while Redis is at maxmemory
# (allow-oom): it overwrites one small key, and a worker whose heartbeat a full Redis refused
# would be taken for dead and its in-flight events sent a second time. Returns 1 when the
# worker was still registered, 0 when it was not (first start, or another worker took it for
# dead and returned its processing list to the queue).
RENEW = """#!lua flags=allow-oom
local was = redis.call('SISMEMBER', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return was
"""


class _Batcher:
    """Sends concurrent script calls together: while one round trip is in flight, the calls
    that arrive wait and go in the next one, as one pipeline. When calls come one at a
    time this adds nothing; under load, N lanes' claims or acks cost one round trip."""

    def __init__(self, redis: aredis.Redis) -> None:
        self.redis = redis
        self._pending: list[tuple[Any, list[Any], list[Any], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def call(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((script, keys, args, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                if len(batch) == 1:
                    script, keys, args, fut = batch[0]
                    results: list[Any] = [await script(keys=keys, args=args)]
                else:
                    pipe = self.redis.pipeline(transaction=False)
                    for script, keys, args, _ in batch:
                        await _pipelined(pipe, script, keys, args)
                    results = await pipe.execute(raise_on_error=False)
            except BaseException as exc:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (*_, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)


async def _pipelined(pipe: Any, script: Any, keys: list[Any], args: list[Any]) -> None:
    """Queue a script call on ``pipe``. redis-py's cluster pipeline refuses EVALSHA (it
    could not load a script a node lacks in the middle of a pipeline): there the script
    goes as EVAL with its text, which the node caches as it does a loaded one."""
    if isinstance(pipe, ClusterPipeline):
        pipe.eval(script.script, len(keys), *keys, *args)
    else:
        await script(keys=keys, args=args, client=pipe)


async def _transaction(redis: aredis.Redis) -> Any:
    """A MULTI/EXEC pipeline of ``redis``. redis-py's asyncio cluster client runs one only
    once it has read the slot map, which it does not read for a transaction itself (a CLI
    command whose first command is a MULTI fails with 'Event loop is closed'): read it
    first (nothing when it is already known)."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
    return redis.pipeline(transaction=True)


def _v(value: object) -> Any:
    """redis-py's stubs say str where bytes are fine (and needed: events are raw bytes)."""
    return value


def _looks_like_event(raw: bytes | str) -> bool:
    try:
        obj = json.loads(raw)
    except ValueError:
        return False
    return isinstance(obj, dict) and any(k in obj for k in ("subject", "body", "data"))


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def connect(url: str, *, timeout: float = 5.0) -> aredis.Redis:
    """An asyncio Redis client for the worker (no decoding: events are bytes), for any
    topology of ``url`` (:mod:`producer.topology`): on Sentinel it follows the master through
    a failover; on a Cluster it is redis-py's cluster client, which offers every command the
    worker sends (all of its keys are in one slot) and is typed as a ``Redis`` here.

    The clients make no retries of their own (redis-py's default tries a command up to ten
    times more, for seconds; the cluster client's, three): the worker's guard
    (:mod:`worker.outage`) retries, and so sees every failed call, including a fetch whose
    reply was lost after Redis had moved the events (the fetch loop then returns them to
    the queue). A cluster client still follows MOVED and ASK, and re-reads the slot map at
    its next call after a connection error."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout + 5.0,  # above the blocking fetch's wait
        "health_check_interval": 30,
    }
    options["retry"] = Retry(NoBackoff(), 0)
    return cast(aredis.Redis, async_client(url, **options))


async def follow_master(
    client: aredis.Redis, on_switch: Callable[[str, str], None] | None = None
) -> bool:
    """Sentinel: ask the sentinels which server is the master now; if it is not the one that
    ``client``'s connections talk to, close them all, those in use too (after calling
    ``on_switch(old, new)`` with both addresses). A command waiting on a master that
    vanished without closing its connections (its host lost, frozen or cut off by the
    network) then fails at once instead of at its socket timeout, and nothing more is
    written to an old master that a switchover demoted, in the seconds before the sentinels
    make it a replica (and it discards what it took meanwhile). True when it switched; False
    otherwise (no Sentinel, no change, the first look). Raises what the lookup raises
    (:data:`producer.topology.REDIS_ERRORS`)."""
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return False
    old: tuple[str, int] | None = pool.master_address
    new: tuple[str, int] = await cast(Any, pool).get_master_address()  # (closes idle ones)
    if old is None or tuple(new) == tuple(old):
        return False
    if on_switch is not None:
        on_switch(f"{old[0]}:{old[1]}", f"{new[0]}:{new[1]}")
    await pool.disconnect(inuse_connections=True)
    return True


@dataclass(frozen=True, slots=True)
class Claim:
    """This worker's claim on an event id for one handling (see ``CLAIM``): ``value`` is
    what the claim key holds while it is ours; only that value is ever released."""

    event_id: str
    value: str


@dataclass(frozen=True, slots=True)
class Depths:
    queue: int
    retry: int
    dead: int
    processing: int
    held: int = 0  # events held for a digest


class Queue:
    """The worker's view of Redis. One instance per worker process."""

    def __init__(
        self,
        redis: aredis.Redis,
        keys: Keys,
        worker_id: str,
        *,
        sent_ttl_s: int = 7 * 24 * 3600,
        deliveries_kept: int = 20000,
        heartbeat_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        guard: Guard | None = None,
    ) -> None:
        self.redis = redis
        self.guard = guard
        self.keys = keys
        self.worker_id = worker_id
        self.processing = keys.processing(worker_id)
        self.sent_ttl_s = sent_ttl_s
        self.deliveries_kept = deliveries_kept
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.heartbeat_ttl_ms = int(heartbeat_ttl_s * 1000)
        self._clock = clock  # monotonic: the heartbeat lease
        self._now = wall_clock  # unix time: due times, rate windows, digests
        # Monotonic time until which other workers see this worker's heartbeat: a renewal
        # sent at t keeps it until t + TTL (measured from before the call, so a slow reply
        # never overstates it).
        self._lease_until = 0.0
        # "<worker id>|<nonce of this run>": claims of an earlier run are not ours
        self.nonce = uuid.uuid4().hex[:16]
        self.owner = f"{worker_id}|{self.nonce}"
        self.claim_ttl_ms = 15 * 60 * 1000
        # The claims this run holds (claimed or being claimed, not yet released): another
        # claim of this run found on an id is stale (see CLAIM).
        self._claims: set[str] = set()
        self._claim = redis.register_script(CLAIM)
        self._release = redis.register_script(RELEASE)
        self._fan_out = redis.register_script(FAN_OUT)
        self._renew = redis.register_script(RENEW)
        self._ack = redis.register_script(ACK)
        self._settle_script = redis.register_script(SETTLE)
        self._batch = _Batcher(redis)
        self._fetch_many = redis.register_script(FETCH_MANY)
        self._schedule = redis.register_script(SCHEDULE)
        self._recover = redis.register_script(RECOVER)
        self._replay = redis.register_script(REPLAY)
        self._reconcile = redis.register_script(RECONCILE)
        self._rate = redis.register_script(RATE)
        self._suppress = redis.register_script(SUPPRESS)
        self._hold = redis.register_script(HOLD)
        self._take_digest = redis.register_script(TAKE_DIGEST)
        self._watch_step = redis.register_script(WATCH_STEP)

    # ------------------------------------------------------------------ worker liveness
    @_guarded("connect")
    async def ping(self) -> None:
        await self.redis.ping()

    @_guarded("heartbeat", urgent=True)
    async def heartbeat(self, info: dict[str, Any]) -> bool:
        """Register this worker and renew its heartbeat (one round trip, allowed while Redis
        is full). False when the worker was not registered: at its first start, or because
        another worker took it for dead and returned its in-flight events to the queue."""
        sent_at = self._clock()
        res = await self._renew(
            keys=[self.keys.workers, self.keys.heartbeat(self.worker_id)],
            args=[self.worker_id, json.dumps(info), self.heartbeat_ttl_ms],
        )
        self._lease_until = max(self._lease_until, sent_at + self.heartbeat_ttl_s)
        return int(cast(int, res)) == 1

    def lease_left(self) -> float:
        """Seconds until this worker's heartbeat expires unless renewed (negative: it has)."""
        return self._lease_until - self._clock()

    @property
    def fenced(self) -> bool:
        """The heartbeat has not been renewed for half its TTL: start no new send and fetch
        nothing (the worker could be taken for dead, and its events handed to another
        worker, before a send started now has finished)."""
        return self.lease_left() < self.heartbeat_ttl_s / 2

    @_guarded("recover")
    async def recover(
        self, *, including_self: bool = False, ready: Callable[[], bool] | None = None
    ) -> dict[str, int]:
        """Return dead workers' in-flight events to the queue: {worker id: count moved}.
        The heartbeats are read here and each dead worker's list is moved by a script that
        looks at its heartbeat again (every key it touches named: Redis Cluster). With
        ``ready``, nothing is done (``{}``) unless ``ready()`` says so at the moment of the
        try (:meth:`worker.outage.RedisGuard.answered_for`)."""
        if ready is not None and not ready():
            return {}
        own = self.worker_id if including_self else None
        dead = [w for w, beat in (await self._heartbeats()).items() if beat is None or w == own]
        if not dead:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for w in dead:
            await _pipelined(
                pipe,
                self._recover,
                [
                    self.keys.workers,
                    self.keys.heartbeat(w),
                    self.keys.processing(w),
                    self.keys.queue,
                ],
                [w, "1" if w == own else "0"],
            )
        moved = [int(n) for n in await pipe.execute()]
        return {w: n for w, n in zip(dead, moved, strict=True) if n > 0}

    async def deregister(self) -> None:
        pipe = await _transaction(self.redis)
        pipe.delete(self.keys.heartbeat(self.worker_id))
        pipe.srem(self.keys.workers, self.worker_id)
        await pipe.execute()

    # ------------------------------------------------------------------ fetch
    @_guarded("fetch")
    async def fetch_ready(self, n: int) -> list[bytes]:
        """Up to n events without blocking (one round trip)."""
        if n <= 0:
            return []
        res = await self._fetch_many(keys=[self.keys.queue, self.processing], args=[n])
        return list(cast(list[bytes], res))

    @_guarded("fetch")
    async def fetch_blocking(self, redis: aredis.Redis, timeout_s: float) -> bytes | None:
        """Wait up to timeout_s for one event (BLMOVE on the given, dedicated connection)."""
        res = await redis.blmove(self.keys.queue, self.processing, _v(timeout_s), "RIGHT", "LEFT")
        return cast(bytes | None, res)

    def claim_for(self, event_id: str, token: str) -> Claim:
        """The claim this worker makes on ``event_id`` for one handling named ``token``."""
        return Claim(event_id, f"{self.owner}|{token}")

    @_guarded("claim")
    async def claim(self, claim: Claim) -> str:
        """'claimed' (send it, then settle with this claim), 'sent' or 'busy'. Calling again
        with the same claim (a retry after a lost reply) finds it ours."""
        keys = [self.keys.sent(claim.event_id), self.keys.sending(claim.event_id)]
        args: list[Any] = [claim.value, self.claim_ttl_ms]
        self._claims.add(claim.value)  # before the call: a claim in flight is a live one
        res = _s(cast(bytes, await self._batch.call(self._claim, keys, args)))
        for _ in range(CLAIM_HANDOVERS):
            if not res.startswith("held "):
                break
            theirs = res.removeprefix("held ")
            wid, nonce, _token = theirs.split("|", 2)
            stale = f"{wid}|{nonce}" == self.owner and theirs not in self._claims
            res = _s(
                cast(
                    bytes,
                    await self._claim(
                        keys=[*keys, self.keys.heartbeat(wid)],
                        args=[*args, theirs, "" if stale else nonce],
                    ),
                )
            )
        if res != "claimed":
            self._claims.discard(claim.value)
        return "busy" if res.startswith("held ") else res

    @_guarded("release")
    async def release(self, claims: Sequence[Claim], *, pipe: Any = None) -> None:
        """Release claims that are still ours (another owner's claim is left alone); with
        ``pipe``, queued on that pipeline instead."""
        if not claims:
            return
        keys = [self.keys.sending(c.event_id) for c in claims]
        args = [c.value for c in claims]
        if pipe is None:
            await self._release(keys=keys, args=args)
            self._released(claims)
        else:
            await _pipelined(pipe, self._release, keys, args)

    def _released(self, claims: Sequence[Claim | None]) -> None:
        """Forget claims whose release Redis has run (once the call returned)."""
        for claim in claims:
            if claim is not None:
                self._claims.discard(claim.value)

    # ------------------------------------------------------------------ settle
    def _record(self, pipe: Any, record: DeliveryRecord) -> None:
        pipe.lpush(self.keys.deliveries, record.to_json())
        pipe.ltrim(self.keys.deliveries, 0, self.deliveries_kept - 1)
        for counter in _counters(record):
            pipe.hincrby(self.keys.counters, counter, 1)

    @_guarded("ack")
    async def ack(self, raw: bytes, claim: Claim, record: DeliveryRecord) -> bool:
        """Delivered: drop from processing, mark sent, release our claim, record it (one
        command, sent together with other lanes' acks and claims when they coincide).
        False when the event was no longer in this worker's processing list."""
        res = await self._batch.call(
            self._ack,
            [
                self.processing,
                self.keys.sent(claim.event_id),
                self.keys.sending(claim.event_id),
                self.keys.deliveries,
                self.keys.counters,
            ],
            [raw, self.sent_ttl_s, record.to_json(), self.deliveries_kept, claim.value],
        )
        self._released([claim])
        return int(cast(int, res)) == 1

    async def _settle(
        self,
        raw: bytes,
        *,
        op: str,
        target: str,
        member: Any = "",
        score: float = 0.0,
        claim: Claim | None,
        record: DeliveryRecord,
    ) -> bool:
        res = await self._settle_script(
            keys=[
                self.processing,
                target,
                self.keys.sending(claim.event_id if claim else "-"),
                self.keys.deliveries,
                self.keys.counters,
            ],
            args=[
                raw,
                op,
                member,
                score,
                claim.value if claim else "",
                record.to_json(),
                self.deliveries_kept,
                *_counters(record),
            ],
        )
        self._released([claim])
        return int(cast(int, res)) == 1

    @_guarded("drop")
    async def drop(self, raw: bytes, record: DeliveryRecord, claim: Claim | None = None) -> bool:
        """Nothing more to do (a duplicate, a suppressed repeat): out of processing."""
        return await self._settle(
            raw, op="none", target=self.keys.queue, claim=claim, record=record
        )

    @_guarded("fan-out")
    async def fan_out(self, raw: bytes, copies: Sequence[str], record: DeliveryRecord) -> bool:
        """One delivery per channel: processing -> the copies at the front of the queue."""
        res = await self._fan_out(
            keys=[self.processing, self.keys.queue, self.keys.deliveries, self.keys.counters],
            args=[raw, record.to_json(), self.deliveries_kept, *copies],
        )
        return int(cast(int, res)) == 1

    @_guarded("retry")
    async def retry(
        self,
        raw: bytes,
        again: str,
        due: float,
        record: DeliveryRecord,
        claim: Claim | None = None,
    ) -> bool:
        """Wait for a retry: the updated event text goes into the retry set at its due time."""
        return await self._settle(
            raw,
            op="zadd",
            target=self.keys.retry,
            member=again,
            score=due,
            claim=claim,
            record=record,
        )

    @_guarded("dead letter")
    async def bury(
        self,
        raw: bytes,
        dead_letter: dict[str, Any],
        record: DeliveryRecord,
        claim: Claim | None = None,
    ) -> bool:
        """Dead letter: processing -> dead, with the reason."""
        return await self._settle(
            raw,
            op="lpush",
            target=self.keys.dead,
            member=json.dumps(dead_letter, ensure_ascii=False),
            claim=claim,
            record=record,
        )

    @_guarded("ack")
    async def split(
        self, raw: bytes, claim: Claim, record: DeliveryRecord, again: str, due: float
    ) -> None:
        """Delivered to some recipients; a retry for the refused ones (one round trip)."""
        pipe = await _transaction(self.redis)
        pipe.lrem(self.processing, 1, _v(raw))
        pipe.set(self.keys.sent(claim.event_id), b"1", ex=self.sent_ttl_s)
        await self.release([claim], pipe=pipe)
        pipe.zadd(self.keys.retry, {again: due})
        self._record(pipe, record)
        pipe.hincrby(self.keys.counters, "retried", 1)
        await pipe.execute()
        self._released([claim])

    @_guarded("requeue")
    async def requeue(self, raw: bytes, record: DeliveryRecord, claim: Claim | None = None) -> bool:
        """Back to the front of the queue, unchanged (not an attempt)."""
        return await self._settle(
            raw, op="rpush", target=self.keys.queue, member=raw, claim=claim, record=record
        )

    @_guarded("reconcile")
    async def reconcile(self, held: Sequence[bytes]) -> int:
        """Return to the queue whatever is in this worker's processing list but not in
        ``held`` (the events it really has); the number moved."""
        res = await self._reconcile(keys=[self.processing, self.keys.queue], args=list(held))
        return int(cast(int, res))

    async def requeue_all(self) -> int:
        """Everything in this worker's processing list back to the queue (graceful stop)."""
        moved = await self.recover(including_self=True)
        return moved.get(self.worker_id, 0)

    # ------------------------------------------------------------------ retries
    @_guarded("schedule")
    async def schedule(self, now: float | None = None, limit: int = 500) -> int:
        """Move due retries to the front of the queue; returns how many."""
        n = await self._schedule(
            keys=[self.keys.retry, self.keys.queue], args=[now or self._now(), limit]
        )
        return int(cast(int, n))

    @_guarded("schedule")
    async def next_due(self) -> float | None:
        res = await self.redis.zrange(self.keys.retry, 0, 0, withscores=True)
        return float(res[0][1]) if res else None

    # ------------------------------------------------------------------ trading fit
    @_guarded("rate limit")
    async def rate_acquire(
        self,
        account: str,
        per_minute: int,
        *,
        force: bool = False,
        now: float | None = None,
        window_s: float = 60.0,
    ) -> float:
        """Take a send slot of ``account`` (at most ``per_minute`` sends in any ``window_s``
        seconds): 0.0 when allowed, else the seconds until a slot frees."""
        now = self._now() if now is None else now
        member = f"{now:.6f}:{self.worker_id}:{time.perf_counter_ns()}"
        res = await self._rate(
            keys=[self.keys.rate(account)],
            args=[now, window_s, per_minute, member, "1" if force else "0"],
        )
        return float(_s(cast(bytes, res)))

    @_guarded("suppress")
    async def suppress(
        self, dedup_key: str, window_s: float, event_id: str, *, now: float | None = None
    ) -> tuple[bool, int, float]:
        """(suppressed?, count, since): when not suppressed, count/since describe the
        previous window's suppressed repeats (0 when none)."""
        now = self._now() if now is None else now
        res = cast(
            list[bytes],
            await self._suppress(
                keys=[self.keys.suppress(dedup_key)], args=[now, window_s, event_id]
            ),
        )
        return _s(res[0]) == "suppressed", int(_s(res[1])), float(_s(res[2]))

    @_guarded("hold")
    async def hold(
        self, group: str, raws: Sequence[bytes], due: float, record: DeliveryRecord
    ) -> int:
        """Hold events for a digest of ``group`` due at ``due`` (processing -> held)."""
        res = await self._hold(
            keys=[
                self.processing,
                self.keys.held(group),
                self.keys.digests,
                self.keys.deliveries,
                self.keys.counters,
            ],
            args=[group, due, record.to_json(), self.deliveries_kept, *raws],
        )
        return int(cast(int, res))

    @_guarded("digests")
    async def take_digest(self, now: float | None = None) -> tuple[str, list[bytes]] | None:
        """One due digest group's events, moved into this worker's processing list; None
        when no group is due, or when another worker took the earliest one first."""
        now = self._now() if now is None else now
        due = await self.redis.zrangebyscore(self.keys.digests, "-inf", now, start=0, num=1)
        if not due:
            return None
        group = _s(cast(bytes, due[0]))
        res = cast(
            list[bytes],
            await self._take_digest(
                keys=[self.keys.digests, self.keys.held(group), self.processing],
                args=[now, group],
            ),
        )
        return (group, list(res[1:])) if res else None

    @_guarded("digests")
    async def next_digest_due(self) -> float | None:
        res = await self.redis.zrange(self.keys.digests, 0, 0, withscores=True)
        return float(res[0][1]) if res else None

    @_guarded("ack")
    async def ack_digest(
        self, raws: Sequence[bytes], claims: Sequence[Claim], record: DeliveryRecord
    ) -> None:
        """A digest was accepted: every event in it is delivered (one round trip)."""
        pipe = await _transaction(self.redis)
        for raw, claim in zip(raws, claims, strict=True):
            pipe.lrem(self.processing, 1, _v(raw))
            pipe.set(self.keys.sent(claim.event_id), b"1", ex=self.sent_ttl_s)
        await self.release(claims, pipe=pipe)
        self._record(pipe, record)
        pipe.hincrby(self.keys.counters, "digested", len(raws))
        await pipe.execute()
        self._released(claims)

    # ------------------------------------------------------------------ pause flag
    @_guarded("pause flag")
    async def set_paused(self, reason: str | None, ttl_s: float = 600.0) -> None:
        if reason is None:
            await self.redis.delete(self.keys.paused)
        else:
            value = json.dumps({"worker": self.worker_id, "reason": reason, "at": self._now()})
            await self.redis.set(self.keys.paused, value, px=int(ttl_s * 1000))

    # ------------------------------------------------------------------ inspection
    @_guarded("depths")
    async def depths(self) -> Depths:
        workers = [_s(w) for w in await self.redis.smembers(self.keys.workers)]
        groups = [_s(cast(bytes, g)) for g in await self.redis.zrange(self.keys.digests, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(self.keys.queue)
        pipe.zcard(self.keys.retry)
        pipe.llen(self.keys.dead)
        for w in workers:
            pipe.llen(self.keys.processing(w))
        for g in groups:
            pipe.llen(self.keys.held(g))
        res = [int(x) for x in await pipe.execute()]
        n = 3 + len(workers)
        return Depths(res[0], res[1], res[2], sum(res[3:n]), sum(res[n:]))

    @_guarded("scan")
    async def foreign_queues(self, *, max_keys: int = 100_000) -> dict[str, int]:
        """Lists named ``<other prefix>:queue`` on this Redis (database) whose oldest element
        looks like a notifier event: {key: length}. A producer with another KEY_PREFIX
        pushes there and no worker of this prefix will ever see it. Looks at ``max_keys``
        keys at most (SCAN, never KEYS)."""
        found: dict[str, int] = {}
        seen = 0
        async for key in self.redis.scan_iter(match="*:queue", count=1000, _type="list"):
            seen += 1
            name = _s(key)
            if name != self.keys.queue:
                oldest = await self.redis.lindex(name, -1)
                if oldest is not None and _looks_like_event(oldest):
                    found[name] = int(await self.redis.llen(name))
            if seen >= max_keys:
                break
        return found

    async def counters(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self.keys.counters)
        return {_s(k): int(v) for k, v in raw.items()}

    async def recent(self, since: float) -> list[DeliveryRecord]:
        """Delivery records newer than ``since`` (newest first)."""
        out: list[DeliveryRecord] = []
        start, page = 0, 1000
        while True:
            chunk = await self.redis.lrange(self.keys.deliveries, start, start + page - 1)
            if not chunk:
                return out
            for item in chunk:
                rec = DeliveryRecord.from_json(item)
                if rec.t < since:
                    return out
                out.append(rec)
            start += page

    async def _heartbeats(self) -> dict[str, bytes | None]:
        """Every registered worker's heartbeat as stored (None: expired)."""
        ids = sorted(_s(w) for w in await self.redis.smembers(self.keys.workers))
        if not ids:
            return {}
        values = await self.redis.mget([self.keys.heartbeat(w) for w in ids])
        return dict(zip(ids, cast(list[bytes | None], values), strict=True))

    async def workers(self) -> dict[str, dict[str, Any] | None]:
        beats = await self._heartbeats()
        return {w: (json.loads(v) if v else None) for w, v in beats.items()}

    # ------------------------------------------------------------------ liveness (watch)
    @_guarded("seen")
    async def record_seen(self, marks: dict[str, tuple[float, str | None]]) -> None:
        """Signs of life: {strategy: (unix time, subject of its event or None)}. A time
        never goes back (ZADD GT), so a late retry of an old event changes nothing."""
        if not marks:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.seen, {s: t for s, (t, _) in marks.items()}, gt=True)
        last = {
            s: json.dumps({"subject": subj, "ts": t}, ensure_ascii=False)
            for s, (t, subj) in marks.items()
            if subj is not None
        }
        if last:
            pipe.hset(self.keys.last, mapping=cast(Any, last))
        await pipe.execute()

    @_guarded("watch")
    async def watch_snapshot(self) -> tuple[dict[str, float], dict[str, str]]:
        """Every strategy's last sign of life and every watch state (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(self.keys.seen, 0, -1, withscores=True)
        pipe.hgetall(self.keys.watch)
        seen, states = await pipe.execute()
        return (
            {_s(m): float(t) for m, t in seen},
            {_s(k): _s(v) for k, v in states.items()},
        )

    async def last_events(self, strategies: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The last event (subject, ts) of each strategy that sent one."""
        if not strategies:
            return {}
        values = await self.redis.hmget(self.keys.last, list(strategies))
        out: dict[str, dict[str, Any]] = {}
        for name, value in zip(strategies, values, strict=True):
            if value:
                try:
                    out[name] = dict(json.loads(value))
                except (ValueError, TypeError):
                    continue
        return out

    @_guarded("watch")
    async def watch_step(
        self, strategy: str, expected: str, new: str, alerts: Sequence[str] = ()
    ) -> bool:
        """Set ``strategy``'s watch state to ``new`` (and queue ``alerts``) if it is still
        ``expected``; False when another worker changed it first."""
        res = await self._watch_step(
            keys=[self.keys.watch, self.keys.queue], args=[strategy, expected, new, *alerts]
        )
        return int(cast(int, res)) == 1

    async def forget(self, strategies: Sequence[str]) -> int:
        """Drop strategies from the liveness records (a retired strategy); how many were
        known."""
        if not strategies:
            return 0
        pipe = await _transaction(self.redis)
        pipe.zrem(self.keys.seen, *strategies)
        pipe.hdel(self.keys.watch, *strategies)
        pipe.hdel(self.keys.last, *strategies)
        res = await pipe.execute()
        return max(int(res[0]), int(res[1]))

    # ------------------------------------------------------------------ dead letters
    async def dead_letters(self, limit: int = 100) -> list[tuple[bytes, dict[str, Any]]]:
        raw = await self.redis.lrange(self.keys.dead, 0, limit - 1 if limit > 0 else -1)
        return [(cast(bytes, r), json.loads(r)) for r in raw]

    async def replay(self, raw: bytes, event_text: str) -> bool:
        res = await self._replay(keys=[self.keys.dead, self.keys.queue], args=[raw, event_text])
        return int(cast(int, res)) == 1

    async def purge_dead(self) -> int:
        pipe = await _transaction(self.redis)
        pipe.llen(self.keys.dead)
        pipe.delete(self.keys.dead)
        res = await pipe.execute()
        return int(res[0])
