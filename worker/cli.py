"""The ``notifier`` command. Exit codes: 0 ok, 1 a check or operation failed, 2 bad usage or
settings, 3 ``stats --slo`` below the objective. Errors are one line saying what to do.

Every command takes ``--env-file PATH`` (see :func:`worker.settings.find_env_file` for the
order otherwise). A pipe closed early (``notifier dead list | head -1``) ends a command
quietly with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from producer.client import AsyncNotifier, NotifierUnavailable
from producer.event import Event, InvalidEvent, check_strategy, event_from_dict, parse_event
from producer.redis_errors import explain_redis_error
from producer.topology import REDIS_ERRORS, AsyncClient, format_inspection, inspect

from .errors import SendError
from .logs import setup_logging
from .mailer import Connection, message_bytes, tls_context
from .metrics import summarize
from .queue import Queue, connect
from .quiet import is_quiet_group
from .records import DeliveryRecord, Status
from .routing import EMAIL as EMAIL_CHANNEL
from .settings import (
    Settings,
    SettingsError,
    find_env_file,
    load_settings,
    unknown_variables,
)

if TYPE_CHECKING:
    from .channels.http import HttpChannel, HttpChannelSettings

__all__ = ["main"]

logger = logging.getLogger(__name__)


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
    env_help = (
        "settings file (default: NOTIFIER_ENV_FILE, else ./.env, else "
        "/etc/notifier/notifier.env if it exists; /dev/null: the environment only)"
    )
    p = argparse.ArgumentParser(
        prog="notifier",
        description="Deliver trading strategies' alerts from a Redis queue by e-mail.",
    )
    p.add_argument("--env-file", metavar="PATH", help=env_help)
    # also after the command (`notifier stats --env-file F`); SUPPRESS keeps one given before
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--env-file", metavar="PATH", default=argparse.SUPPRESS, help=env_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = parent.add_parser(
            name, help=help, parents=[common], **kwargs
        )
        return made

    run = command(sub, "run", "run the worker daemon")
    run.add_argument("--burst", action="store_true", help="exit once nothing is left to do")

    push = command(sub, "push", "queue an event from the shell")
    push.add_argument("subject", nargs="?", help="subject line")
    push.add_argument("--body", help="free text ('-' reads standard input)")
    push.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a data field (numbers are kept as numbers); repeatable",
    )
    push.add_argument("--strategy")
    push.add_argument("--kind", default="info")
    push.add_argument("--severity", choices=["info", "warning", "critical"], default="info")
    push.add_argument("--to", action="append", help="recipient (repeatable)")
    push.add_argument("--id", help="idempotency key")
    push.add_argument("--dedup-key", help="repeats with this key within the window are sent once")
    push.add_argument("--dedup-window-s", type=float, metavar="SECONDS")
    push.add_argument(
        "--expires-s",
        type=float,
        metavar="SECONDS",
        help="dead letter 'expired' instead of delivering later than this",
    )
    push.add_argument("--json", dest="raw", help="a whole event as JSON ('-' reads stdin)")
    push.add_argument(
        "--heartbeat",
        metavar="STRATEGY",
        help="record a sign of life of STRATEGY instead of an event (nothing is mailed)",
    )

    command(sub, "check", "check settings, Redis and SMTP login (sends nothing)")

    st = command(sub, "send-test", "send one real e-mail (or message) and show where the time went")
    st.add_argument("--to", help="recipient address (e-mail)")
    st.add_argument(
        "--channel",
        default="email",
        metavar="NAME",
        help="a channel of NOTIFIER_CHANNELS_FILE instead of e-mail (default: email)",
    )

    stats = command(sub, "stats", "depths, outcomes and latency of all workers")
    stats.add_argument(
        "--window",
        type=_duration,
        default=_duration("15m"),
        help="how far back (e.g. 5m, 1h; default 15m)",
    )
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    stats.add_argument(
        "--slo",
        type=float,
        metavar="SHARE",
        help="exit 3 when the share within the latency target is below SHARE (e.g. 0.99)",
    )

    dead = command(sub, "dead", "inspect, replay or purge dead letters")
    dsub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dl = command(dsub, "list", "show dead letters with their handles, newest first")
    dl.add_argument("--limit", type=int, default=20)
    dl.add_argument("--json", action="store_true")
    dr = command(
        dsub,
        "replay",
        "queue dead letters again (attempts reset); an event that is still invalid stays dead",
    )
    g = dr.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--id",
        metavar="ID_OR_HANDLE",
        help="an event id, or the handle `dead list` shows (also for letters without an id)",
    )
    g.add_argument("--all", action="store_true", help="replay every dead letter")
    dp = command(dsub, "purge", "delete every dead letter")
    dp.add_argument("--yes", action="store_true", help="do not ask")

    wt = command(
        sub,
        "watch",
        "watched strategies: last seen, session, ok / silent / off-session (exit 3 if silent)",
    )
    wt.add_argument("--json", action="store_true", help="one JSON object per strategy")
    wt.add_argument(
        "--forget",
        nargs="+",
        metavar="STRATEGY",
        help="drop retired strategies from the liveness records (they are no longer watched "
        "by a pattern; a rule that names one exactly watches it again)",
    )

    demo = command(sub, "demo", "the whole pipeline on a throwaway Redis and SMTP sink")
    demo.add_argument("--events", type=int, default=20)

    bench = command(sub, "bench", "end-to-end benchmark against the old smtplib recipe")
    bench.add_argument("--quick", action="store_true", help="a short run (for smoke tests)")
    bench.add_argument(
        "--rtt-ms",
        type=float,
        default=50.0,
        help="round trip added by the latency proxy (default 50)",
    )
    bench.add_argument("--json", action="store_true")
    bench.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="run only this scenario (repeatable): tls, chunking, burst, steady, saturation, "
        "rss, webhook, acked",
    )
    return p


# ======================================================================== helpers
def _with_typo(message: str, unknown: Sequence[str]) -> str:
    """``message`` (naming NOTIFIER_X first) and a misspelt variable meant as X, if any."""
    name = message.split(":", 1)[0].split("=", 1)[0]
    typos = [u for u in unknown if u.endswith(f"did you mean {name}?")]
    return f"{message}; note: {typos[0]}" if typos else message


@dataclass(frozen=True, slots=True)
class Loaded:
    """The settings of one command, where they came from, and the variables that are not."""

    settings: Settings
    env_file: Path | None
    unknown: list[str]

    def hint(self, message: str) -> str:
        return _with_typo(message, self.unknown)

    def require_mail(self) -> None:
        try:
            self.settings.require_mail()
        except SettingsError as exc:
            raise CommandError(self.hint(str(exc)), 2) from None


def _load(args: argparse.Namespace) -> Loaded:
    """Settings from ``--env-file`` / NOTIFIER_ENV_FILE / ./.env / the installer's file and
    the environment; CommandError (exit 2) with one line when one is wrong."""
    unknown: list[str] = []
    try:
        env_file = find_env_file(getattr(args, "env_file", None))
        unknown = unknown_variables(env_file)
        settings = load_settings(env_file=env_file)
    except SettingsError as exc:
        raise CommandError(_with_typo(str(exc), unknown), 2) from None
    return Loaded(settings, env_file, unknown)


def _warn(command: str, lines: Sequence[str]) -> None:
    for line in lines:
        print(f"notifier {command}: warning: {line}", file=sys.stderr)


def _check_templates(s: Settings) -> None:
    """Load every template of TEMPLATE_DIR once, so a broken one stops the command with one
    line (file and line) instead of failing each mail."""
    if s.template_dir is None:
        return
    import jinja2

    from .compose import Composer

    where = s.template_dir
    fix = "fix it, or unset NOTIFIER_TEMPLATE_DIR for the built-in templates"
    try:
        names = sorted(n for n in os.listdir(where) if n.endswith(".j2"))
        for name in names:
            where = s.template_dir / name
            where.read_bytes().decode("utf-8")
        where = s.template_dir
        composer = Composer(mail_from=s.mail_from or "notifier@localhost", template_dir=where)
        for name in names:
            where = s.template_dir / name
            composer.env.get_template(name)
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"NOTIFIER_TEMPLATE_DIR: {where}: not UTF-8 (byte {exc.start}); save it as UTF-8", 2
        ) from None
    except jinja2.TemplateSyntaxError as exc:
        raise CommandError(
            f"NOTIFIER_TEMPLATE_DIR: {exc.filename or where} line {exc.lineno}: {exc.message}; "
            f"{fix}",
            2,
        ) from None
    except (jinja2.TemplateError, OSError) as exc:
        raise CommandError(f"NOTIFIER_TEMPLATE_DIR: {where}: {exc}; {fix}", 2) from None


def _queue(s: Settings) -> Queue:
    from producer.keys import Keys

    return Queue(
        connect(s.redis_url, timeout=2.0), Keys.for_redis(s.key_prefix, s.redis_url), s.worker_id
    )


def _redis_error(s: Settings, exc: BaseException) -> CommandError:
    """What Redis said, as one line (full, read-only, refused, DNS, timeout, password...)."""
    return CommandError(explain_redis_error(exc, s.redis_url))


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

    loaded = _load(args)
    s = loaded.settings
    setup_logging(s.log_level, s.log_format)
    for line in loaded.unknown:
        logger.warning("%s", line)
    loaded.require_mail()  # (a missing setting is the one line a failed start prints)
    if loaded.env_file is not None:
        logger.info("settings from %s", loaded.env_file)
    else:
        logger.info("no env file; environment only")
    for line in s.sender_warnings():
        logger.warning("%s", line)
    _check_templates(s)
    try:
        return run(s, burst=args.burst)
    except SettingsError as exc:  # found at start-up, e.g. the metrics port in use
        raise CommandError(str(exc), 2) from None
    except REDIS_ERRORS as exc:  # what waiting does not fix (the worker waits out the rest)
        raise _redis_error(s, exc) from None


def _producer(s: Settings) -> AsyncNotifier:
    # the settings are resolved: the producer reads no env file of its own
    return AsyncNotifier(s.redis_url, key_prefix=s.key_prefix, timeout=2.0, env_file=os.devnull)


_EVENT_OPTIONS = {
    "subject": "a subject",
    "body": "--body",
    "data": "--data",
    "raw": "--json",
    "strategy": "--strategy",
    "to": "--to",
    "id": "--id",
    "dedup_key": "--dedup-key",
    "dedup_window_s": "--dedup-window-s",
    "expires_s": "--expires-s",
}


async def _heartbeat(args: argparse.Namespace, s: Settings) -> str:
    given = [shown for name, shown in _EVENT_OPTIONS.items() if getattr(args, name)]
    if given:
        raise CommandError(
            f"--heartbeat records a sign of life, not an event: leave out {', '.join(given)}"
            " (an event pushed on its own counts as a sign of life too)",
            2,
        )
    try:
        strategy = check_strategy(args.heartbeat)
    except InvalidEvent as exc:
        raise CommandError(f"--heartbeat: {exc.reason}", 2) from None
    async with _producer(s) as n:
        try:
            await n.heartbeat(strategy)
        except NotifierUnavailable as exc:
            raise _redis_error(s, exc) from None
    return f"heartbeat of {strategy} recorded"


async def _push(args: argparse.Namespace) -> str:
    loaded = _load(args)
    s = loaded.settings
    _warn("push", loaded.unknown)
    if args.heartbeat is not None:
        return await _heartbeat(args, s)
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
            "subject": args.subject,
            "body": body,
            "data": data or None,
            "strategy": args.strategy,
            "kind": args.kind,
            "severity": args.severity,
            "to": args.to,
            "id": args.id,
            "ts": time.time(),
            "dedup_key": args.dedup_key,
            "dedup_window_s": args.dedup_window_s,
            "expires_s": args.expires_s,
        }
        try:
            event = event_from_dict({k: v for k, v in fields.items() if v is not None})
        except InvalidEvent as exc:
            raise CommandError(f"invalid event: {exc.reason}", 2) from None
    async with _producer(s) as n:
        try:
            return await n.send_event(event)
        except InvalidEvent as exc:  # e.g. over 64 KiB once encoded
            raise CommandError(f"invalid event: {exc.reason}", 2) from None
        except NotifierUnavailable as exc:
            raise _redis_error(s, exc) from None


def cmd_push(args: argparse.Namespace) -> int:
    print(asyncio.run(_push(args)))
    return 0


async def _check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    s = loaded.settings
    _check_templates(s)
    problems = list(loaded.unknown)
    try:
        s.require_mail()
    except SettingsError as exc:
        problems.append(loaded.hint(str(exc)))
    print(f"env file   {loaded.env_file or 'none: the environment only'}")
    for problem in problems:
        print(f"settings   FAIL: {problem}")
    if not problems:
        print(
            f"settings   ok: SMTP {s.smtp_host}:{s.smtp_port} ({s.smtp_tls}), from {s.mail_from}, "
            f"to {','.join(s.mail_to) or '-'}, {s.concurrency} lane(s)"
        )
    for warning in s.sender_warnings():
        print(f"settings   WARNING: {warning}")
    ok = not problems
    q = _queue(s)
    try:
        t0 = time.perf_counter()
        await q.redis.ping()
        rtt = (time.perf_counter() - t0) * 1000
        d = await q.depths()
        print(
            f"redis      ok: queue {q.keys.queue} on {s.redis_url_display} ({rtt:.1f} ms): "
            f"{d.queue} waiting, retry {d.retry}, dead {d.dead}, processing {d.processing}, "
            f"held {d.held}"
        )
        for line in await _redis_topology(q):
            print(f"redis      {line}")
        for key, n in (await q.foreign_queues()).items():
            print(
                f"redis      WARNING: {n} event(s) wait in {key}, which no worker of prefix "
                f"{s.key_prefix!r} reads: set NOTIFIER_KEY_PREFIX={key.rsplit(':', 1)[0]} on "
                "the producer or the worker"
            )
        paused = await q.redis.get(q.keys.paused)
        if paused:
            info = json.loads(paused)
            print(f"worker     PAUSED ({info.get('worker')}): {info.get('reason')}")
    except REDIS_ERRORS as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        print(f"redis      FAIL: {explain_redis_error(exc, s.redis_url)}")
        ok = False
    finally:
        await q.redis.aclose()
    if s.routes is not None:
        r = s.routes
        default = ""
        if r.default is not None:
            goes = r.default.to or [f"MAIL_TO ({','.join(s.mail_to)})"]
            default = f", default to {','.join([*goes, *(r.default.channels or [])])}"
        quiet = sum(1 for x in r.all() if x.quiet is not None)
        default += f", {quiet} with quiet hours" if quiet else ""
        print(f"routes     ok: {len(r.route)} route(s) from {s.routes_file}{default}")
    if s.watch is not None:
        _check_watch(s)
    accounts = s.accounts()
    for i, acc in enumerate(accounts):
        label = f"smtp {acc.smtp_account_name}" if len(accounts) > 1 else "smtp"
        where = f"{acc.smtp_host}:{acc.smtp_port} ({acc.smtp_tls})"
        if i:
            where += f", failover {i}"
        conn = Connection(acc, tls_context(acc) if acc.smtp_tls != "none" else None)
        try:
            t = await conn.open()
            login = (
                f", login {t.login * 1000:.0f} ms as {acc.smtp_username}"
                if acc.smtp_username
                else ""
            )
            rate = f", limit {acc.smtp_rate_per_minute}/min" if acc.smtp_rate_per_minute else ""
            print(
                f"{label:<10} ok: {where}: connect {t.tcp * 1000:.0f} ms, "
                f"TLS {t.tls * 1000:.0f} ms{login}{rate}"
            )
        except SendError as exc:
            print(f"{label:<10} FAIL ({exc.category}) {where}: {exc}")
            ok = False
        finally:
            await conn.close()
    if not await _check_channels(s):
        ok = False
    return 0 if ok else 1


def _check_watch(s: Settings) -> None:
    """The watch rules, their sessions and calendars; a warning per calendar whose known
    holidays run out within 30 days."""
    import datetime as dt

    w = s.watch
    assert w is not None
    names = list(dict.fromkeys(n for r in w.rules for n in r.sessions))
    cals = w.sessions.calendars_in_use(names)
    known = ", ".join(
        f"{c.name} to {c.known_until.isoformat()}" if c.known_until else f"{c.name} rule-based"
        for c in cals.values()
    )
    print(
        f"watch      ok: {len(w.rules)} rule(s) from {s.watch_file}, sessions "
        f"{', '.join(names)}" + (f"; holidays known: {known}" if known else "")
    )
    for line in w.sessions.calendar_warnings(names, dt.date.today()):
        print(f"watch      WARNING: {line}")


def _channel_summary(channel: HttpChannel) -> str:
    """What `check` says of a working channel: its kind and host, whether it signs, its
    keywords and rate limit; never the URL, a token or a secret."""
    conf: Any = channel.settings
    parts = [f"{channel.kind} {conf.host}"]
    if getattr(conf, "chat_id", None):
        parts.append(f"chat {conf.chat_id}")
    if conf.secret is not None:
        signature = getattr(conf, "signature", None)
        parts.append(f"signed ({signature})" if signature == "standard" else "signed")
    if getattr(conf, "headers", None):
        parts.append(f"headers {', '.join(sorted(conf.headers))}")  # names only
    if keywords := getattr(conf, "keywords", None):
        parts.append(f"keywords {','.join(keywords)}")
    parts.append(f"limit {channel.per_minute}/min" if channel.per_minute else "no rate limit")
    return ", ".join(parts)


async def _check_channels(s: Settings) -> bool:
    """Build every channel of NOTIFIER_CHANNELS_FILE and probe it (Telegram: getMe and
    getChat; Feishu: a signed request without a message; the others: the URL's shape), all at
    once (a service that does not answer costs its timeout once); one line each, in the file's
    order. False when one fails."""
    results = await asyncio.gather(*(_check_channel(conf) for conf in s.channels()))
    for _ok, line in results:
        print(line)
    return all(ok for ok, _line in results)


async def _check_channel(conf: HttpChannelSettings) -> tuple[bool, str]:
    from .channels.registry import build_channel

    label = f"channel {conf.name}"
    try:
        channel = build_channel(conf, priority=0)
    except ValueError as exc:  # (the settings were validated: a kind's own refusal)
        return False, f"{label:<18} FAIL (configuration): {exc}"
    try:
        await channel.probe()
        return True, f"{label:<18} ok: {_channel_summary(channel)}"
    except SendError as exc:
        return False, f"{label:<18} FAIL ({exc.category}): {exc}"
    finally:
        await channel.close()


async def _redis_topology(q: Queue) -> list[str]:
    """The topology (standalone, Sentinel master + replicas, Cluster masters), each master's
    persistence and its replicas' lag, and warnings: no persistence or RDB only, an eviction
    policy that could evict queued alerts, replicas behind, sentinels not answering."""
    try:
        report = await inspect(cast(AsyncClient, q.redis))
    except REDIS_ERRORS as exc:
        return [f"WARNING: cannot read the topology: {explain_redis_error(exc, None)}"]
    return format_inspection(report)


def cmd_check(args: argparse.Namespace) -> int:
    return asyncio.run(_check(args))


def _test_event(data: dict[str, Any], *, what: str = "这封邮件") -> Event:
    """The event `send-test` delivers (its neutral content for every channel)."""
    return Event.model_validate(
        {
            "id": f"send-test-{int(time.time())}",
            "ts": time.time(),
            "kind": "test",
            "subject": "notifier send-test 测试邮件",
            "strategy": "notifier",
            "body": "If you can read this, notifier can deliver your alerts.\n"
            f"如果你能看到{what}，提醒通道已经打通。",
            "data": data,
        }
    )


async def _send_test_channel(loaded: Loaded, name: str) -> int:
    """One test message through channel ``name`` of the channels file."""
    from .channels.registry import build_channel
    from .content import build_alert

    s = loaded.settings
    for line in loaded.unknown:
        print(f"send-test WARNING: {line}")
    confs = {c.name: c for c in s.channels()}
    if name not in confs:
        known = ", ".join(["email", *confs])
        raise CommandError(f"no channel {name!r}; known: {known}", 2)
    conf = confs[name]
    event = _test_event({"channel": name, "type": conf.type}, what="这条消息")
    alert = build_alert(event, event_id=event.id or "", locale=s.locale)
    t0 = time.perf_counter()
    try:
        channel = build_channel(conf, priority=0)
    except ValueError as exc:
        raise CommandError(f"channel {name}: {exc}", 2) from None
    try:
        receipt = await channel.send(0, alert, [])
    except SendError as exc:
        print(f"send-test FAIL ({exc.category}): {exc}")
        return 1
    finally:
        await channel.close()
    total = time.perf_counter() - t0
    print(f"sent through channel {name} ({channel.kind} {conf.host}): {receipt.mode}")
    print(f"  send     {receipt.send_s * 1000:7.1f} ms  (connect, TLS and the request)")
    print(f"  total    {total * 1000:7.1f} ms (a warm worker keeps the connection)")
    return 0


async def _send_test(args: argparse.Namespace) -> int:
    from .compose import Composer

    loaded = _load(args)
    if args.channel != EMAIL_CHANNEL:
        if args.to:
            raise CommandError(
                f"--to is for e-mail; channel {args.channel} sends to its own group or chat", 2
            )
        return await _send_test_channel(loaded, args.channel)
    s = loaded.settings
    to = args.to
    if not to:
        raise CommandError("--to: give the recipient address of the test e-mail", 2)
    # a misspelt variable first: it is why the login below would fail
    for line in (*loaded.unknown, *s.sender_warnings()):
        print(f"send-test WARNING: {line}")
    if not s.mail_from:
        raise CommandError("NOTIFIER_MAIL_FROM: not set; use the account's address", 2)
    if s.smtp_username and s.smtp_password is None:
        loaded.require_mail()
    _check_templates(s)
    composer = Composer(mail_from=s.mail_from, template_dir=s.template_dir)
    event = _test_event({"smtp": f"{s.smtp_host}:{s.smtp_port}", "tls": s.smtp_tls})
    data = message_bytes(composer.compose(event, event_id=event.id or "", recipients=[to]))
    account = s.primary_account()
    conn = Connection(account, tls_context(account) if s.smtp_tls != "none" else None)
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
    send = f"{(t2 - t1) * 1000:7.1f} ms  ({timing.mode}, {timing.round_trips} round trips)"
    print(f"  send     {send}")
    print(f"  total    {(t2 - t0) * 1000:7.1f} ms (a warm worker pays only 'send')")
    return 0


def cmd_send_test(args: argparse.Namespace) -> int:
    return asyncio.run(_send_test(args))


# ------------------------------------------------------------------------ stats
async def stats_snapshot(q: Queue, window_s: float, target: float) -> dict[str, Any]:
    now = time.time()
    d = await q.depths()
    recs = await q.recent(now - window_s)
    sent = [r for r in recs if r.status is Status.SENT]
    # every event of a digest counts as delivered, with its own latency
    latencies = [x for r in recs for x in r.event_latencies]
    summary = summarize(latencies, target)
    waits = summarize([r.queue_wait_s or 0.0 for r in sent], target)
    smtp = summarize([r.send_s or 0.0 for r in sent], target)
    by_status = Counter(r.status for r in recs)
    dead_reasons = dict(Counter(r.reason for r in recs if r.status is Status.DEAD))
    workers = await q.workers()
    accounts = _accounts_view(workers)
    paused = await q.redis.get(q.keys.paused)

    def clean(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 4)

    return {
        "at": round(now, 3),
        "window_s": window_s,
        "depths": {
            "queue": d.queue,
            "retry": d.retry,
            "dead": d.dead,
            "processing": d.processing,
            "held": d.held,
        },
        "delivered": len(latencies),
        "digests": by_status[Status.DIGEST],
        "suppressed": by_status[Status.SUPPRESSED],
        "retried": by_status[Status.RETRY],
        "dead": sum(dead_reasons.values()),
        "dead_reasons": dead_reasons,
        "latency": {
            k: (clean(v) if isinstance(v, float) else v) for k, v in summary.as_dict().items()
        },
        "queue_wait_p95_s": clean(waits.p95),
        "smtp_p95_s": clean(smtp.p95),
        "workers": {w: (info is not None) for w, info in workers.items()},
        "accounts": accounts,
        "channels": _channels_view(recs, accounts, target),
        "held": await _held_view(q, now),
        "paused": json.loads(paused) if paused else None,
        "lifetime": await q.counters(),
    }


HELD_SAMPLE = 50  # events read from the front of each held list to find the oldest


async def _held_view(q: Queue, now: float) -> list[dict[str, Any]]:
    """Events held for a digest, per group (soonest first): its account or channel, why
    (``rate limit``: a group is ``<account>.<recipients hash>``; ``quiet hours``:
    ``<channel>.quiet-<hash>``), how many, the oldest one's age, and when it goes. Read-only."""
    scored = cast(
        list[tuple[bytes, float]], await q.redis.zrange(q.keys.digests, 0, -1, withscores=True)
    )
    groups = [(group.decode(), float(due)) for group, due in scored]
    if not groups:
        return []
    pipe = q.redis.pipeline(transaction=False)
    for name, _due in groups:
        pipe.llen(q.keys.held(name))
        pipe.lrange(q.keys.held(name), 0, HELD_SAMPLE - 1)
    res = await pipe.execute()
    views = []
    for i, (name, due) in enumerate(groups):
        count, sample = int(res[2 * i]), res[2 * i + 1]
        if not count:
            continue
        born = [t for t in map(_produced_at, sample) if t is not None]
        views.append(
            {
                "group": name,
                "account": name.rsplit(".", 1)[0],
                "why": "quiet hours" if is_quiet_group(name) else "rate limit",
                "events": count,
                "oldest_age_s": round(now - min(born), 1) if born else None,
                "due_at": round(due, 3),
                "due_in_s": round(max(0.0, due - now), 1),
            }
        )
    return views


def _produced_at(raw: bytes) -> float | None:
    """When the event was produced (``ts``), else first seen by a worker; None if unknown."""
    try:
        event = parse_event(raw)
    except InvalidEvent:
        return None
    if event.ts is not None:
        return float(event.ts)
    return event.meta.first_seen if event.meta is not None else None


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


def _channels_view(
    recs: Sequence[DeliveryRecord], accounts: dict[str, dict[str, Any]], target: float
) -> dict[str, dict[str, Any]]:
    """Each channel's figures in the window (from the delivery records' channel: the e-mail
    accounts that sent, ``email`` for e-mail deliveries retried or dead, the IM channels) and
    its state as the live workers report it (None: no live worker has it)."""
    out: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        if name not in out:
            acc = accounts.get(name) or {}
            out[name] = {
                "kind": acc.get("kind") or ("email" if name == EMAIL_CHANNEL else ""),
                "state": acc.get("state"),
                "reason": acc.get("reason") or "",
                "delivered": 0,
                "retried": 0,
                "dead": 0,
                "latencies": [],
            }
        return out[name]

    for name in accounts:
        row(name)
    for r in recs:
        if r.status not in (Status.SENT, Status.DIGEST, Status.RETRY, Status.DEAD):
            continue
        cur = row(r.channel or EMAIL_CHANNEL)  # (records older than the channels: e-mail)
        if r.status is Status.RETRY:
            cur["retried"] += 1
        elif r.status is Status.DEAD:
            cur["dead"] += 1
        else:
            cur["delivered"] += r.delivered
            cur["latencies"].extend(r.event_latencies)
    for cur in out.values():
        summary = summarize(cur.pop("latencies"), target)
        for key, value in (("p50_s", summary.p50), ("p95_s", summary.p95)):
            cur[key] = None if math.isnan(value) else round(value, 4)
    return out


def _channel_lines(channels: dict[str, dict[str, Any]]) -> list[str]:
    """One line per channel: e-mail accounts first, then e-mail as a whole, then the others."""

    def order(item: tuple[str, dict[str, Any]]) -> tuple[int, str]:
        name, ch = item
        return (0 if ch["kind"] == "email" and name != EMAIL_CHANNEL else 1, name)

    lines = []
    for name, ch in sorted(channels.items(), key=order):
        if name == EMAIL_CHANNEL:
            label = "e-mail (all accounts)"
        elif ch["kind"] == "email":
            label = f"account {name} (email)"
        else:
            label = f"channel {name}" + (f" ({ch['kind']})" if ch["kind"] else "")
        state, why = "", f"; why: {ch['reason']}" if ch["reason"] else ""
        if ch["state"] is not None:
            state = f"{ch['state']}; "
        elif name != EMAIL_CHANNEL:
            state = "no live worker has it; "
        figures = [f"delivered {ch['delivered']}"] if ch["delivered"] else []
        figures += [f"{k} {ch[k]}" for k in ("retried", "dead") if ch[k]]
        if not figures:
            if name == EMAIL_CHANNEL:
                continue
            lines.append(f"{label}: {state}nothing in the window{why}")
            continue
        p50, p95 = ch["p50_s"], ch["p95_s"]
        latency = f"; p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms" if p50 is not None else ""
        lines.append(f"{label}: {state}{', '.join(figures)}{latency}{why}")
    return lines


def _age(seconds: float) -> str:
    """2m10s, 1h05m, 45s: an age a person reads at a glance."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _counts(counts: dict[str, int]) -> str:
    """{'invalid': 2, 'recipient': 1} -> 'invalid 2, recipient 1' (largest first)."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{name or 'unknown'} {n}" for name, n in ordered)


