"""Routing (worker/routing.py): the routes file, first match wins, globs, severity lists, the
default route, the MAIL_TO fallback, an event's own ``to`` within the allowed set, errors as
one line naming NOTIFIER_ROUTES_FILE, and a real ``notifier run`` delivering by the routes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from producer.event import Event
from tests.support.helpers import clean_env, event, push, start_worker, wait_delivered
from worker.routing import Routes, load_routes
from worker.settings import SettingsError, load_settings

ALLOWED = frozenset({
    "desk@example.com", "me@example.com", "fills@example.com", "risk@example.com",
    "trader@example.com",
})  # fmt: skip

ROUTES = """
[[route]]
name = "critical to the desk"
severity = "critical"
to = ["desk@example.com", "me@example.com"]

[[route]]
strategy = ["ma_*", "grid_?"]
kind = ["fill", "order"]
to = ["fills@example.com"]
dedup_window_s = 300

[[route]]
name = "risk warnings"
severity = ["warning", "critical"]
kind = "risk"
to = ["Risk@Example.com"]

[[route]]
strategy = "ma_*"
to = ["me@example.com"]
digest = false

[default]
to = ["trader@example.com"]
"""


@pytest.fixture(autouse=True)
def _no_notifier_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env(monkeypatch, tmp_path)


def write(tmp_path: Path, text: str, name: str = "routes.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def ev(**fields: Any) -> Event:
    return Event.model_validate({"subject": "s", **fields})


@pytest.fixture
def routes(tmp_path: Path) -> Routes:
    return load_routes(write(tmp_path, ROUTES), ALLOWED)


# -- resolution ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "to"),
    [
        # first match wins: a critical fill of ma_cross matches routes 1, 2 and 4
        (
            {"strategy": "ma_cross", "kind": "fill", "severity": "critical"},
            ["desk@example.com", "me@example.com"],
        ),
        ({"strategy": "ma_cross", "kind": "fill"}, ["fills@example.com"]),
        ({"strategy": "grid_1", "kind": "order"}, ["fills@example.com"]),
        ({"strategy": "grid_10", "kind": "order"}, ["trader@example.com"]),  # ? is one char
        ({"strategy": "xma_cross", "kind": "fill"}, ["trader@example.com"]),  # whole name
        ({"strategy": "MA_CROSS", "kind": "fill"}, ["trader@example.com"]),  # case matters
        ({"kind": "fill"}, ["trader@example.com"]),  # no strategy: strategy rules do not match
        ({"strategy": "bond", "kind": "risk", "severity": "warning"}, ["risk@example.com"]),
        ({"strategy": "bond", "kind": "risk"}, ["trader@example.com"]),  # info not listed
        ({"strategy": "ma_cross", "kind": "signal"}, ["me@example.com"]),
        ({"strategy": "other", "kind": "signal"}, ["trader@example.com"]),  # default
    ],
)
def test_first_match_wins_with_globs_and_severity_lists(routes, fields, to):
    route = routes.resolve(ev(**fields))
    assert route is not None
    assert route.to == to


def test_route_fields(routes):
    first, fills, risk, ma = routes.route
    assert first.label == "critical to the desk" and first.severity == ["critical"]
    assert fills.label == "fills@example.com" and fills.dedup_window_s == 300
    assert risk.kind == ["risk"] and risk.to == ["risk@example.com"]  # lower-cased
    assert (first.digest, ma.digest) == (True, False)
    assert sorted(set(routes.recipients())) == sorted(ALLOWED)


def test_without_a_default_route_nothing_matches(tmp_path):
    r = load_routes(write(tmp_path, '[[route]]\nkind = "fill"\nto = ["me@example.com"]\n'),
                    ALLOWED)  # fmt: skip
    assert r.resolve(ev(kind="fill")) is not None
    assert r.resolve(ev(kind="signal")) is None
    assert load_routes(write(tmp_path, ""), ALLOWED).resolve(ev()) is None


# -- invalid files: one line naming NOTIFIER_ROUTES_FILE -----------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[route]\nto = 1", "not valid TOML at line 1, column 8: expected ']]'"),
        ('[[route]]\nto = ["me@example.com"]\nstrategies = ["ma_*"]\n', "strategies"),
        ('[defaults]\nto = ["me@example.com"]\n', "defaults"),
        ('[[route]]\nto = ["boss@elsewhere.com"]\n', "boss@elsewhere.com not allowed"),
        ('[default]\nto = ["me@example.com", "x@evil.com"]\n', "x@evil.com not allowed"),
        ('[[route]]\nto = ["not an address"]\n', "not a plain address"),
        ("[[route]]\nto = []\n", "route.0.to"),
        ('[[route]]\nkind = "fill"\nchannels = []\n', "route.0.channels"),
        ('[[route]]\nseverity = "fatal"\nto = ["me@example.com"]\n', "severity"),
        ('[[route]]\nto = ["me@example.com"]\ndedup_window_s = 0\n', "dedup_window_s"),
    ],
)
def test_invalid_routes_are_one_line_naming_the_setting(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_routes(path, ALLOWED)
    msg = str(info.value)
    assert msg.startswith(f"NOTIFIER_ROUTES_FILE={path}: ")
    assert "\n" not in msg
    assert words in msg
    # the same through the settings (what the worker and the CLI build)
    with pytest.raises(SettingsError) as info2:
        load_settings(routes_file=path, mail_to=["trader@example.com"],
                      allowed_recipients=sorted(ALLOWED - {"trader@example.com"}))  # fmt: skip
    assert str(info2.value) == msg


def test_unreadable_routes_file(tmp_path):
    with pytest.raises(ValueError) as info:
        load_routes(tmp_path / "missing.toml", ALLOWED)
    assert str(info.value).startswith(
        f"NOTIFIER_ROUTES_FILE={tmp_path / 'missing.toml'}: no such file"
    )


def test_mail_to_counts_as_allowed(tmp_path):
    path = write(tmp_path, '[default]\nto = ["boss@example.com"]\n')
    s = load_settings(routes_file=path, mail_to=["boss@example.com"])
    assert s.routes.default.to == ["boss@example.com"]
    with pytest.raises(SettingsError) as info:
        load_settings(routes_file=path, mail_to=["me@example.com"])
    assert "boss@example.com not allowed: add them to NOTIFIER_ALLOWED_RECIPIENTS" in str(
        info.value
    )


def test_run_refuses_a_bad_routes_file_with_one_line(tmp_path, worker_proc, redis_url):
    path = write(tmp_path, '[[route]]\nto = ["boss@elsewhere.com"]\n')
    env = {"PATH": "/usr/bin:/bin", "NOTIFIER_REDIS_URL": redis_url,
           "NOTIFIER_MAIL_FROM": "alerts@example.com", "NOTIFIER_MAIL_TO": "me@example.com",
           "NOTIFIER_ROUTES_FILE": str(path)}  # fmt: skip
    proc = worker_proc.spawn([sys.executable, "-m", "worker", "run"], env)
    assert proc.wait(timeout=30) == 2
    out = proc.log_path.read_text("utf-8").strip()  # type: ignore[attr-defined]
    assert out == (f"notifier run: NOTIFIER_ROUTES_FILE={path}: boss@elsewhere.com not allowed: "
                   "add them to NOTIFIER_ALLOWED_RECIPIENTS")  # fmt: skip


# -- who gets the mail (Deliverer) ----------------------------------------------------------------


def rcpts(smtp) -> dict[str, list[str]]:
    return {str(m.message["X-Notifier-Event-Id"]): sorted(m.rcpt_tos) for m in smtp.messages}


async def test_recipients_route_event_to_and_fallback(make_rig, smtp_server, tmp_path):
    rig = make_rig(smtp_server, routes_file=write(tmp_path, ROUTES),
                   allowed_recipients=sorted(ALLOWED - {"trader@example.com"}),
                   mail_to=["trader@example.com"])  # fmt: skip
    await rig.deliver(
        rig.event("crit", strategy="ma_cross", kind="fill", severity="critical"),
        rig.event("fill", strategy="ma_cross", kind="fill"),
        rig.event("dflt", strategy="other"),
        # the event's own to wins over the route, within the allowed set (case-insensitive)
        rig.event("own", strategy="ma_cross", kind="fill", to=["RISK@example.com"]),
        rig.event("bad", strategy="ma_cross", kind="fill", to=["me@example.com", "x@evil.com"]),
    )  # fmt: skip
    assert rcpts(smtp_server) == {
        "crit": ["desk@example.com", "me@example.com"],
        "fill": ["fills@example.com"],
        "dflt": ["trader@example.com"],
        "own": ["risk@example.com"],
    }
    to_header = {str(m.message["X-Notifier-Event-Id"]): str(m.message["To"])
                 for m in smtp_server.messages}  # fmt: skip
    assert to_header["crit"] == "desk@example.com, me@example.com"
    (letter,) = await rig.dead()
    assert (letter["id"], letter["reason"]) == ("bad", "invalid")
    assert "x@evil.com" in letter["error"] and "me@example.com" not in letter["error"]
    assert "NOTIFIER_ALLOWED_RECIPIENTS" in letter["error"]
    assert await rig.leftovers() == {}


async def test_without_routes_mail_to_and_event_to(make_rig, smtp_server):
    rig = make_rig(smtp_server, mail_to=["trader@example.com", "me@example.com"],
                   allowed_recipients=["risk@example.com"])  # fmt: skip
    await rig.deliver(rig.event("a"), rig.event("b", to=["risk@example.com"]),
                      rig.event("c", to=["me@example.com"]),
                      rig.event("d", to=["nobody@example.com"]))  # fmt: skip
    assert rcpts(smtp_server) == {
        "a": ["me@example.com", "trader@example.com"],
        "b": ["risk@example.com"],
        "c": ["me@example.com"],
    }
    assert [x["id"] for x in await rig.dead()] == ["d"]


async def test_no_matching_route_and_no_default_falls_back_to_mail_to(
    make_rig, smtp_server, tmp_path
):
    path = write(tmp_path, '[[route]]\nkind = "fill"\nto = ["fills@example.com"]\n')
    rig = make_rig(smtp_server, routes_file=path, mail_to=["trader@example.com"],
                   allowed_recipients=["fills@example.com"])  # fmt: skip
    await rig.deliver(rig.event("f", kind="fill"), rig.event("s", kind="signal"))
    assert rcpts(smtp_server) == {"f": ["fills@example.com"], "s": ["trader@example.com"]}


async def test_digest_false_route_is_never_held(make_rig, smtp_server, tmp_path):
    path = write(tmp_path, '[[route]]\nstrategy = "hft"\nto = ["me@example.com"]\n'
                 'digest = false\n')  # fmt: skip
    rig = make_rig(smtp_server, routes_file=path, allowed_recipients=["me@example.com"],
                   smtp_rate_per_minute=2, smtp_rate_window_s=60)  # fmt: skip
    await rig.deliver(*(rig.event(f"h{i}", strategy="hft") for i in range(4)),
                      rig.event("other"))  # fmt: skip
    assert sorted(rcpts(smtp_server)) == ["h0", "h1", "h2", "h3"]
    assert rig.outcomes[-1].status == "held"  # the slots were taken: other routes wait
    assert rig.outcomes[-1].event_id == "other"


# -- a real run ----------------------------------------------------------------------------------


def test_run_delivers_to_the_routes_recipients(
    redis_url, r, smtp_server, worker_env, worker_proc, tmp_path
):
    path = write(tmp_path, ROUTES)
    env = worker_env(redis_url, smtp_server, routes_file=path,
                     allowed_recipients=",".join(sorted(ALLOWED)), heartbeat_ttl_s=2)  # fmt: skip
    start_worker(worker_proc, env)
    push(r, event("crit", strategy="grid_1", kind="order", severity="critical"),
         event("fill", strategy="grid_1", kind="order"),
         event("risk", strategy="bond", kind="risk", severity="warning"),
         event("own", strategy="grid_1", kind="order", to=["me@example.com"]),
         event("dflt", strategy="bond"))  # fmt: skip
    wait_delivered(smtp_server, ["crit", "fill", "risk", "own", "dflt"], 10, digests=True)
    assert rcpts(smtp_server) == {
        "crit": ["desk@example.com", "me@example.com"],
        "fill": ["fills@example.com"],
        "risk": ["risk@example.com"],
        "own": ["me@example.com"],
        "dflt": ["trader@example.com"],
    }
