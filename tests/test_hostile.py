"""Hostile input: malformed and malicious events interleaved with good ones, against a real
worker; plus property tests of the parser and the composer.

Three kinds of events go through one ``notifier run`` process:

- ``BAD``: malformed or malicious events that break the contract. Each must end in
  ``<prefix>:dead`` with its original text, a reason and a readable error.
- ``GOOD``: valid events full of hostile text (header-like lines, HTML and script, SMTP
  smuggling, unknown fields named like headers). Each must be delivered exactly once, with
  no injected header, no extra recipient and the HTML escaped.
- ``EITHER``: events a worker may refuse or deliver (e.g. RFC 2047 encoded words that decode
  to CR/LF); whichever it does, it must not produce a mail with an injected header.

The worker must stay up throughout, and a last good event after all of them is delivered.
"""

from __future__ import annotations

import email
import json
import string
from collections import Counter
from email import policy
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from producer.event import Event, InvalidEvent, parse_event
from tests.support.helpers import (
    DEAD,
    EMPTY,
    MAIL_FROM,
    MAIL_TO,
    dead_letters,
    delivered,
    html_of,
    leftovers,
    push,
    rclient,
    text_of,
    wait_delivered,
    wait_until,
)
from worker.compose import Composer, message_id
from worker.mailer import message_bytes

ALLOWED = {"trader@example.com", "ops@example.com", "desk@example.com"}
VICTIM = "victim@example.com"
MB10 = 10 * 1024 * 1024
MAX_DEAD_TEXT = 1024 * 1024

# Every header a notifier mail may carry (compose.py); anything else was injected.
HEADERS = {
    "subject", "from", "to", "date", "message-id", "x-notifier-event-id",
    "x-notifier-severity", "x-notifier-strategy", "x-priority", "importance",
    "in-reply-to", "references", "mime-version", "content-type",
    "auto-submitted", "x-auto-response-suppress",
}  # fmt: skip
ONCE = HEADERS - {"x-priority", "importance"}


