"""The ``notifier`` command. Exit codes: 0 ok, 1 a check or operation failed, 2 bad usage or
settings, 3 ``stats --slo`` below the objective. Errors are one line saying what to do."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from producer.client import AsyncNotifier, NotifierUnavailable
from producer.event import Event, InvalidEvent, event_from_dict, parse_event

from .errors import SendError
from .logs import setup_logging
from .mailer import Connection, message_bytes, tls_context
from .metrics import summarize
from .queue import Queue, connect
from .settings import Settings, SettingsError, load_settings

__all__ = ["main"]


class CommandError(Exception):
    """A failure to report as one line, with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text) * 60
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"{text!r}: use e.g. 30s, 15m, 2h") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="notifier",
        description="Deliver trading strategies' alerts from a Redis queue by e-mail.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the worker daemon")
    run.add_argument("--burst", action="store_true", help="exit once nothing is left to do")

    push = sub.add_parser("push", help="queue an event from the shell")
    push.add_argument("subject", nargs="?", help="subject line")
    push.add_argument("--body", help="free text ('-' reads standard input)")
    push.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                      help="a data field (numbers are kept as numbers); repeatable")  # fmt: skip
    push.add_argument("--strategy")
    push.add_argument("--kind", default="info")
    push.add_argument("--severity", choices=["info", "warning", "critical"], default="info")
    push.add_argument("--to", action="append", help="recipient (repeatable)")
    push.add_argument("--id", help="idempotency key")
    push.add_argument("--dedup-key", help="repeats with this key within the window are sent once")
    push.add_argument("--dedup-window-s", type=float, metavar="SECONDS")
    push.add_argument("--expires-s", type=float, metavar="SECONDS",
                      help="dead letter 'expired' instead of delivering later than this")  # fmt: skip
    push.add_argument("--json", dest="raw", help="a whole event as JSON ('-' reads stdin)")

    sub.add_parser("check", help="check settings, Redis and SMTP login (sends nothing)")

    st = sub.add_parser("send-test", help="send one real e-mail and show where the time went")
    st.add_argument("--to", required=True, help="recipient address")

    stats = sub.add_parser("stats", help="depths, outcomes and latency of all workers")
    stats.add_argument("--window", type=_duration, default=_duration("15m"),
                       help="how far back (e.g. 5m, 1h; default 15m)")  # fmt: skip
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    stats.add_argument("--slo", type=float, metavar="SHARE",
                       help="exit 3 when the share within the latency target is below SHARE "
                       "(e.g. 0.99)")  # fmt: skip

    dead = sub.add_parser("dead", help="inspect, replay or purge dead letters")
    dsub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dl = dsub.add_parser("list", help="show dead letters, newest first")
    dl.add_argument("--limit", type=int, default=20)
    dl.add_argument("--json", action="store_true")
    dr = dsub.add_parser("replay", help="queue dead letters again (attempts reset)")
    g = dr.add_mutually_exclusive_group(required=True)
    g.add_argument("--id", help="the event id to replay")
    g.add_argument("--all", action="store_true", help="replay every dead letter")
    dp = dsub.add_parser("purge", help="delete every dead letter")
    dp.add_argument("--yes", action="store_true", help="do not ask")

    demo = sub.add_parser("demo", help="the whole pipeline on a throwaway Redis and SMTP sink")
    demo.add_argument("--events", type=int, default=20)

    bench = sub.add_parser("bench", help="end-to-end benchmark against the old smtplib recipe")
    bench.add_argument("--quick", action="store_true", help="a short run (for smoke tests)")
    bench.add_argument("--rtt-ms", type=float, default=50.0,
                       help="round trip added by the latency proxy (default 50)")  # fmt: skip
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--scenario", action="append", metavar="NAME",
                       help="run only this scenario (repeatable): tls, chunking, burst, "
                       "steady, saturation, rss")  # fmt: skip
    return p


