"""``notifier demo``: the whole pipeline on a throwaway Redis, a local SMTP sink and a webhook.

Starts a private ``redis-server`` on a free loopback port (never the one on 6379), an
in-process SMTP server with AUTH and PIPELINING that keeps what it receives, a local webhook
receiver (plain HTTP on loopback: the channel ``desk-hook``, from a temporary channels file,
which a routes file gives orders, fills and errors beside e-mail) and the real worker; pushes
sample events the way strategies do (producer and a raw LPUSH), prints each delivery (mail
and webhook), what each channel received with its latency, and stops everything it started.

The demo and the bench need the test servers of :mod:`worker.devtools` (and :mod:`worker.bench`),
which live in the checkout only: the wheel carries the runtime. :func:`dev_tools_missing` says,
in one line, what is missing where they cannot run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from producer.client import AsyncNotifier

from .metrics import summarize
from .records import Status
from .service import Outcome, Worker
from .settings import Settings

__all__ = ["demo", "dev_tools_missing"]

DEMO_CODE = "demo-auth-code16"
HOOK = "desk-hook"  # the demo's IM channel: a webhook to a local receiver
HOOK_KINDS = ("order", "fill", "error")  # what the routes file also sends to it

SAMPLES: list[dict[str, Any]] = [
    dict(
        subject="止损触发 600519",
        strategy="ma_cross",
        kind="order",
        severity="warning",
        data={"symbol": "600519.SH", "price": 1700.5, "stop": 1698.0},
    ),
    dict(
        strategy="ma_cross",
        kind="signal",
        data={"symbol": "600519.SH", "side": "BUY", "price": 1700.5, "qty": 100},
    ),
    dict(
        strategy="grid_btc",
        kind="fill",
        data={"symbol": "BTC-USDT", "side": "SELL", "price": 97250.0, "qty": 0.05},
    ),
    dict(
        subject="行情源断线，已切换备用线路",
        strategy="feed",
        kind="error",
        severity="critical",
        body="主行情源 3 秒无数据。\nPrimary feed silent for 3 s; switched to backup.",
    ),
    dict(
        subject="Daily PnL +1.2%",
        strategy="stat_arb",
        kind="info",
        data={"pnl": 12034.5, "trades": 87, "win_rate": 0.56},
    ),
    dict(
        strategy="momentum",
        kind="signal",
        severity="info",
        data={"symbol": "000001.SZ", "side": "buy", "price": 11.32, "qty": 2000},
    ),
    dict(
        subject="Order rejected: insufficient margin",
        strategy="cta_rb",
        kind="error",
        severity="critical",
        data={"symbol": "rb2501", "side": "SELL", "qty": 10},
    ),
    dict(subject="开盘前检查完成", strategy="ops", body="全部 12 个策略已就绪。"),
]


def _redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


# What each command imports from the dev extra (the in-process SMTP server, TLS certificates).
DEV_PACKAGES = {"demo": ("aiosmtpd",), "bench": ("aiosmtpd", "trustme")}


def dev_tools_missing(command: str) -> str | None:
    """One line on why ``notifier COMMAND`` (demo, bench) cannot run here, or None.

    Installed from the wheel, the test servers are not there at all: run it from a checkout.
    In a checkout without the dev extra, one of its packages is missing: install the extra."""
    if importlib.util.find_spec(f"{__package__}.devtools") is None:
        return (
            f"the test servers it runs on are not part of the installed package (it carries "
            f"the runtime only); run it from a checkout of the source: `make {command}`"
        )
    for module in DEV_PACKAGES[command]:
        if importlib.util.find_spec(module) is None:
            return (
                f"{module} is missing (the dev extra): pip install -e '.[dev]' in the checkout, "
                f"or run `make {command}`, which installs it"
            )
    return None


def demo(*, events: int = 20) -> int:
    """Run the demo; 0 when every event arrived in time, 1 when not, 2 when it cannot run."""
    problem = dev_tools_missing("demo")
    if problem is None and _redis_binary() is None:
        problem = (
            "redis-server is missing; install it: sudo apt-get install redis-server "
            "(or run `make demo`, which installs it)"
        )
    if problem:
        print(f"notifier demo: {problem}", file=sys.stderr)
        return 2
    from .devtools.emulators.webhook import WebhookEmulator
    from .devtools.redis_server import RedisServer
    from .devtools.smtp_server import SMTPTestServer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("worker.deliver").setLevel(logging.CRITICAL)  # the demo prints outcomes
    with tempfile.TemporaryDirectory(prefix="notifier-demo-") as tmp:
        redis_srv = RedisServer(dir=Path(tmp))
        redis_srv.start()
        smtp = SMTPTestServer(auth={"demo@example.com": DEMO_CODE}, pipelining=True)
        smtp.start()
        hook = WebhookEmulator()  # plain http: accepted for loopback hosts
        hook.start()
        try:
            print(
                f"redis-server on {redis_srv.url} (throwaway), "
                f"SMTP sink on 127.0.0.1:{smtp.port} (AUTH, PIPELINING), "
                f"webhook receiver on {hook.url} (channel {HOOK})"
            )
            files = _channel_files(Path(tmp), hook.url)
            print(f"routes: {', '.join(HOOK_KINDS)} go to e-mail and {HOOK}; the rest to e-mail\n")
            return asyncio.run(_run(redis_srv.url, smtp, hook, events, files))
        finally:
            hook.stop()
            smtp.stop()
            redis_srv.stop()


def _channel_files(tmp: Path, hook_url: str) -> dict[str, Path]:
    """The channels file (the webhook) and the routes file that sends it orders, fills and
    errors beside e-mail; ``Settings`` fields."""
    channels = tmp / "channels.toml"
    channels.write_text(
        f'[[channel]]\nname = "{HOOK}"\ntype = "webhook"\nurl = "{hook_url}"\n', encoding="utf-8"
    )
    routes = tmp / "routes.toml"
    kinds = ", ".join(f'"{k}"' for k in HOOK_KINDS)
    routes.write_text(
        f'[[route]]\nkind = [{kinds}]\nchannels = ["email", "{HOOK}"]\n', encoding="utf-8"
    )
    return {"channels_file": channels, "routes_file": routes}


async def _run(redis_url: str, smtp: Any, hook: Any, events: int, files: dict[str, Path]) -> int:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=redis_url,
        key_prefix="notifier",
        smtp_host="127.0.0.1",
        smtp_port=smtp.port,
        smtp_tls="none",
        smtp_username="demo@example.com",
        smtp_password=SecretStr(DEMO_CODE),
        mail_from="量化提醒 <demo@example.com>",
        mail_to=["trader@example.com"],
        allowed_recipients=["risk@example.com"],
        concurrency=4,
        metrics_port=0,
        worker_id="demo",
        channels_file=files["channels_file"],
        routes_file=files["routes_file"],
    )
    outcomes: list[Outcome] = []
    done = asyncio.Event()
    good = events
    # what the routes send to the webhook besides e-mail (the raw LPUSH, i == 3, has no kind)
    to_hook = sum(
        1 for i in range(events) if i != 3 and SAMPLES[i % len(SAMPLES)].get("kind") in HOOK_KINDS
    )

    def show(o: Outcome) -> None:
        outcomes.append(o)
        if o.status is Status.SENT:
            where = f"webhook {HOOK}" if o.account == HOOK else ",".join(o.recipients)
            print(f"  sent  {o.latency * 1000:6.1f} ms  to {where:<38} {o.subject}")
        elif o.status is Status.FANOUT:  # the route names two channels: one delivery each
            print(f"  split {o.event_id[:8]}: one delivery to e-mail, one to {HOOK}")
        elif o.status is Status.DEAD:
            print(f"  dead  (as designed) {o.reason}: {o.error}")
        else:
            print(f"  {o.status} {o.event_id}: {o.error}")
        sent = [x for x in outcomes if x.status is Status.SENT]
        if len(sent) >= good + to_hook and sum(x.account == HOOK for x in sent) >= to_hook:
            done.set()

    worker = Worker(settings, on_outcome=show)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.3)  # warm connections: the first alert should not pay for login
    async with AsyncNotifier(redis_url) as notifier:
        print(
            f"pushing {events} events (strategies' producer, a raw LPUSH, a burst) "
            "and one malformed event:"
        )
        for i in range(events):
            sample = dict(SAMPLES[i % len(SAMPLES)])
            if i == 3:  # another language's script: a plain LPUSH of JSON
                plain = {
                    "subject": "止损触发 600519",
                    "strategy": "ma_cross",
                    "data": {"price": 1700.5},
                }
                raw = json.dumps(plain, ensure_ascii=False)
                await worker.redis.lpush("notifier:queue", raw)
            elif i == 5:
                await notifier.send(sample.pop("subject", None), to=["risk@example.com"], **sample)
            else:
                await notifier.send(sample.pop("subject", None), **sample)
            if i < events - 5:
                await asyncio.sleep(0.05)  # strategies fire now and then; the last 5 at once
        await worker.redis.lpush("notifier:queue", '{"subject": "hi\\r\\nBcc: victim@example.com"}')
    try:
        await asyncio.wait_for(done.wait(), timeout=30)
    except TimeoutError:
        print("notifier demo: not every event was delivered within 30 s", file=sys.stderr)
        worker.stop()
        await task
        return 1
    await asyncio.sleep(0.2)
    worker.stop()
    await task
    hooked = [o for o in outcomes if o.status is Status.SENT and o.account == HOOK]
    sent = [o for o in outcomes if o.status is Status.SENT and o.account != HOOK]
    dead = sum(1 for o in outcomes if o.status is Status.DEAD)
    received = smtp.messages
    summary = summarize([o.latency for o in sent], settings.latency_target_s)
    smtp_median_ms = sorted(o.smtp for o in sent)[len(sent) // 2] * 1000
    print(
        f"\n{len(received)} mails received by the sink; dead letters: {dead} (the malformed event)"
    )
    print(f"latency (event produced -> SMTP 250): {summary.line()}")
    print(f"SMTP share: median {smtp_median_ms:.1f} ms a message on warm, pipelined connections")
    hook_p50 = (
        summarize([o.latency for o in hooked], settings.latency_target_s).p50 * 1000
        if hooked
        else 0.0
    )
    print(
        f"webhook {HOOK} received {len(hook.received)} alerts ({to_hook} expected), "
        f"p50 {hook_p50:.1f} ms (event produced -> HTTP 200, keep-alive)"
    )
    ok = len(received) >= good and summary.within_target == 1.0 and len(hook.received) >= to_hook
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(demo())