def j(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def deep(n: int) -> str:
    return "[" * n + "]" * n


CRLF_BCC = "hi\r\nBcc: victim@example.com"

# (kind, raw bytes as pushed): every one must be dead-lettered.
BAD: list[tuple[str, bytes]] = [
    ("subject CRLF Bcc", j({"subject": CRLF_BCC})),
    ("subject LF Bcc", j({"subject": "hi\nBcc: victim@example.com"})),
    ("subject CR only", j({"subject": "hi\rBcc: victim@example.com"})),
    ("subject CRLF CRLF body", j({"subject": "hi\r\n\r\nforged body"})),
    ("subject NUL", j({"subject": "hi\x00there"})),
    ("subject U+2028", j({"subject": "hi\u2028Bcc: victim@example.com"})),
    ("subject U+2029", j({"subject": "hi\u2029X-Evil: 1"})),
    ("subject NEL U+0085", j({"subject": "hi\x85Bcc: victim@example.com"})),
    ("subject over 256", j({"subject": "长" * 257})),
    ("subject 10 MB", j({"subject": "A" * MB10})),
    ("strategy CRLF header", j({"subject": "s", "strategy": "ma\r\nX-Injected: 1"})),
    ("kind CRLF header", j({"subject": "s", "kind": "fill\r\nBcc: victim@example.com"})),
    ("kind empty", j({"subject": "s", "kind": ""})),
    ("id CRLF", j({"id": "x\r\nBcc: victim@example.com", "subject": "s"})),
    ("id with space", j({"id": "a b", "subject": "s"})),
    ("id 129 chars", j({"id": "i" * 129, "subject": "s"})),
    ("id not a string", j({"id": 12345, "subject": "s"})),
    ("to outside allowed", j({"subject": "s", "to": [VICTIM]})),
    ("to allowed plus outsider", j({"subject": "s", "to": [MAIL_TO, VICTIM]})),
    ("to CRLF Bcc", j({"subject": "s", "to": ["trader@example.com\r\nBcc: victim@example.com"]})),
    ("to comma list in one", j({"subject": "s", "to": ["trader@example.com, victim@example.com"]})),
    ("to display name", j({"subject": "s", "to": ["Evil <victim@example.com>"]})),
    ("to a string", j({"subject": "s", "to": MAIL_TO})),
    ("to empty list", j({"subject": "s", "to": []})),
    ("to 51 entries", j({"subject": "s", "to": [f"u{i}@example.com" for i in range(51)]})),
    ("to 10000 entries", j({"subject": "s", "to": [f"u{i}@example.com" for i in range(10_000)]})),
    ("to nested", j({"subject": "s", "to": [[MAIL_TO]]})),
    ("body NUL", j({"body": "a\x00b"})),
    ("body ESC", j({"body": "a\x1b[31mred"})),
    ("body 10 MB", j({"body": "<script>" * (MB10 // 8)})),
    ("body object", j({"body": {"text": "hi"}})),
    ("data nested object", j({"data": {"a": {"b": {"c": 1}}}})),
    ("data list value", j({"data": {"a": [1, 2, 3]}})),
    ("data is a list", j({"data": ["symbol", "600519"]})),
    ("data 101 fields", j({"data": {f"k{i}": i for i in range(101)}})),
    ("data key CRLF", j({"data": {"k\r\nBcc: victim@example.com": 1}})),
    ("data key empty", j({"data": {"": 1}})),
    ("data value NUL", j({"data": {"k": "v\x00"}})),
    ("data value 10 MB", j({"data": {"k": "x" * MB10}})),
    ("data empty only", j({"data": {}})),
    ("data deep nesting", ('{"data":{"a":' + deep(5000) + "}}").encode()),
    ("data NaN", b'{"subject":"s","data":{"price":NaN}}'),
    ("data Infinity", b'{"subject":"s","data":{"price":Infinity}}'),
    ("data -Infinity", b'{"subject":"s","data":{"price":-Infinity}}'),
    ("data 1e999 overflow", b'{"subject":"s","data":{"price":1e999}}'),
    ("ts NaN", b'{"subject":"s","ts":NaN}'),
    ("ts negative", j({"subject": "s", "ts": -1})),
    ("ts boolean", j({"subject": "s", "ts": True})),
    ("ts garbage string", j({"subject": "s", "ts": "yesterday"})),
    ("int with 5000 digits", b'{"subject":"s","data":{"n":' + b"9" * 5000 + b"}}"),
    ("severity unknown", j({"subject": "s", "severity": "urgent"})),
    ("severity CRLF", j({"subject": "s", "severity": "info\r\nBcc: victim@example.com"})),
    ("v 2", j({"v": 2, "subject": "from the future"})),
    ("v string", j({"v": "1", "subject": "s"})),
    ("subject number", j({"subject": 42})),
    ("subject list", j({"subject": ["a", "b"]})),
    ("no content", j({"strategy": "ma_cross", "kind": "signal"})),
    ("subject null only", j({"subject": None})),
    ("meta negative attempts", j({"subject": "s", "_meta": {"attempts": -1}})),
    ("empty object", b"{}"),
    ("JSON array", b'[{"subject":"s"}]'),
    ("bare string", b'"subject"'),
    ("bare number", b"42"),
    ("null", b"null"),
    ("true", b"true"),
    ("empty", b""),
    ("whitespace", b" \r\n\t "),
    ("not JSON", b"hello world"),
    ("truncated JSON", b'{"subject":"s"'),
    ("trailing garbage", b'{"subject":"s"} {"subject":"t"}'),
    ("single quotes", b"{'subject':'s'}"),
    ("deep nesting array", deep(20_000).encode()),
    ("invalid UTF-8", b'{"subject":"\xff\xfe bad"}'),
    ("UTF-8 overlong", b'{"subject":"\xc0\xaf"}'),
    ("UTF-8 encoded surrogate", b'{"subject":"\xed\xa0\x80"}'),
    ("latin-1 text", '{"subject":"café"}'.encode("latin-1")),
    ("UTF-16", '{"subject":"s"}'.encode("utf-16")),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"subject":"s"}'),
    ("lone surrogate escape in subject", b'{"subject":"x\\ud800"}'),
    ("lone surrogate escape in body", b'{"body":"x\\udfff"}'),
    ("lone surrogate escape in data", b'{"subject":"s","data":{"k":"\\ud83d"}}'),
    ("duplicate key, bad last", b'{"subject":"ok","subject":"x\\r\\nBcc: victim@example.com"}'),
    ("over 64 KiB", j({"subject": "s", "body": "b" * (64 * 1024)})),
]

# Valid events full of hostile text: each must be delivered exactly once, safely.
GOOD: list[dict[str, Any]] = [
    {
        "id": "g-plain",
        "subject": "止损触发 600519",
        "strategy": "ma_cross",
        "data": {"price": 1700.5},
    },
    {
        "id": "g-body-headers",
        "subject": "body with headers",
        "body": "line\r\nBcc: victim@example.com\r\nX-Injected: 1\r\n\r\nTo: victim@example.com",
    },
    {
        "id": "g-smuggle",
        "subject": "smuggling",
        "body": "a\r\n.\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
        "Subject: smuggled\r\n\r\nhi\r\n.\r\n\n.\n.\r.\r",
    },
    {"id": "g-header-like-subject", "subject": "X-Injected: yes; Bcc: victim@example.com"},
    {
        "id": "g-script",
        "subject": "<script>alert('subject')</script>",
        "strategy": "<script>alert('strategy')</script>",
        "kind": "<svg/onload=alert(1)>",
        "body": "<script>alert('body')</script><img src=x onerror=alert(1)>",
    },
    {
        "id": "g-data-html",
        "subject": "data",
        "data": {
            "<b>key</b>": "<img src=x onerror=alert(1)>",
            "Bcc": VICTIM,
            "Subject": "forged",
            "symbol": "600519.SH",
            "side": "<i>BUY</i>",
        },
    },
    {
        "id": "g-side-crlf",
        "data": {
            "side": "BUY\r\nBcc: victim@example.com",
            "symbol": "X\nY",
            "qty": 100,
            "price": 3.5,
        },
    },
    {"id": "g-unicode", "subject": "🚀 止损\u202etxt.exe\u200b ‮", "strategy": "网格_1"},
    {"id": "weird<id>@x", "subject": "odd but valid id"},
    {"id": "g-upper-to", "subject": "to upper case", "to": ["TRADER@Example.COM"]},
    {"id": "g-to-allowed", "subject": "to allowed", "to": ["ops@example.com", "desk@example.com"]},
    {"id": "g-big-body", "subject": "big", "body": "<" * 60_000},
    {"id": "g-100-fields", "data": {f"<k{i}>": f"<v{i}>" for i in range(100)}},
    {"id": "g-critical", "subject": "[CRITICAL] already", "severity": "critical"},
    {"id": "g-empty-subject", "subject": "", "body": "first line\nsecond"},
    {
        "id": "g-unknown-fields",
        "subject": "extra fields",
        "bcc": VICTIM,
        "cc": [VICTIM],
        "headers": {"Bcc": VICTIM},
        "from": "ceo@bank.example",
        "reply_to": VICTIM,
        "Bcc": VICTIM,
    },
    {
        "id": "g-meta-junk",
        "subject": "meta",
        "_meta": {"last_error": "x\r\nBcc: victim@example.com"},
    },
    {"id": "g-iso-ts", "subject": "iso", "ts": "2026-11-25T09:30:00+08:00"},
    {"id": "g-big-int", "subject": "int", "data": {"n": int("9" * 4000)}},
    {"id": "g-null-data-values", "subject": "nulls", "data": {"a": None, "b": True, "c": 0}},
]

# RFC 2047 encoded words that decode to CR/LF, in every field that reaches a header, and
# timestamps a template cannot format: refusing them is fine, injecting is not.
EITHER: list[dict[str, Any]] = [
    {"id": "e-ew-subject-q", "subject": "=?utf-8?q?hi=0D=0ABcc:_victim@example.com?="},
    {"id": "e-ew-subject-b", "subject": "=?utf-8?b?aGkNCkJjYzogdmljdGltQGV4YW1wbGUuY29t?="},
    {"id": "e-ew-subject-body", "subject": "=?utf-8?q?hi=0D=0A=0D=0Aforged_body?="},
    {"id": "e-ew-strategy", "subject": "s", "strategy": "=?utf-8?q?s=0D=0AX-Injected:_1?="},
    {"id": "e-ew-kind", "body": "b", "kind": "=?utf-8?q?k=0D=0AX-Injected:_1?="},
    {"id": "e-ew-side", "data": {"side": "=?utf-8?q?B=0D=0AX-Injected:_1?=", "symbol": "x"}},
    {"id": "e-ts-ms", "subject": "ts in milliseconds", "ts": 1795640000000},
]

SENTINEL = {"id": "g-last", "subject": "still alive"}


def header_id(event_id: str) -> str:
    """What ``X-Notifier-Event-Id`` says for an id (ids that are not a dot-atom are hashed)."""
    left = message_id(event_id, "example.com")[1:-1]
    return event_id if left == f"{event_id}@example.com" else left


def dead_text(raw: bytes) -> str:
    """The event text a dead letter keeps for ``raw``."""
    return raw[:MAX_DEAD_TEXT].decode("utf-8", "backslashreplace")


def check_headers(message: EmailMessage, where: str) -> None:
    names = [k.lower() for k in message]
    extra = set(names) - HEADERS
    assert not extra, f"{where}: unexpected header(s) {sorted(extra)}"
    repeated = [n for n, c in Counter(names).items() if c > 1 and n in ONCE]
    assert not repeated, f"{where}: repeated header(s) {repeated}"
    for name, value in message.items():
        assert "\r" not in str(value) and "\n" not in str(value), f"{where}: {name} has CR/LF"
    addresses = {a.lower() for _, a in getaddresses(message.get_all("To", []))}
    assert addresses and addresses <= ALLOWED, f"{where}: To {addresses}"


def test_hostile_events_interleaved_with_good_ones(worker_proc, worker_env, smtp_server, redis_url):
    assert len({kind for kind, _ in BAD}) == len(BAD) >= 30
    r = rclient(redis_url)
    env = worker_env(redis_url, smtp_server, allowed_recipients="ops@example.com,desk@example.com",
                     retry_base_s=0.05, retry_max_s=0.5)  # fmt: skip
    good = [json.dumps(ev, ensure_ascii=False).encode() for ev in GOOD]
    either = [json.dumps(ev, ensure_ascii=False).encode() for ev in EITHER]
    bad = [raw for _, raw in BAD]
    mixed: list[bytes] = []
    for i in range(max(len(bad), len(good) + len(either))):
        if i < len(bad):
            mixed.append(bad[i])
        if i < len(good) + len(either):
            mixed.append((good + either)[i])
    for chunk in range(0, len(mixed), 10):
        push(r, *mixed[chunk : chunk + 10])
    proc = worker_proc(env)

    good_ids = [header_id(ev["id"]) for ev in GOOD]
    either_ids = [ev["id"] for ev in EITHER]
    wait_delivered(smtp_server, good_ids, 30)

    def settled() -> bool:
        # A mail whose headers were cut short by an injected blank line has no event id.
        got = delivered(smtp_server)
        done = set(either_ids) & ({x["id"] for x in dead_letters(r)} | set(got))
        return r.llen(DEAD) >= len(bad) and len(done) + got["None"] >= len(either_ids)

    try:
        wait_until(settled, 30, "every bad event dead and every doubtful one settled")
    except AssertionError:
        dead_ids = {x["id"] for x in dead_letters(r)}
        texts = Counter(x["event"] for x in dead_letters(r))
        raise AssertionError(
            f"{r.llen(DEAD)} dead letters for {len(bad)} bad events; not dead: "
            f"{[k for k, raw in BAD if texts[dead_text(raw)] == 0]}; doubtful unsettled: "
            f"{sorted(set(either_ids) - dead_ids - set(delivered(smtp_server)))}; {leftovers(r)}"
        ) from None
    push(r, SENTINEL)
    wait_delivered(smtp_server, ["g-last"], 10)
    assert proc.poll() is None, "the worker died"
    wait_until(lambda: leftovers(r) == EMPTY, 5, "empty queue, retry and processing")

    # Every bad event is a dead letter: its text, a reason, a readable error.
    letters = dead_letters(r)
    by_text = Counter(x["event"] for x in letters)
    missing = [kind for kind, raw in BAD if by_text[dead_text(raw)] < 1]
    assert not missing, f"not dead-lettered: {missing}"
    for letter in letters:
        assert letter["reason"], letter
        error = letter["error"]
        assert isinstance(error, str) and 5 <= len(error) <= 2000, letter
        assert error.isprintable(), f"unreadable error {error!r}"
    bad_texts = Counter(dead_text(raw) for raw in bad)
    extra = [x for x in letters if bad_texts[x["event"]] == 0]
    assert {x["id"] for x in extra} <= set(either_ids), [x["error"] for x in extra]
    assert len(letters) == len(bad) + len(extra)

    # No injected header, no extra recipient, HTML escaped, hostile text intact as text.
    by_id = {str(m.message["X-Notifier-Event-Id"]): m for m in smtp_server.messages}
    for m in smtp_server.messages:
        where = f"mail for {m.message['X-Notifier-Event-Id']} (Subject {m.message['Subject']!r})"
        check_headers(m.message, where)
        assert set(m.rcpt_tos) <= ALLOWED and VICTIM not in m.rcpt_tos, where
        html = html_of(m.message)
        for tag in ("<script", "<img", "<svg", "<i>", "<b>k", "<k0>"):
            assert tag not in html, f"{where}: {tag!r} unescaped in the HTML part"
    # Every good event delivered exactly once; each doubtful one delivered or dead, not both.
    got = delivered(smtp_server)
    assert all(got[i] == 1 for i in [*good_ids, "g-last"]), got
    for i in either_ids:
        assert got[i] + sum(1 for x in extra if x["id"] == i) == 1, i
    assert set(got) <= {*good_ids, *either_ids, "g-last"}, "a mail nobody sent"

    assert by_id["g-plain"].rcpt_tos == [MAIL_TO]
    assert sorted(by_id["g-to-allowed"].rcpt_tos) == ["desk@example.com", "ops@example.com"]
    assert by_id["g-upper-to"].rcpt_tos == ["trader@example.com"]
    assert "&lt;script&gt;alert(&#39;body&#39;)&lt;/script&gt;" in html_of(
        by_id["g-script"].message
    ) or "&lt;script&gt;alert(&#x27;body&#x27;)" in html_of(by_id["g-script"].message)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html_of(by_id["g-data-html"].message)
    assert "MAIL FROM:<evil@example.com>" in text_of(by_id["g-smuggle"].message)
    assert "Bcc: victim@example.com" in text_of(by_id["g-body-headers"].message)
    assert str(by_id["g-header-like-subject"].message["Subject"]) == GOOD[3]["subject"]
    assert str(by_id[header_id("weird<id>@x")].message["Subject"]) == "odd but valid id"
    assert html_of(by_id["g-big-body"].message).count("&lt;") >= 60_000


# -- properties of the parser and the composer ---------------------------------------------

NASTY = [
    "\r\n", "\n", "\r", "\r\n\r\n", "\t", "\x00", "\x0b", "\x1b", "\x7f", "\x85", "\u2028",
    "\u2029", "\ud800", "\udfff", "Bcc: victim@example.com", "X-Injected: 1", "=?utf-8?q?",
    "=0D=0A", "?=", "=?utf-8?b?DQpCY2M6IHZAZXhhbXBsZS5jb20=?=", "<script>", "&", "\"", "'",
    ".", "\r\n.\r\n", "止损", "🚀", " ", ",", ";", ":", "trader@example.com", "\u202e",
]  # fmt: skip
pieces = st.one_of(st.sampled_from(NASTY), st.text(max_size=6))
nasty_text = st.one_of(st.text(max_size=30), st.lists(pieces, max_size=8).map("".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), nasty_text)
json_ish = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(nasty_text, inner, max_size=3)
    ),
    max_leaves=8,
)
addresses = st.one_of(
    st.sampled_from(
        ["trader@example.com", "ops@example.com", "TRADER@EXAMPLE.COM", "victim@example.com",
         "a@b", "x@example.com\r\nBcc: v@example.com", "Evil <v@example.com>", ""]
    ),
    nasty_text,
)  # fmt: skip
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "v": st.one_of(st.just(1), json_ish),
    "id": st.one_of(
        st.text(string.ascii_letters + string.digits + "-_.<>@", max_size=20), nasty_text, json_ish
    ),
    "ts": st.one_of(st.floats(), st.integers(), st.just("2026-11-25T09:30:00+08:00"), json_ish),
    "strategy": st.one_of(nasty_text, json_ish),
    "kind": st.one_of(st.sampled_from(["signal", "fill", "error"]), nasty_text, json_ish),
    "severity": st.one_of(st.sampled_from(["info", "warning", "critical"]), json_ish),
    "subject": st.one_of(nasty_text, json_ish),
    "body": st.one_of(nasty_text, json_ish),
    "data": st.one_of(
        st.dictionaries(nasty_text, st.one_of(scalars, json_ish), max_size=5), json_ish
    ),
    "to": st.one_of(st.lists(addresses, max_size=4), json_ish),
    "_meta": st.one_of(st.fixed_dictionaries({"attempts": st.integers()}), json_ish),
    "bcc": json_ish,
}
# Legal but tricky: no control characters where the contract forbids them, so that most
# of these pass the parser and reach the composer.
LEGAL = [
    p for p in NASTY
    if not any(c in "\r\n\t\x00\x0b\x1b\x7f\x85\u2028\u2029" or 0xD800 <= ord(c) < 0xE000 for c in p)
]  # fmt: skip
legal_pieces = st.one_of(
    st.sampled_from(LEGAL), st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=6)
)
legal_text = st.lists(legal_pieces, max_size=10).map("".join)
body_text = st.lists(st.one_of(legal_pieces, st.sampled_from(["\r\n", "\n", "\r", "\t"])),
                    max_size=10).map("".join)  # fmt: skip
