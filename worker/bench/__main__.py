"""Helper processes of the benchmark, run as ``python -m worker.bench MODE CONFIG_JSON``:
the old recipe and the bare aiosmtplib sender, each in its own process."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from .lab import (
    _proc_memory_mb,
)


# ====================================================================== helper processes
def _old_recipe_main(cfg: dict[str, Any]) -> dict[str, Any]:
    """The recipe this project replaces, once per message: connect, TLS, login, send, quit."""
    import smtplib
    import ssl

    ctx = ssl.create_default_context(cafile=cfg["ca_file"]) if cfg["tls"] != "none" else None
    message = Path(cfg["message_file"]).read_bytes()
    accepted, total = [], []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(cfg["n"]):
        t0 = time.perf_counter()
        smtp: smtplib.SMTP
        if cfg["tls"] == "ssl":
            smtp = smtplib.SMTP_SSL(cfg["host"], cfg["port"], context=ctx, timeout=30)
        else:
            smtp = smtplib.SMTP(cfg["host"], cfg["port"], timeout=30)
            if cfg["tls"] == "starttls":
                smtp.starttls(context=ctx)
        if cfg["user"]:
            smtp.login(cfg["user"], cfg["password"])
        smtp.sendmail(cfg["mail_from"], [cfg["mail_to"]], message)
        t1 = time.perf_counter()
        smtp.quit()
        t2 = time.perf_counter()
        accepted.append(t1 - t0)
        total.append(t2 - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    return {"accepted_s": accepted, "total_s": total, "cpu_s": cpu,
            "maxrss_mb": _proc_memory_mb(os.getpid())[1]}  # fmt: skip


def _bare_main(cfg: dict[str, Any]) -> dict[str, Any]:
    """``lanes`` warm connections sending ``n`` copies of one message, as fast as they can."""
    import asyncio
    import email
    import email.policy

    import aiosmtplib

    from ..smtp_fast import FastSMTP

    message = Path(cfg["message_file"]).read_bytes()
    parsed = email.message_from_bytes(message, policy=email.policy.default)

    async def run() -> dict[str, Any]:
        cls = FastSMTP if cfg["mode"] == "transact" else aiosmtplib.SMTP
        clients = [
            cls(hostname="127.0.0.1", port=cfg["port"], use_tls=False, start_tls=False)
            for _ in range(cfg["lanes"])
        ]
        for c in clients:
            await c.connect()
            await c.ehlo()
        todo = iter(range(cfg["n"]))

        async def lane(c: aiosmtplib.SMTP) -> None:
            for _ in todo:
                if isinstance(c, FastSMTP):
                    await c.transact(cfg["mail_from"], [cfg["mail_to"]], message)
                elif cfg["mode"] == "send_message":  # flattens the message every time
                    await c.send_message(
                        parsed, sender=cfg["mail_from"], recipients=[cfg["mail_to"]]
                    )
                else:
                    await c.sendmail(cfg["mail_from"], [cfg["mail_to"]], message)

        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(lane(c) for c in clients))
        elapsed = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        for c in clients:
            with contextlib.suppress(Exception):
                await c.quit()
        return {"elapsed_s": elapsed,
                "cpu_s": ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
                "maxrss_mb": _proc_memory_mb(os.getpid())[1]}  # fmt: skip

    return asyncio.run(run())


if __name__ == "__main__":
    _HELPERS = {"old-recipe": _old_recipe_main, "bare": _bare_main}
    print(json.dumps(_HELPERS[sys.argv[1]](json.loads(sys.argv[2]))))