def _print_stats(st: dict[str, Any], *, watch: float | None = None) -> None:
    d, lat = st["depths"], st["latency"]
    if watch:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["at"]))
        print(f"notifier stats at {when} (every {watch:g} s; Ctrl-C to stop)")
    extra = "".join(f", {k} {st[k]}" for k in ("digests", "suppressed") if st.get(k))
    reasons = f" ({_counts(st['dead_reasons'])})" if st["dead_reasons"] else ""
    print(
        f"last {st['window_s'] / 60:g} min: delivered {st['delivered']}{extra}, "
        f"retried {st['retried']}, dead {st['dead']}{reasons}"
    )
    print(
        f"depths: queue {d['queue']}, retry {d['retry']}, dead {d['dead']}, "
        f"processing {d['processing']}, held for digests {d.get('held', 0)}"
    )
    if lat["count"]:
        print(
            f"latency: p50 {lat['p50_s'] * 1000:.1f} ms, p95 {lat['p95_s'] * 1000:.1f} ms, "
            f"p99 {lat['p99_s'] * 1000:.1f} ms, max {lat['max_s'] * 1000:.1f} ms; "
            f"{lat['within_target'] * 100:.2f}% within {lat['target_s']:g} s"
        )
    else:
        print("latency: no deliveries in the window")
    alive = [w for w, up in st["workers"].items() if up]
    print(f"workers: {len(alive)} alive" + (f" ({', '.join(alive)})" if alive else ""))
    for line in _channel_lines(st.get("channels", {})):
        print(line)
    for held in st.get("held", []):
        print(_held_line(held))
    if st["paused"]:
        print(f"PAUSED by {st['paused'].get('worker')}: {st['paused'].get('reason')}")