legal_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    legal_text,
    body_text,
)
plausible = st.fixed_dictionaries(
    {"subject": legal_text.map(lambda t: t[:256])},
    optional={
        "id": st.text(string.ascii_letters + string.digits + "-_.<>@=?", min_size=1, max_size=30),
        "strategy": legal_text.map(lambda t: t[:128]),
        "kind": legal_text.filter(lambda t: 0 < len(t) <= 64),
        "severity": st.sampled_from(["info", "warning", "critical"]),
        "body": body_text,
        "data": st.dictionaries(
            legal_text.filter(lambda t: 0 < len(t) <= 64), legal_scalars, max_size=6
        ),
        "to": st.lists(
            st.sampled_from([*sorted(ALLOWED), "TRADER@EXAMPLE.COM"]), min_size=1, max_size=3
        ),
        "ts": st.floats(min_value=0, max_value=4e9),
    },
)
events = st.one_of(
    plausible,
    plausible.map(lambda d: {k: v for k, v in d.items() if k != "subject"}),
    st.fixed_dictionaries({}, optional=FIELDS),
    json_ish,
)

COMPOSER = Composer(mail_from=MAIL_FROM, hostname="notifier.test")


def expected_headers(event: Event) -> set[str]:
    names = {"subject", "from", "to", "date", "message-id", "x-notifier-event-id",
             "x-notifier-severity", "mime-version", "content-type",
             "auto-submitted", "x-auto-response-suppress"}  # fmt: skip
    if event.strategy:
        names.add("x-notifier-strategy")
    if event.severity == "critical":
        names |= {"x-priority", "importance"}
    if getattr(COMPOSER, "thread_by_day", False):
        names |= {"in-reply-to", "references"}
    return names


