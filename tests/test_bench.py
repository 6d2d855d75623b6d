"""The latency proxy (delay, order, round-trip counting, TLS passthrough) and a smoke run of
``notifier bench``."""

from __future__ import annotations

import ast
import asyncio
import json
import random
import ssl
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.keys import Keys
from worker import bench as bench_mod
from worker.bench import scenarios
from worker.bench.helpers import BareJob, run_bare
from worker.bench.lab import Lab, Plan
from worker.devtools.proxy import LatencyProxy, ProxyProcess
from worker.records import DeliveryRecord, Status

WORKER = Path(__file__).resolve().parent.parent / "worker"

RTT_MS = 40.0
DELAY_S = RTT_MS / 2000


class LineServer:
    """A TCP server on 127.0.0.1 that optionally greets, then answers each line upper-cased,
    recording when each line arrived."""

    def __init__(self, *, greet: bool, ssl_context: ssl.SSLContext | None = None) -> None:
        self.greet = greet
        self.ssl_context = ssl_context
        self.arrivals: list[tuple[bytes, float]] = []
        self.connected_at: list[float] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected_at.append(time.monotonic())
        if self.greet:
            writer.write(b"220 hello\n")
            await writer.drain()
        while line := await reader.readline():
            self.arrivals.append((line, time.monotonic()))
            writer.write(line.upper())
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> LineServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


async def test_proxy_adds_the_delay_each_way_and_emulates_the_handshake() -> None:
    async with (
        LineServer(greet=True) as server,
        LatencyProxy("127.0.0.1", server.port, rtt_ms=RTT_MS) as proxy,
    ):
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await reader.readline() == b"220 hello\n"
        greeting = time.monotonic() - t0
        # SYN, SYN-ACK, ACK before the server accepts; then the greeting's one-way trip.
        assert server.connected_at[0] - t0 >= 3 * DELAY_S
        assert greeting >= 4 * DELAY_S
        for _ in range(3):
            sent = time.monotonic()
            writer.write(b"ping\n")
            await writer.drain()
            assert await reader.readline() == b"PING\n"
            back = time.monotonic()
            arrived = server.arrivals[-1][1]
            assert arrived - sent >= DELAY_S
            assert back - arrived >= DELAY_S
            assert RTT_MS / 1000 <= back - sent < RTT_MS / 1000 + 0.05
        writer.close()


async def test_proxy_without_handshake_emulation_connects_at_once() -> None:
    async with (
        LineServer(greet=True) as server,
        LatencyProxy("127.0.0.1", server.port, rtt_ms=RTT_MS, emulate_handshake=False) as proxy,
    ):
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await reader.readline()
        assert DELAY_S <= time.monotonic() - t0 < 2 * DELAY_S + 0.03
        writer.close()
        assert proxy.stats().round_trips == proxy.stats().turns == 1


async def test_proxy_preserves_byte_order_in_both_directions() -> None:
    rng = random.Random(7)
    chunks = [
        bytes(rng.randrange(97, 123) for _ in range(rng.randrange(1, 3000))) for _ in range(300)
    ]
    payload = b"".join(chunks)
    received = bytearray()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(rng.randrange(1, 5000)):
            received.extend(data)
            writer.write(data)  # echoed in whatever pieces it arrived
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with LatencyProxy("127.0.0.1", port, rtt_ms=10) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        for i, chunk in enumerate(chunks):
            writer.write(chunk)
            if i % 7 == 0:
                await asyncio.sleep(rng.random() / 1000)  # arrivals spread over time
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        writer.close()
    server.close()
    assert bytes(received) == payload
    assert echoed == payload