def _held_line(held: dict[str, Any]) -> str:
    """One held digest group for people: whose, how many, how old, when it goes and why."""
    oldest = held["oldest_age_s"]
    age = f"oldest {_age(oldest)}" if oldest is not None else "age unknown"
    due = held["due_in_s"]
    if not due:
        when = "sent as soon as a worker takes it"
    elif due < 120:
        when = f"sent in {due:.0f} s"
    else:
        at = time.strftime("%Y-%m-%d %H:%M", time.localtime(held["due_at"]))
        when = f"sent at {at} (in {_age(due)})"
    who = held["account"]
    if held["why"] == "quiet hours":
        who = "e-mail" if who == EMAIL_CHANNEL else f"channel {who}"
    else:
        who = f"account {who}"
    return f"held for a digest: {who}: {held['events']} event(s), {age}, {when} ({held['why']})"


async def _stats(args: argparse.Namespace) -> int:
    loaded = _load(args)
    s = loaded.settings
    _warn("stats", loaded.unknown)
    clear = bool(args.watch) and not args.json and sys.stdout.isatty()
    q = _queue(s)
    try:
        while True:
            try:
                st = await stats_snapshot(q, args.window, s.latency_target_s)
            except REDIS_ERRORS as exc:
                raise _redis_error(s, exc) from None
            if clear:
                print("\033[2J\033[H", end="")
            if args.json:
                print(json.dumps(st, ensure_ascii=False))
            else:
                _print_stats(st, watch=args.watch)
            sys.stdout.flush()  # --watch into a pipe: each snapshot when it is made
            if not args.watch:
                break
            await asyncio.sleep(args.watch)
    finally:
        await q.redis.aclose()
    share = st["latency"]["within_target"]
    if args.slo is not None and share is not None and share < args.slo:
        print(
            f"SLO breached: {share * 100:.2f}% within target < {args.slo * 100:.2f}%",
            file=sys.stderr,
        )
        return 3
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    return asyncio.run(_stats(args))


