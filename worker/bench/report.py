"""The report (Markdown or JSON) and :func:`bench`, the entry of ``notifier bench``."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import pwd
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .lab import SMTP_SINK, Lab, Plan, _progress
from .scenarios import SCENARIOS


# ====================================================================== report
def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "—"
    if digits == 0 and abs(value) < 10:
        digits = 1
    return f"{value:,.{digits}f}"


def _machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    python = platform.python_version()
    return (
        f"{os.cpu_count()} CPU(s) {model}, Linux {platform.release()}, Python {python}, "
        f"load average at start {load}"
    )


def _command(
    *, quick: bool, rtt_ms: float, as_json: bool, scenarios: Sequence[str] | None = None
) -> str:
    """The command line that reproduces this run."""
    words = ["notifier bench"]
    if quick:
        words.append("--quick")
    if rtt_ms != 50.0:
        words.append(f"--rtt-ms {rtt_ms:g}")
    words += [f"--scenario {name}" for name in scenarios or ()]
    if as_json:
        words.append("--json")
    return " ".join(words)


def _markdown(report: dict[str, Any]) -> str:
    out = [
        f"`{report['command']}` ({report['date']}, {report['wall_s']:.0f} s; {report['machine']})",
        "",
        "| scenario | events | msg/s | p50 ms | p95 ms | p99 ms | round trips/msg "
        "| CPU ms/msg | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        out.append(
            f"| {r['scenario']} | {r['events']:,} | {_fmt(r['throughput'], 0)} "
            f"| {_fmt(r['p50'], 1)} | {_fmt(r['p95'], 1)} | {_fmt(r['p99'], 1)} "
            f"| {_fmt(r['round_trips'], 2)} | {_fmt(r['cpu_ms'], 2)} | {_fmt(r['rss_mb'], 1)} |"
        )
    out += ["", "| target | limit | measured | result |", "|---|---|---:|---|"]
    for t in report["targets"]:
        result = {True: "PASS", False: "**FAIL**", None: "—"}[t["ok"]]
        out.append(f"| {t['name']} | {t['limit']} | {t['measured']} | {result} |")
    notes = [f"{r['scenario']}: {n}" for r in report["rows"] for n in r["notes"]]
    notes += report["notes"]
    if notes:
        out += ["", "Notes:", *(f"- {n}" for n in notes)]
    return "\n".join(out)


def _missing() -> str | None:
    if not (shutil.which("redis-server") or Path("/usr/bin/redis-server").exists()):
        return "redis-server is missing: apt-get install redis-server (or run `make bench`)"
    if not os.access(SMTP_SINK, os.X_OK):
        return f"{SMTP_SINK} is missing: apt-get install postfix (or run `make bench`)"
    # Imported here: worker.demo imports the worker's runtime, which the helper processes
    # (python -m worker.bench, measured for RSS) have no use for.
    from ..demo import dev_tools_missing

    if problem := dev_tools_missing("bench"):
        return problem
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "smtp-sink must drop root privileges to a 'nobody' user, which is missing"
    return None


def bench(
    *,
    quick: bool = False,
    rtt_ms: float = 50.0,
    as_json: bool = False,
    scenarios: Sequence[str] | None = None,
) -> int:
    """Run the scenarios (all by default) and print the report. 0 when it ran, whatever
    the targets say; 1 when a scenario broke or the lab did not start; 2 on bad usage or when
    something it needs is not installed."""
    names = list(scenarios) if scenarios is not None else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or rtt_ms < 0:
        what = f"unknown scenario(s) {', '.join(unknown)}" if unknown else "--rtt-ms below 0"
        print(f"notifier bench: {what}; scenarios: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    problem = _missing()
    if problem:
        print(f"notifier bench: {problem}", file=sys.stderr)
        return 2
    command = _command(quick=quick, rtt_ms=rtt_ms, as_json=as_json, scenarios=scenarios)
    machine, date, started = _machine(), time.strftime("%Y-%m-%d %H:%M %Z"), time.monotonic()
    broken: list[str] = []
    with tempfile.TemporaryDirectory(prefix="notifier-bench-") as tmp:
        try:
            lab = Lab(Path(tmp), rtt_ms, Plan.make(quick))
        except Exception as exc:
            print(f"notifier bench: cannot start: {exc}", file=sys.stderr)
            return 1
        try:
            for name in names:
                _progress(f"{name} ...")
                t = time.monotonic()
                try:
                    SCENARIOS[name](lab)
                except Exception as exc:  # report it, run the others
                    broken.append(f"{name}: {type(exc).__name__}: {exc}")
                    _progress(f"{name} BROKE: {exc}")
                else:
                    _progress(f"{name} done in {time.monotonic() - t:.1f} s")
        finally:
            lab.close()
    report = {
        "command": command,
        "date": date,
        "machine": machine,
        "rtt_ms": rtt_ms,
        "quick": quick,
        "wall_s": time.monotonic() - started,
        "rows": [asdict(r) for r in lab.rows],
        "targets": [asdict(t) for t in lab.targets],
        "notes": lab.notes,
        "broken": broken,
    }
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=1))
    else:
        print(_markdown(report))
    for line in broken:
        print(f"notifier bench: scenario broke: {line}", file=sys.stderr)
    return 1 if broken else 0