# ======================================================================== helpers
def _settings(*, mail: bool = False) -> Settings:
    try:
        s = load_settings()
        if mail:
            s.require_mail()
        return s
    except SettingsError as exc:
        raise CommandError(str(exc), 2) from None


def _queue(s: Settings) -> Queue:
    from producer.keys import Keys

    return Queue(connect(s.redis_url, timeout=2.0), Keys(s.key_prefix), s.worker_id)


def _redis_error(s: Settings, exc: BaseException) -> CommandError:
    return CommandError(
        f"Redis at {s.redis_url_display} unreachable ({exc}); start it or set NOTIFIER_REDIS_URL"
    )


def _coerce(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(value, value)


# ======================================================================== commands
def cmd_run(args: argparse.Namespace) -> int:
    from .service import run

    s = _settings(mail=True)
    setup_logging(s.log_level, s.log_format)
    return run(s, burst=args.burst)


async def _push(args: argparse.Namespace) -> str:
    s = _settings()
    if args.raw is not None:
        text = sys.stdin.read() if args.raw == "-" else args.raw
        try:
            event = parse_event(text.encode())
        except InvalidEvent as exc:
            raise CommandError(f"invalid event: {exc.reason}", 2) from None
    else:
        body = sys.stdin.read() if args.body == "-" else args.body
        data = {}
        for item in args.data:
            key, sep, value = item.partition("=")
            if not sep:
                raise CommandError(f"--data {item!r}: use KEY=VALUE", 2)
            data[key] = _coerce(value)
        fields = {
            "subject": args.subject, "body": body, "data": data or None,
            "strategy": args.strategy, "kind": args.kind, "severity": args.severity,
            "to": args.to, "id": args.id, "ts": time.time(), "dedup_key": args.dedup_key,
            "dedup_window_s": args.dedup_window_s, "expires_s": args.expires_s,
        }  # fmt: skip
        try:
            event = event_from_dict({k: v for k, v in fields.items() if v is not None})
        except InvalidEvent as exc:
            raise CommandError(f"invalid event: {exc.reason}", 2) from None
    async with AsyncNotifier(s.redis_url, key_prefix=s.key_prefix, timeout=2.0) as n:
        try:
            return await n.send_event(event)
        except InvalidEvent as exc:  # e.g. over 64 KiB once encoded
            raise CommandError(f"invalid event: {exc.reason}", 2) from None
        except NotifierUnavailable as exc:
            raise _redis_error(s, exc) from None


def cmd_push(args: argparse.Namespace) -> int:
    print(asyncio.run(_push(args)))
    return 0


async def _check() -> int:
    s = _settings()
    ok = True
    print(f"settings   ok: SMTP {s.smtp_host}:{s.smtp_port} ({s.smtp_tls}), "
          f"from {s.mail_from}, to {','.join(s.mail_to) or '-'}, {s.concurrency} lane(s)")  # fmt: skip
    try:
        s.require_mail()
    except SettingsError as exc:
        print(f"settings   FAIL: {exc}")
        ok = False
    q = _queue(s)
    try:
        t0 = time.perf_counter()
        await q.redis.ping()
        rtt = (time.perf_counter() - t0) * 1000
        d = await q.depths()
        print(f"redis      ok: {s.redis_url_display} ({rtt:.1f} ms); queue {d.queue}, retry {d.retry}, "
              f"dead {d.dead}, processing {d.processing}")  # fmt: skip
        for warning in await _redis_durability(q):
            print(f"redis      WARNING: {warning}")
        paused = await q.redis.get(q.keys.paused)
        if paused:
            info = json.loads(paused)
            print(f"worker     PAUSED ({info.get('worker')}): {info.get('reason')}")
    except (RedisError, OSError) as exc:
        print(f"redis      FAIL: {_redis_error(s, exc)}")
        ok = False
    finally:
        await q.redis.aclose()
    if s.routes is not None:
        r = s.routes
        print(f"routes     ok: {len(r.route)} route(s) from {s.routes_file}"
              + (f", default to {','.join(r.default.to)}" if r.default else ""))  # fmt: skip
    accounts = s.accounts()
    for i, acc in enumerate(accounts):
        label = f"smtp {acc.smtp_account_name}" if len(accounts) > 1 else "smtp"
        where = f"{acc.smtp_host}:{acc.smtp_port} ({acc.smtp_tls})"
        if i:
            where += f", failover {i}"
        conn = Connection(acc, tls_context(acc) if acc.smtp_tls != "none" else None)
        try:
            t = await conn.open()
            login = (f", login {t.login * 1000:.0f} ms as {acc.smtp_username}"
                     if acc.smtp_username else "")  # fmt: skip
            rate = f", limit {acc.smtp_rate_per_minute}/min" if acc.smtp_rate_per_minute else ""
            print(f"{label:<10} ok: {where}: connect {t.tcp * 1000:.0f} ms, "
                  f"TLS {t.tls * 1000:.0f} ms{login}{rate}")  # fmt: skip
        except SendError as exc:
            print(f"{label:<10} FAIL ({exc.category}) {where}: {exc}")
            ok = False
        finally:
            await conn.close()
    return 0 if ok else 1


async def _redis_durability(q: Queue) -> list[str]:
    """Warnings about a Redis that would lose queued alerts on restart or evict them."""
    out = []
    try:
        cfg: dict[str, Any] = {}
        for key in ("appendonly", "save", "maxmemory-policy", "maxmemory"):
            cfg.update(dict(await q.redis.config_get(key)))  # type: ignore[arg-type]
    except RedisError:
        return ["cannot read CONFIG (managed Redis?): make sure it persists (AOF) and never evicts"]
    val: dict[str, str] = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in cfg.items()
    }
    if val.get("appendonly") != "yes" and not val.get("save"):
        out.append("no persistence (appendonly no, no RDB save): a Redis restart loses every "
                   "queued alert; see deploy/redis-notifier.conf")  # fmt: skip
    elif val.get("appendonly") != "yes":
        out.append("RDB only: a crash loses alerts queued since the last snapshot; "
                   "set appendonly yes (deploy/redis-notifier.conf)")  # fmt: skip
    policy = val.get("maxmemory-policy", "noeviction")
    if (policy != "noeviction" and val.get("maxmemory", "0") != "0") or policy.startswith(
        "allkeys"
    ):
        out.append(f"maxmemory-policy {policy} may evict queued alerts; use noeviction")
    return out