# ------------------------------------------------------------------------ watch
async def _watch(args: argparse.Namespace) -> int:
    from .watch import Watcher

    loaded = _load(args)
    s = loaded.settings
    _warn("watch", loaded.unknown)
    if s.watch is None and not args.forget:
        raise CommandError(
            "NOTIFIER_WATCH_FILE: not set, so no strategy is watched; give a TOML file with "
            "[[watch]] rules (README: Know when a strategy goes quiet)",
            2,
        )
    q = _queue(s)
    try:
        if args.forget:
            n = await q.forget(args.forget)
            print(f"forgot {n} of {len(args.forget)} strateg{'y' if n == 1 else 'ies'}")
            return 0
        seen, states = await q.watch_snapshot()
    except REDIS_ERRORS as exc:
        raise _redis_error(s, exc) from None
    finally:
        await q.redis.aclose()
    rows = Watcher(q, s.watch, locale=s.locale).view(seen, states)
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict(), ensure_ascii=False))
    else:
        _print_watch(rows)
    return 3 if any(r.state == "silent" for r in rows) else 0


def _print_watch(rows: Sequence[Any]) -> None:
    if not rows:
        print("no watched strategy yet (none heard, none named exactly by a rule)")
        return
    now = time.time()

    def ago(t: float | None) -> str:
        if t is None:
            return "never"
        stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(t))
        return f"{stamp} ({_age(now - t)} ago)" if t <= now else stamp

    table = [("STRATEGY", "RULE", "SESSION", "LAST SEEN", "STATE", "SINCE")]
    for r in rows:
        since = (
            ago(r.since)
            if r.state != "off-session"
            else (
                "opens " + time.strftime("%a %m-%d %H:%M", time.localtime(r.since))
                if r.since is not None
                else "-"
            )
        )
        table.append(
            (
                r.strategy,
                r.rule,
                "open" if r.session_open else "closed",
                ago(r.last_seen),
                r.state,
                since,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_watch(args: argparse.Namespace) -> int:
    return asyncio.run(_watch(args))


# ------------------------------------------------------------------------ dead letters
def handle_of(raw: bytes) -> str:
    """A dead letter's handle: 8 hex digits of its SHA-256, so `dead replay --id` can name
    a letter that has no event id (a stored letter never changes, so neither does this)."""
    return hashlib.sha256(raw).hexdigest()[:8]


async def _dead(args: argparse.Namespace) -> int:
    loaded = _load(args)
    s = loaded.settings
    _warn("dead", loaded.unknown)
    q = _queue(s)
    try:
        if args.dead_command == "list":
            return await _dead_list(q, args.limit, as_json=args.json)
        if args.dead_command == "purge":
            print(f"purged {await q.purge_dead()} dead letter(s)")
            return 0
        return await _dead_replay(q, args.id)
    except BrokenPipeError:
        raise
    except REDIS_ERRORS as exc:
        raise _redis_error(s, exc) from None
    finally:
        await q.redis.aclose()


async def _dead_list(q: Queue, limit: int, *, as_json: bool) -> int:
    letters = await q.dead_letters(limit)
    for raw, letter in letters:
        if as_json:
            print(json.dumps({"handle": handle_of(raw), **letter}, ensure_ascii=False))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.get("failed_at", 0)))
        channel = letter.get("channel")
        where = f"channel {channel}  " if channel and channel != EMAIL_CHANNEL else ""
        print(
            f"{when}  {handle_of(raw)}  {letter.get('id') or '<no id>'}  {where}"
            f"[{letter.get('reason')}] {letter.get('error')}"
        )
        print(f"    {str(letter.get('event', ''))[:200]}")
    if not as_json:
        print(f"{len(letters)} shown, {(await q.depths()).dead} in total")
    return 0