async def test_proxy_counts_turns_of_a_scripted_exchange() -> None:
    async with (
        LineServer(greet=True) as server,
        LatencyProxy("127.0.0.1", server.port, rtt_ms=10) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await reader.readline()  # turn 1: the greeting after the connection
        writer.write(b"a\n")
        await writer.drain()
        await reader.readline()  # turn 2
        writer.write(b"b\nc\nd\n")  # pipelined: one flight, three answers
        await writer.drain()
        for _ in range(3):
            await reader.readline()  # turn 3 (however many packets the answers take)
        writer.write(b"e\n")
        await writer.drain()
        await reader.readline()  # turn 4
        writer.close()
        await asyncio.sleep(0.05)
        stats = proxy.stats()
        assert stats.turns == 4
        assert stats.round_trips == 5  # + the emulated TCP handshake
        assert stats.connections == 1
        assert stats.bytes_up == len(b"a\nb\nc\nd\ne\n")
        assert proxy.connections[0].turns == 4

        # A second connection counts on its own; totals add up.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await reader.readline()
        writer.close()
        await asyncio.sleep(0.05)
        assert [c.turns for c in proxy.connections] == [4, 1]
        assert proxy.stats().turns == 5
        assert proxy.stats().open_connections == 0


async def test_proxy_passes_tls_through(tls_ca) -> None:
    async with (
        LineServer(greet=True, ssl_context=tls_ca.server_context()) as server,
        LatencyProxy("127.0.0.1", server.port, rtt_ms=10) as proxy,
    ):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.port, ssl=tls_ca.client_context(), server_hostname="127.0.0.1"
        )
        assert await reader.readline() == b"220 hello\n"
        writer.write(b"secret\n")
        await writer.drain()
        assert await reader.readline() == b"SECRET\n"
        writer.close()
        assert proxy.stats().bytes_up > len(b"secret\n")  # ciphertext, handshake included


def test_proxy_process_reports_stats() -> None:
    async def main() -> None:
        async with LineServer(greet=True) as server:
            with ProxyProcess("127.0.0.1", server.port, rtt_ms=10) as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                await reader.readline()
                writer.write(b"x\n")
                await writer.drain()
                await reader.readline()
                writer.close()
                await asyncio.sleep(0.05)
                stats = await asyncio.to_thread(proxy.stats)
                assert (stats.connections, stats.turns, stats.round_trips) == (1, 2, 3)

    asyncio.run(main())


def test_markdown_report_has_the_table_and_targets() -> None:
    row = bench_mod.Row(
        "s",
        10,
        throughput=123.4,
        p50=1.0,
        p95=2.0,
        p99=3.0,
        round_trips=2.0,
        cpu_ms=0.5,
        rss_mb=40.0,
    )
    report = {
        "command": "notifier bench",
        "date": "today",
        "machine": "m",
        "wall_s": 1.0,
        "rows": [asdict(row)],
        "targets": [asdict(bench_mod.Target("t", "≤ 1", "0.5", True))],
        "notes": [],
    }
    text = bench_mod._markdown(report)
    assert "| s | 10 | 123 | 1.0 | 2.0 | 3.0 | 2.00 | 0.50 | 40.0 |" in text
    assert "| t | ≤ 1 | 0.5 | PASS |" in text