def compose_checked(event: Event) -> EmailMessage:
    """Compose and flatten like the worker; parse the bytes back as a mail client would."""
    recipients = list(event.to) if event.to else [MAIL_TO]
    msg = COMPOSER.compose(event, event_id=event.id or "generated-id", recipients=recipients)
    data = message_bytes(msg)
    assert b"\r\n\r\n" in data
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        assert line[:1] in (b" ", b"\t") or b":" in line, f"not a header line: {line!r}"
    parsed = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=events, ascii_only=st.booleans())
@example(obj={"subject": "=?utf-8?q?hi=0D=0ABcc:_victim@example.com?="}, ascii_only=True)
@example(obj={"body": "x\ud800"}, ascii_only=True)
def test_parse_then_compose_never_injects(obj, ascii_only):
    raw = json.dumps(obj, ensure_ascii=ascii_only)
    try:
        event = parse_event(raw)
    except InvalidEvent as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return
    parsed = compose_checked(event)
    names = [k.lower() for k in parsed]
    assert set(names) == expected_headers(event), names
    assert len(names) == len(set(names)), names
    for name, value in parsed.items():
        assert "\r" not in str(value) and "\n" not in str(value), (name, str(value))
    rcpts = {a.lower() for _, a in getaddresses(parsed.get_all("To", []))}
    assert rcpts == set(event.to or [MAIL_TO])
    assert "<script>" not in html_of(parsed)
    # What a retry writes back to Redis.
    assert event.with_meta(attempts=1, last_error="451 4.3.0 try again later").to_json()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"body":"x\\ud800"}',
        b'{"subject":"s","data":{"k":"\\udfff"}}',
        b'{"subject":"s","data":{"\\ud83d":"v"}}',
    ],
)
def test_lone_surrogates_are_invalid_events(raw):
    """JSON may escape a lone surrogate (\\ud800) though UTF-8 cannot encode it: such an
    event can be neither composed nor written back to Redis (``to_json`` raises), so the
    contract must refuse it with InvalidEvent, as it refuses invalid UTF-8 bytes."""
    with pytest.raises(InvalidEvent):
        parse_event(raw)


def test_producer_refuses_lone_surrogates_with_invalid_event(redis_url):
    """The strategy's client raises its documented InvalidEvent, not a serializer error
    (a lone surrogate comes from e.g. ``bytes.decode(errors="surrogateescape")``)."""
    from producer import Notifier

    notifier = Notifier(redis_url)
    try:
        with pytest.raises(InvalidEvent):
            notifier.send("disk full", body="path /data/\udcff.csv")
    finally:
        notifier.close()


@pytest.mark.parametrize("case", EITHER[:6], ids=[ev["id"] for ev in EITHER[:6]])
def test_encoded_words_cannot_inject_headers(case):
    """Header text that looks like an RFC 2047 encoded word is decoded by the email
    package's header parser; ``=0D=0A`` inside must not come out as a line break."""
    try:
        event = parse_event(json.dumps(case))
    except InvalidEvent:
        return  # refusing it is fine
    parsed = compose_checked(event)
    names = [k.lower() for k in parsed]
    assert "bcc" not in names and "x-injected" not in names, names
    assert set(names) == expected_headers(event), names
    for name, value in parsed.items():
        assert "\r" not in str(value) and "\n" not in str(value), (name, str(value))