def cmd_check(args: argparse.Namespace) -> int:
    return asyncio.run(_check())


async def _send_test(to: str) -> int:
    from .compose import Composer

    s = _settings()
    if not s.mail_from:
        raise CommandError("NOTIFIER_MAIL_FROM: not set; use the account's address", 2)
    composer = Composer(mail_from=s.mail_from, template_dir=s.template_dir)
    event = Event.model_validate({
        "id": f"send-test-{int(time.time())}", "ts": time.time(), "kind": "test",
        "subject": "notifier send-test 测试邮件", "strategy": "notifier",
        "body": "If you can read this, notifier can deliver your alerts.\n如果你能看到这封邮件，提醒通道已经打通。",
        "data": {"smtp": f"{s.smtp_host}:{s.smtp_port}", "tls": s.smtp_tls},
    })  # fmt: skip
    data = message_bytes(composer.compose(event, event_id=event.id or "", recipients=[to]))
    conn = Connection(s, tls_context(s) if s.smtp_tls != "none" else None)
    try:
        t0 = time.perf_counter()
        t = await conn.open()
        t1 = time.perf_counter()
        result, timing = await conn.send(composer.from_address, [to], data)
        t2 = time.perf_counter()
    except SendError as exc:
        print(f"send-test FAIL ({exc.category}): {exc}")
        return 1
    finally:
        await conn.close()
    print(f"sent to {to}: {result.response.code} {result.response.message}")
    print(f"  connect  {t.tcp * 1000:7.1f} ms")
    print(f"  TLS      {t.tls * 1000:7.1f} ms")
    print(f"  login    {t.login * 1000:7.1f} ms")
    print(
        f"  send     {(t2 - t1) * 1000:7.1f} ms  ({timing.mode}, {timing.round_trips} round trips)"
    )
    print(f"  total    {(t2 - t0) * 1000:7.1f} ms (a warm worker pays only 'send')")
    return 0