async def _dead_replay(q: Queue, wanted: str | None) -> int:
    """Queue dead letters again; one whose event is still invalid (the worker would bury it
    at once) stays dead and is reported instead."""
    replayed, invalid = 0, []
    for raw, letter in await q.dead_letters(0):
        handle = handle_of(raw)
        if wanted is not None and wanted not in (letter.get("id"), handle):
            continue
        text, why = _replay_text(letter)
        if text is None:
            invalid.append((handle, why))
            print(f"kept {handle} ({letter.get('id') or 'no id'}): still invalid ({why})")
            continue
        if await q.replay(raw, text):
            replayed += 1
    if wanted is not None and not replayed:
        if invalid:
            raise CommandError(
                f"dead letter {wanted} is still invalid ({invalid[0][1]}); kept: fix it and "
                "queue it with `notifier push --json`"
            )
        raise CommandError(f"no dead letter with id or handle {wanted} (see `notifier dead list`)")
    kept = (
        f"; {len(invalid)} still invalid, kept as dead letters (see `notifier dead list`)"
        if invalid
        else ""
    )
    print(f"replayed {replayed} event(s){kept}")
    return 0


def _replay_text(letter: dict[str, Any]) -> tuple[str | None, str]:
    """The event as it goes back on the queue (attempts reset, marked as replayed, the channel
    of a fanned-out copy kept), or None and why it is still invalid (checked with the worker's own parser)."""
    original = str(letter.get("event", ""))
    try:
        obj = json.loads(original)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        try:
            parse_event(original)
        except InvalidEvent as exc:
            return None, exc.reason
        return None, "not a JSON object"
    meta = obj.pop("_meta", None)
    obj["_meta"] = {"replayed": True}
    # a fanned-out copy goes back as that copy: only its channel's delivery is sent again
    if isinstance(meta, dict) and isinstance(meta.get("channel"), str):
        obj["_meta"]["channel"] = meta["channel"]
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    try:
        parse_event(text)
    except InvalidEvent as exc:
        return None, exc.reason
    return text, ""


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
    from .demo import dev_tools_missing

    # worker.bench is not in the wheel: say so before importing it
    if problem := dev_tools_missing("bench"):
        raise CommandError(problem, 2)
    from .bench import bench

    return int(
        bench(quick=args.quick, rtt_ms=args.rtt_ms, as_json=args.json, scenarios=args.scenario)
    )


COMMANDS = {
    "run": cmd_run,
    "push": cmd_push,
    "check": cmd_check,
    "send-test": cmd_send_test,
    "stats": cmd_stats,
    "dead": cmd_dead,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "watch": cmd_watch,
}


def _stdout_gone() -> None:
    """The reader of our stdout went away (``| head -1``): point stdout at /dev/null so the
    interpreter's last flush does not complain, and end quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (tests capture stdout)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except CommandError as exc:
        print(f"notifier {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        _stdout_gone()
        return 0
    except KeyboardInterrupt:
        return 130
