"""The bench's helper processes, each run as ``python -m worker.bench MODE JOB_JSON``: the old
recipe (``smtplib``, a new connection, TLS and login per message) and the bare aiosmtplib
sender. A job and its result are small dataclasses, JSON on the command line and on stdout;
:func:`run_helper` starts one and reads its result. Also the ``/proc`` readings (CPU, RSS) the
bench takes of these processes and of the worker."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "BareJob",
    "BareResult",
    "HelperError",
    "OldRecipeJob",
    "OldRecipeResult",
    "main",
    "proc_cpu_s",
    "proc_memory_mb",
    "run_bare",
    "run_old_recipe",
]

BareMode = Literal["sendmail", "send_message", "transact"]


class HelperError(RuntimeError):
    """A helper process failed or did not finish in time."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OldRecipeJob:
    host: str
    port: int
    tls: Literal["ssl", "starttls", "none"]
    ca_file: str
    user: str | None  # None: no login
    password: str
    n: int
    mail_from: str
    mail_to: str
    message_file: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OldRecipeResult:
    accepted_s: list[float]  # connect to the 250 after the message, per message
    total_s: list[float]  # connect to QUIT answered (the caller is blocked that long)
    cpu_s: float
    maxrss_mb: float


@dataclass(frozen=True, slots=True, kw_only=True)
class BareJob:
    port: int
    lanes: int  # warm connections
    n: int
    mode: BareMode
    mail_from: str
    mail_to: str
    message_file: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BareResult:
    elapsed_s: float
    cpu_s: float
    maxrss_mb: float


# ====================================================================== /proc readings
def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ====================================================================== in the helper process
def old_recipe(job: OldRecipeJob) -> OldRecipeResult:
    """The recipe this project replaces, once per message: connect, TLS, login, send, quit."""
    import smtplib
    import ssl

    ctx = ssl.create_default_context(cafile=job.ca_file) if job.tls != "none" else None
    message = Path(job.message_file).read_bytes()
    accepted, total = [], []
    cpu0 = _self_cpu_s()
    for _ in range(job.n):
        t0 = time.perf_counter()
        smtp: smtplib.SMTP
        if job.tls == "ssl":
            smtp = smtplib.SMTP_SSL(job.host, job.port, context=ctx, timeout=30)
        else:
            smtp = smtplib.SMTP(job.host, job.port, timeout=30)
            if job.tls == "starttls":
                smtp.starttls(context=ctx)
        if job.user:
            smtp.login(job.user, job.password)
        smtp.sendmail(job.mail_from, [job.mail_to], message)
        t1 = time.perf_counter()
        smtp.quit()
        t2 = time.perf_counter()
        accepted.append(t1 - t0)
        total.append(t2 - t0)
    return OldRecipeResult(
        accepted_s=accepted,
        total_s=total,
        cpu_s=_self_cpu_s() - cpu0,
        maxrss_mb=proc_memory_mb(os.getpid())[1],
    )


def bare(job: BareJob) -> BareResult:
    """``lanes`` warm connections sending ``n`` copies of one message, as fast as they can."""
    import asyncio
    import email
    import email.policy

    import aiosmtplib

    from ..smtp_fast import FastSMTP

    message = Path(job.message_file).read_bytes()
    parsed = email.message_from_bytes(message, policy=email.policy.default)

    async def run() -> BareResult:
        cls = FastSMTP if job.mode == "transact" else aiosmtplib.SMTP
        clients = [
            cls(hostname="127.0.0.1", port=job.port, use_tls=False, start_tls=False)
            for _ in range(job.lanes)
        ]
        for c in clients:
            await c.connect()
            await c.ehlo()
        todo = iter(range(job.n))

        async def lane(c: aiosmtplib.SMTP) -> None:
            for _ in todo:
                if isinstance(c, FastSMTP):
                    await c.transact(job.mail_from, [job.mail_to], message)
                elif job.mode == "send_message":  # flattens the message every time
                    await c.send_message(parsed, sender=job.mail_from, recipients=[job.mail_to])
                else:
                    await c.sendmail(job.mail_from, [job.mail_to], message)

        cpu0 = _self_cpu_s()
        t0 = time.perf_counter()
        await asyncio.gather(*(lane(c) for c in clients))
        elapsed = time.perf_counter() - t0
        cpu_s = _self_cpu_s() - cpu0
        for c in clients:
            with contextlib.suppress(Exception):
                await c.quit()
        return BareResult(elapsed_s=elapsed, cpu_s=cpu_s, maxrss_mb=proc_memory_mb(os.getpid())[1])

    return asyncio.run(run())


_MAINS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "old-recipe": lambda job: old_recipe(OldRecipeJob(**job)),
    "bare": lambda job: bare(BareJob(**job)),
}


def main(argv: list[str]) -> int:
    """``python -m worker.bench MODE JOB_JSON``: run the helper, its result as JSON on stdout."""
    mode, job = argv
    print(json.dumps(asdict(_MAINS[mode](json.loads(job)))))
    return 0


# ====================================================================== in the bench
_Result = TypeVar("_Result", OldRecipeResult, BareResult)


def _run(mode: str, job: OldRecipeJob | BareJob, result: type[_Result], timeout: float) -> _Result:
    argv = [sys.executable, "-m", "worker.bench", mode, json.dumps(asdict(job))]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HelperError(f"{mode} did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise HelperError(f"{mode} failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return result(**json.loads(done.stdout.strip().splitlines()[-1]))


def run_old_recipe(job: OldRecipeJob, *, timeout: float) -> OldRecipeResult:
    """Run the old recipe in its own process (``python -m worker.bench old-recipe``)."""
    return _run("old-recipe", job, OldRecipeResult, timeout)


def run_bare(job: BareJob, *, timeout: float) -> BareResult:
    """Run the bare sender in its own process (``python -m worker.bench bare``)."""
    return _run("bare", job, BareResult, timeout)