def cmd_send_test(args: argparse.Namespace) -> int:
    return asyncio.run(_send_test(args.to))


async def stats_snapshot(q: Queue, window_s: float, target: float) -> dict[str, Any]:
    since = time.time() - window_s
    d = await q.depths()
    recs = await q.recent(since)
    sent = [r for r in recs if r.get("o") == "sent"]
    digests = [r for r in recs if r.get("o") == "digest"]
    # every event of a digest counts as delivered, with its own latency
    latencies = [float(r["l"]) for r in sent] + [float(x) for r in digests for x in r.get("ls", [])]
    summary = summarize(latencies, target)
    waits = summarize([float(r.get("w", 0)) for r in sent], target)
    smtp = summarize([float(r.get("s", 0)) for r in sent], target)
    dead_reasons: dict[str, int] = {}
    for r in recs:
        if r.get("o") == "dead":
            dead_reasons[r.get("reason", "")] = dead_reasons.get(r.get("reason", ""), 0) + 1
    workers = await q.workers()
    paused = await q.redis.get(q.keys.paused)

    def clean(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 4)

    return {
        "window_s": window_s,
        "depths": {
            "queue": d.queue,
            "retry": d.retry,
            "dead": d.dead,
            "processing": d.processing,
            "held": d.held,
        },
        "delivered": len(latencies),
        "digests": len(digests),
        "suppressed": sum(1 for r in recs if r.get("o") == "suppressed"),
        "retried": sum(1 for r in recs if r.get("o") == "retry"),
        "dead": sum(dead_reasons.values()),
        "dead_reasons": dead_reasons,
        "latency": {
            k: (clean(v) if isinstance(v, float) else v) for k, v in summary.as_dict().items()
        },
        "queue_wait_p95_s": clean(waits.p95),
        "smtp_p95_s": clean(smtp.p95),
        "workers": {w: (info is not None) for w, info in workers.items()},
        "accounts": _accounts_view(workers),
        "paused": json.loads(paused) if paused else None,
        "lifetime": await q.counters(),
    }


def _accounts_view(workers: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any]]:
    """Each SMTP account's state as the live workers see it (the worst state wins)."""
    rank = {"ok": 0, "throttled": 1, "down": 2, "paused": 3}
    out: dict[str, dict[str, Any]] = {}
    for info in workers.values():
        for name, acc in ((info or {}).get("accounts") or {}).items():
            cur = out.get(name)
            if cur is None or rank.get(str(acc.get("state")), 0) > rank.get(
                str(cur.get("state")), 0
            ):
                out[name] = acc
    return out


def _print_stats(st: dict[str, Any]) -> None:
    d, lat = st["depths"], st["latency"]
    extra = "".join(f", {k} {st[k]}" for k in ("digests", "suppressed") if st.get(k))
    print(f"last {st['window_s'] / 60:g} min: delivered {st['delivered']}{extra}, retried {st['retried']}, "
          f"dead {st['dead']}" + (f" {st['dead_reasons']}" if st["dead_reasons"] else ""))  # fmt: skip
    print(f"depths: queue {d['queue']}, retry {d['retry']}, dead {d['dead']}, "
          f"processing {d['processing']}, held for digests {d.get('held', 0)}")  # fmt: skip
    if lat["count"]:
        print(f"latency: p50 {lat['p50_s'] * 1000:.1f} ms, p95 {lat['p95_s'] * 1000:.1f} ms, "
              f"p99 {lat['p99_s'] * 1000:.1f} ms, max {lat['max_s'] * 1000:.1f} ms; "
              f"{lat['within_target'] * 100:.2f}% within {lat['target_s']:g} s")  # fmt: skip
    else:
        print("latency: no deliveries in the window")
    alive = [w for w, up in st["workers"].items() if up]
    print(f"workers: {len(alive)} alive" + (f" ({', '.join(alive)})" if alive else ""))
    for name, acc in st["accounts"].items():
        extra = f": {acc['reason']}" if acc.get("reason") else ""
        print(f"account {name}: {acc['state']}{extra}")
    if st["paused"]:
        print(f"PAUSED by {st['paused'].get('worker')}: {st['paused'].get('reason')}")