def test_unknown_scenario_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_mod.bench(scenarios=["nope"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_bench_quick_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    """The TLS + AUTH scenario end to end: the real worker, the proxy, the old recipe."""
    assert bench_mod.bench(quick=True, rtt_ms=10, as_json=True, scenarios=["tls"]) == 0
    report = json.loads(capsys.readouterr().out)
    worker, old = report["rows"]
    assert worker["scenario"] == "tls+auth via 10 ms, PIPELINING"
    assert worker["events"] == 10
    for key in ("p50", "p95", "p99", "cpu_ms", "rss_mb"):
        assert worker[key] > 0, key
    assert worker["p50"] >= 2 * 10  # two round trips of the link, at least
    assert worker["round_trips"] == 2.0  # PIPELINING: MAIL+RCPT+DATA, then the message
    # connect, TLS, greeting, EHLO, AUTH, MAIL, RCPT, DATA, end of data, QUIT
    assert old["round_trips"] == 10.0
    assert old["p50"] > worker["p50"]
    assert [t["ok"] is not None for t in report["targets"]][:2] == [True, True]
    assert report["broken"] == []


@pytest.mark.timeout(60)
def test_bench_quick_webhook(capsys: pytest.CaptureFixture[str]) -> None:
    """The webhook channel end to end: the real worker, a channels and a routes file, the
    HTTPS receiver verifying signatures, through the proxy; one round trip a message."""
    assert bench_mod.bench(quick=True, rtt_ms=10, as_json=True, scenarios=["webhook"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["broken"] == []
    (row,) = report["rows"]
    assert row["scenario"] == "webhook over HTTPS via 10 ms, keep-alive"
    assert row["events"] == 10
    assert 10 <= row["p50"] <= row["p95"] <= row["p99"]  # one round trip of the link, at least
    assert row["round_trips"] == 1.0  # a kept-alive connection: the request, then the reply
    notes = " ".join(row["notes"])
    assert "mode http/1.1" in notes and "10/10 accepted with a valid signature over 1 TLS" in notes
    assert "not counted: the first alert" in notes
    limits = [(t["name"].split(": ")[1], t["limit"]) for t in report["targets"]]
    assert limits == [
        ("push to request received by the service p50 ≤ 1 round trip + 5 ms", "≤ 15 ms"),
        ("worker p50 (to the service's reply) ≤ 1 round trip + 10 ms", "≤ 20 ms"),
        ("round trips per message", "= 1"),
    ]
    assert report["targets"][2]["ok"] is True


@pytest.mark.timeout(60)
def test_bench_quick_acked(capsys: pytest.CaptureFixture[str]) -> None:
    """Acknowledged pushes: a replica one round trip away (its link through the proxy) costs
    each ``send(replicas=1)`` that round trip; one on the loopback next to nothing."""
    assert bench_mod.bench(quick=True, rtt_ms=10, as_json=True, scenarios=["acked"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["broken"] == []
    assert report["command"] == "notifier bench --quick --rtt-ms 10 --scenario acked --json"
    plain, far, near = report["rows"]
    assert [r["events"] for r in report["rows"]] == [30, 30, 30]
    assert far["scenario"] == "producer send, replicas=1, replica via 10 ms"
    assert 10 <= far["p50"] <= far["p95"] <= far["p99"]  # the replica's round trip, at least
    assert plain["p50"] < 5 and near["p50"] < 5
    assert far["round_trips"] == 1.0  # WAIT: one round trip on the replication link per send
    assert "0 of 30 not confirmed" in " ".join(far["notes"])
    limits = [(t["name"].split(": ", 1)[-1], t["limit"]) for t in report["targets"]]
    assert limits[:4] == [
        ("p50 − plain p50 (the cost of WAIT) ≤ 1 replica round trip + 5 ms", "≤ 15 ms"),
        ("p50 − plain p50 ≥ 0.9 × the round trip (it waits for the replica)", "≥ 9 ms"),
        ("round trips on the replication link per send", "= 1"),
        ("sends confirmed within replica_timeout_ms=1000", "= 30"),
    ]
    # The upper bound is the machine's (a loaded one may miss it); the others hold anywhere.
    assert [t["ok"] for t in report["targets"][:4]][1:] == [True, True, True]
    assert report["targets"][0]["ok"] is not None


# -- the delivery records, read through worker.records only ------------------------------


def _record(status: Status, i: int, **fields: Any) -> DeliveryRecord:
    return DeliveryRecord(t=1000.0 + i, status=status, id=f"e{i}", **fields)


def test_lab_reads_the_worker_records_as_typed_records(tmp_path: Path) -> None:
    """What the bench counts as delivered: sent events and the events a digest carried, as
    :class:`DeliveryRecord` (retries, dead letters, held events are not deliveries)."""
    lab = Lab(tmp_path, 10.0, Plan.make(quick=True))
    try:
        written = [
            _record(
                Status.SENT, 1, latency_s=0.1, queue_wait_s=0.01, send_s=0.08, mode="pipelining"
            ),
            _record(Status.RETRY, 2, reason="421"),
            _record(Status.DEAD, 3, reason="550"),
            _record(Status.HELD, 4, count=2, channel="qq"),
            _record(Status.DIGEST, 5, count=2, latencies=(0.5, 0.7), channel="qq"),
        ]
        client = redis.Redis.from_url(lab.redis_url)
        client.lpush(Keys("notifier").deliveries, *(r.to_json() for r in written))
        client.close()
        recs = lab.records()
        assert all(isinstance(r, DeliveryRecord) for r in recs)
        assert sorted(r.status for r in recs) == [Status.DIGEST, Status.SENT]
        assert sorted(bench_mod.lab.latencies(recs)) == [0.1, 0.5, 0.7]
        assert max(r.t for r in recs) == 1005.0
    finally:
        lab.close()


def test_breakdown_of_the_trickle_p50_comes_from_the_typed_fields() -> None:
    recs = [
        _record(Status.SENT, i, latency_s=0.1 + i / 1000, queue_wait_s=0.002, send_s=0.09, mode=m)
        for i, m in enumerate(["pipelining", "chunking", "pipelining"])
    ]
    recs.append(_record(Status.SENT, 9, latency_s=0.2))  # an old record: no breakdown
    b = scenarios.breakdown(recs)
    assert b.modes == ["?", "chunking", "pipelining"]
    assert b.wait_ms == pytest.approx(2.0)
    assert b.send_ms == pytest.approx(90.0)
    assert b.rest_ms == pytest.approx(9.0, abs=0.6)


@pytest.mark.parametrize("mode", ["sendmail", "send_message", "transact"])
def test_bare_sender_process_takes_a_typed_job_and_returns_its_result(
    mode, smtp_factory, tmp_path: Path
) -> None:
    smtp = smtp_factory(pipelining=True)
    message = tmp_path / "message.eml"
    message.write_bytes(b"From: a@example.com\r\nTo: b@example.com\r\nSubject: x\r\n\r\nhi\r\n")
    job = BareJob(
        port=smtp.port,
        lanes=2,
        n=5,
        mode=mode,
        mail_from="a@example.com",
        mail_to="b@example.com",
        message_file=str(message),
    )
    result = run_bare(job, timeout=30)
    assert len(smtp.messages) == 5
    assert result.elapsed_s > 0
    assert result.cpu_s >= 0
    assert result.maxrss_mb > 10


_WIRE_KEYS = {"o", "l", "ls", "w", "s", "m", "a", "n"}


def _reads_a_wire_key(node: ast.AST) -> bool:
    """``x["l"]`` or ``x.get("l", ...)`` with a key of the delivery record's wire format."""
    if isinstance(node, ast.Subscript):
        key = node.slice
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and node.args
    ):
        key = node.args[0]
    else:
        return False
    return isinstance(key, ast.Constant) and key.value in _WIRE_KEYS


def test_only_the_records_module_knows_the_records_wire_keys() -> None:
    found = [
        f"{path.relative_to(WORKER.parent)}:{node.lineno}"
        for path in sorted(WORKER.rglob("*.py"))
        if path.name != "records.py" or path.parent != WORKER
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if _reads_a_wire_key(node)
    ]
    assert found == []


def test_no_fmt_skip_in_the_demo_bench_and_dev_tools() -> None:
    paths = [WORKER / "demo.py", *(WORKER / "bench").glob("*.py")]
    paths += (WORKER / "devtools").glob("*.py")
    found = [
        f"{path.relative_to(WORKER.parent)}:{n}"
        for path in sorted(paths)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "fmt: skip" in line
    ]
    assert found == []


def test_http_emulator_answers_a_keep_alive_request_without_a_nagle_stall() -> None:
    """The bench measures channel latency against the emulators: a reply written as headers
    then body must not wait for the client's delayed ACK (~40 ms on Linux), as it would
    without TCP_NODELAY (real servers set it)."""
    import httpx

    from worker.devtools.http_server import HttpEmulator

    server = HttpEmulator().start()
    try:
        with httpx.Client() as client:
            took = []
            for _ in range(9):
                t0 = time.perf_counter()
                assert client.post(server.base_url + "/x", json={"a": 1}).status_code == 200
                took.append(time.perf_counter() - t0)
        assert server.connections == 1  # keep-alive
        assert sorted(took)[4] < 0.02, took
    finally:
        server.stop()
