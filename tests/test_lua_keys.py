"""Every Lua script names every key it touches in KEYS (Redis Cluster), and the scripts that
used to build key names inside Lua (recover, take a digest, claim) keep their guarantees
when what the client read changes before the script runs.

The static check reads every ``#!lua`` string in worker/ and producer/ (no import, no
server): each ``redis.call``/``redis.pcall`` must give each of its key arguments as
``KEYS[...]`` itself, never a variable or a string built with ``..``. A command the table
below does not know fails the check: add its key positions (``COMMAND INFO``).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from producer.keys import Keys
from tests.support.helpers import REPO_ROOT
from worker.queue import CLAIM_HANDOVERS, Queue, connect

KEYS = Keys("notifier")

# Which arguments of a command are keys (1 = the first after its name; * = every one).
_KEY_TABLE = """
APPEND DECR DECRBY EXPIRE GET GETDEL HDEL HEXISTS HGET HGETALL HINCRBY HLEN HMGET HSET INCR
INCRBY LINDEX LLEN LPOP LPUSH LRANGE LREM LSET LTRIM PERSIST PEXPIRE PTTL RPOP RPUSH SADD
SCARD SET SISMEMBER SMEMBERS SREM TTL ZADD ZCARD ZINCRBY ZRANGE ZRANGEBYSCORE ZRANK ZREM
ZREMRANGEBYRANK ZREMRANGEBYSCORE ZSCORE: 1
LMOVE RPOPLPUSH SMOVE RENAME: 1 2
DEL EXISTS MGET TOUCH UNLINK: *
"""
KEY_ARGS: dict[str, tuple[int, ...] | str] = {
    command: "all" if where.strip() == "*" else tuple(int(n) for n in where.split())
    for commands, where in re.findall(r"([A-Z\s]+):([^\n]*)", _KEY_TABLE)
    for command in commands.split()
}
_KEY = re.compile(r"KEYS\[[^\[\]]+\]")
_CALL = re.compile(r"redis\.p?call\s*\(")


def _strip_comments(lua: str) -> str:
    """The script without ``--`` comments (outside string literals)."""
    out: list[str] = []
    for line in lua.splitlines():
        quote, cut = "", len(line)
        for i, ch in enumerate(line):
            if quote:
                quote = "" if ch == quote and line[i - 1] != "\\" else quote
            elif ch in "'\"":
                quote = ch
            elif line.startswith("--", i):
                cut = i
                break
        out.append(line[:cut])
    return "\n".join(out)


def _arguments(text: str, start: int) -> list[str]:
    """The top-level, comma-separated arguments of the call whose '(' ends at ``start``."""
    args, depth, quote, cur = [], 0, "", ""
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return [*args, cur.strip()] if cur.strip() or args else args
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        cur += ch
    raise AssertionError(f"unbalanced call at {text[start - 12 : start + 40]!r}")


def key_problems(lua: str) -> list[str]:
    """Every ``redis.call`` whose key arguments are not written as ``KEYS[...]``."""
    problems: list[str] = []
    text = _strip_comments(lua)
    for m in _CALL.finditer(text):
        args = _arguments(text, m.end())
        command = args[0].strip("'\"").upper() if args else ""
        if not args or args[0][:1] not in "'\"":
            problems.append(f"command not a literal: redis.call({', '.join(args)})")
            continue
        spec = KEY_ARGS.get(command)
        if spec is None:
            problems.append(f"{command}: key positions unknown (add it to KEY_ARGS)")
            continue
        positions = range(1, len(args)) if spec == "all" else spec
        for pos in positions:
            arg = args[pos] if pos < len(args) else "<missing>"
            if not _KEY.fullmatch(arg):
                problems.append(f"{command} key argument {pos} is {arg!r}, not KEYS[...]")
    return problems


def lua_scripts() -> Iterator[tuple[str, str, str]]:
    """(file, name, text) of every ``#!lua`` string constant in worker/ and producer/."""
    for package in ("worker", "producer"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                    value = node.value.value
                    if isinstance(value, str) and value.startswith("#!lua"):
                        name = ast.unparse(node.targets[0])
                        yield str(path.relative_to(REPO_ROOT)), name, value


SCRIPTS = list(lua_scripts())


def test_the_check_finds_the_worker_scripts():
    names = {name for file, name, _ in SCRIPTS if file == str(Path("worker", "queue.py"))}
    assert {"CLAIM", "RECOVER", "TAKE_DIGEST", "SETTLE", "ACK", "RENEW"} <= names


@pytest.mark.parametrize(("file", "name", "lua"), SCRIPTS, ids=[s[1] for s in SCRIPTS])
def test_every_key_a_script_touches_is_declared_in_KEYS(file, name, lua):
    assert key_problems(lua) == [], f"{file} {name}"


@pytest.mark.parametrize(
    "lua",
    [
        # the scripts as they were: key names built from a prefix in ARGV
        "local src = ARGV[1] .. ':processing:' .. wid\n"
        "local v = redis.call('LMOVE', src, KEYS[2], 'LEFT', 'RIGHT')",
        "local hb = redis.call('GET', ARGV[2] .. ':worker:' .. wid)",
        "if redis.call('EXISTS', ARGV[1] .. ':worker:' .. wid) == 0 then end",
        "redis.call('DEL', KEYS[1], KEYS[1] .. 'x')",
        "redis.call(\"SET\", ARGV[1], 'v')",
        "local k = KEYS[1]\nredis.call('GET', k)",
        "redis.call('LMOVE', KEYS[1], ARGV[1], 'LEFT', 'RIGHT')",
        "redis.call('SCAN', 0)",
        "local c = 'GET'\nredis.call(c, KEYS[1])",
    ],
)
def test_the_check_catches_a_key_built_in_lua(lua):
    assert key_problems(lua)


def test_the_check_reads_past_comments_strings_and_nested_calls():
    lua = (
        "-- redis.call('GET', ARGV[1] .. 'x') in a comment\n"
        "redis.call('HSET', KEYS[1], 'a,b', tostring(math.max(1, 2)))  -- ok\n"
        "redis.call('ZADD', KEYS[i], ARGV[1], '(--)')\n"
    )
    assert key_problems(lua) == []


# -- the restructured scripts: what the client read may be stale by the time they run -----


@pytest.fixture
async def make_queue(redis_url) -> AsyncIterator[Callable[[str], Queue]]:
    """Queues of several workers on one client (``q.redis`` for the test's own commands)."""
    client = connect(redis_url)
    yield lambda worker_id: Queue(client, KEYS, worker_id)
    await client.aclose()


def ev(n: int) -> bytes:
    return json.dumps({"id": f"e{n}", "subject": f"s{n}"}).encode()


async def test_recover_leaves_a_worker_whose_heartbeat_came_back_after_it_was_read(
    make_queue, monkeypatch
):
    """The heartbeats were read (w1 looked dead), then w1 renewed: nothing of it moves."""
    w1, me = make_queue("w1"), make_queue("me")
    r = w1.redis
    await w1.heartbeat({})
    await me.heartbeat({})
    await r.rpush(w1.processing, ev(1), ev(2))

    async def stale() -> dict[str, bytes | None]:
        return {"w1": None, "me": b"{}"}

    monkeypatch.setattr(me, "_heartbeats", stale)
    assert await me.recover() == {}
    assert await r.lrange(w1.processing, 0, -1) == [ev(1), ev(2)]
    assert await r.sismember(KEYS.workers, "w1")
    await r.delete(KEYS.heartbeat("w1"))  # now it is dead for real
    assert await me.recover() == {"w1": 2}
    assert await r.lrange(KEYS.queue, 0, -1) == [ev(1), ev(2)]  # oldest first in line
    assert not await r.sismember(KEYS.workers, "w1")


async def test_recover_of_two_dead_workers_and_its_own_list_in_one_call(make_queue):
    a, b, me = make_queue("a"), make_queue("b"), make_queue("me")
    r = a.redis
    for q in (a, b, me):
        await q.heartbeat({})
    await r.rpush(a.processing, ev(1))
    await r.rpush(b.processing, ev(2), ev(3))
    await r.rpush(me.processing, ev(4))
    await r.delete(KEYS.heartbeat("a"), KEYS.heartbeat("b"))
    assert await me.recover(including_self=True) == {"a": 1, "b": 2, "me": 1}
    assert {m.decode() for m in await r.smembers(KEYS.workers)} == {"me"}  # still registered
    assert sorted(await r.lrange(KEYS.queue, 0, -1)) == sorted([ev(1), ev(2), ev(3), ev(4)])


async def test_take_digest_when_another_worker_took_the_group_first(make_queue, monkeypatch):
    q = make_queue("w1")
    r = q.redis
    await r.rpush(KEYS.held("g"), ev(1))
    await r.zadd(KEYS.digests, {"g": 100.0})
    seen_by_both = await r.zrangebyscore(KEYS.digests, "-inf", 200.0, start=0, num=1)
    other = make_queue("w2")
    assert await other.take_digest(now=200.0) == ("g", [ev(1)])
    # then a new hold scheduled the group again, not due yet
    await r.rpush(KEYS.held("g"), ev(2))
    await r.zadd(KEYS.digests, {"g": 500.0})

    async def stale(*args, **kwargs):
        return seen_by_both

    monkeypatch.setattr(q.redis, "zrangebyscore", stale)
    assert await q.take_digest(now=200.0) is None
    assert await r.lrange(q.processing, 0, -1) == []
    assert await r.lrange(KEYS.held("g"), 0, -1) == [ev(2)]
    assert await r.zscore(KEYS.digests, "g") == 500.0


async def test_take_digest_of_a_due_group_with_nothing_held(make_queue):
    q = make_queue("w1")
    r = q.redis
    await r.zadd(KEYS.digests, {"empty": 1.0, "later": 50.0})
    assert await q.take_digest(now=10.0) == ("empty", [])
    assert await q.take_digest(now=10.0) is None
    assert await r.zrange(KEYS.digests, 0, -1) == [b"later"]


async def test_a_claim_held_by_a_live_run_is_busy_by_a_dead_or_earlier_run_taken_over(make_queue):
    mine, theirs = make_queue("w1"), make_queue("w2")
    r = mine.redis
    await theirs.heartbeat({"pid": 2, "nonce": theirs.nonce})
    held = theirs.claim_for("e1", "t")
    assert await theirs.claim(held) == "claimed"
    assert await mine.claim(mine.claim_for("e1", "t")) == "busy"
    assert await r.get(KEYS.sending("e1")) == held.value.encode()

    await theirs.heartbeat({"pid": 2, "nonce": "another-run"})  # w2 restarted
    claim = mine.claim_for("e1", "t")
    assert await mine.claim(claim) == "claimed"
    assert await r.get(KEYS.sending("e1")) == claim.value.encode()
    assert await mine.claim(claim) == "claimed"  # again after a lost reply: still ours

    await r.set(KEYS.sending("e2"), theirs.claim_for("e2", "t").value)
    await r.delete(KEYS.heartbeat("w2"))  # w2 died
    assert await mine.claim(mine.claim_for("e2", "t")) == "claimed"
    await r.set(KEYS.sending("e3"), "no owner in it")
    assert await mine.claim(mine.claim_for("e3", "t")) == "claimed"
    await r.set(KEYS.sent("e4"), "1")
    assert await mine.claim(mine.claim_for("e4", "t")) == "sent"


@pytest.mark.parametrize("new_owner_alive", [True, False])
async def test_a_claim_that_changes_hands_while_its_owner_is_looked_at(make_queue, new_owner_alive):
    """The first call saw a dead owner's claim; before the second, a live (or another dead)
    worker took it over: the second call sees the change and judges the new owner."""
    mine, dead, new = make_queue("w1"), make_queue("w2"), make_queue("w3")
    r = mine.redis
    await new.heartbeat({"nonce": new.nonce if new_owner_alive else "old"})
    await r.set(KEYS.sending("e1"), dead.claim_for("e1", "t").value)
    second = mine._claim
    calls = []

    async def racing(**kwargs):
        if len(kwargs["keys"]) == 2:  # the first call: before anything changes
            return await second(**kwargs)
        calls.append(kwargs["keys"][-1])
        if len(calls) == 1:
            await r.set(KEYS.sending("e1"), new.claim_for("e1", "t").value)
        return await second(**kwargs)

    mine._claim = racing
    answer = await mine.claim(mine.claim_for("e1", "t"))
    assert calls == [KEYS.heartbeat("w2"), KEYS.heartbeat("w3")]
    assert answer == ("busy" if new_owner_alive else "claimed")


async def test_a_claim_that_keeps_changing_hands_is_busy_for_now(make_queue):
    mine, other = make_queue("w1"), make_queue("w2")
    r = mine.redis
    await r.set(KEYS.sending("e1"), other.claim_for("e1", "t0").value)
    second, n = mine._claim, [0]

    async def racing(**kwargs):
        n[0] += len(kwargs["keys"]) == 3
        await r.set(KEYS.sending("e1"), other.claim_for("e1", f"t{n[0]}").value)
        return await second(**kwargs)

    mine._claim = racing
    assert await mine.claim(mine.claim_for("e1", "t")) == "busy"
    assert n[0] == CLAIM_HANDOVERS
    assert (await r.get(KEYS.sending("e1"))).decode().startswith(other.owner)