async def _stats(args: argparse.Namespace) -> int:
    s = _settings()
    q = _queue(s)
    try:
        while True:
            try:
                st = await stats_snapshot(q, args.window, s.latency_target_s)
            except (RedisError, OSError) as exc:
                raise _redis_error(s, exc) from None
            if args.watch:
                print("\033[2J\033[H", end="")
            if args.json:
                print(json.dumps(st, ensure_ascii=False))
            else:
                _print_stats(st)
            sys.stdout.flush()  # --watch into a pipe: each snapshot when it is made
            if not args.watch:
                break
            await asyncio.sleep(args.watch)
    finally:
        await q.redis.aclose()
    share = st["latency"]["within_target"]
    if args.slo is not None and share is not None and share < args.slo:
        print(f"SLO breached: {share * 100:.2f}% within target < {args.slo * 100:.2f}%",
              file=sys.stderr)  # fmt: skip
        return 3
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    return asyncio.run(_stats(args))


async def _dead(args: argparse.Namespace) -> int:
    s = _settings()
    q = _queue(s)
    try:
        if args.dead_command == "list":
            letters = await q.dead_letters(args.limit)
            for _raw, letter in letters:
                if args.json:
                    print(json.dumps(letter, ensure_ascii=False))
                    continue
                when = time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(letter.get("failed_at", 0))
                )
                print(f"{when}  {letter.get('id') or '<no id>'}  [{letter.get('reason')}] "
                      f"{letter.get('error')}")  # fmt: skip
                print(f"    {letter.get('event', '')[:200]}")
            if not args.json:
                print(f"{len(letters)} shown, {(await q.depths()).dead} in total")
            return 0
        if args.dead_command == "purge":
            print(f"purged {await q.purge_dead()} dead letter(s)")
            return 0
        replayed = 0
        for raw, letter in await q.dead_letters(0):
            if args.id and letter.get("id") != args.id:
                continue
            text = _replay_text(letter)
            if text is None:
                print(f"skipped {letter.get('id') or '<no id>'}: the event text is not JSON "
                      "(fix it and push it with `notifier push --json`)")  # fmt: skip
                continue
            if await q.replay(raw, text):
                replayed += 1
        if args.id and not replayed:
            raise CommandError(f"no dead letter with id {args.id}")
        print(f"replayed {replayed} event(s)")
        return 0
    except (RedisError, OSError) as exc:
        raise _redis_error(s, exc) from None
    finally:
        await q.redis.aclose()


def _replay_text(letter: dict[str, Any]) -> str | None:
    """The event as it goes back on the queue: attempts reset, marked as replayed."""
    try:
        obj = json.loads(letter.get("event", ""))
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    obj.pop("_meta", None)
    obj["_meta"] = {"replayed": True}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def cmd_dead(args: argparse.Namespace) -> int:
    if args.dead_command == "purge" and not args.yes:
        if not sys.stdin.isatty():
            raise CommandError("refusing to purge without a terminal to confirm: add --yes", 2)
        answer = input("delete every dead letter? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return 1
    return asyncio.run(_dead(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo

    return int(demo(events=args.events))


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench

    return int(bench(quick=args.quick, rtt_ms=args.rtt_ms, as_json=args.json,
                     scenarios=args.scenario))  # fmt: skip


COMMANDS = {
    "run": cmd_run, "push": cmd_push, "check": cmd_check, "send-test": cmd_send_test,
    "stats": cmd_stats, "dead": cmd_dead, "demo": cmd_demo, "bench": cmd_bench,
}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CommandError as exc:
        print(f"notifier {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
