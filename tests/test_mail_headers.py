"""What a mail carries, on the bytes as sent (worker/compose.py): the subject exactly as the
event gave it, RFC 5322 folding, canonical text parts, the auto-reply headers and a
Message-ID per event. Checked with ``email.parser`` (``policy=email.policy.default``) and end
to end through aiosmtpd."""

from __future__ import annotations

import email
import email.policy
import re
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import pytest

from producer.event import MAX_SUBJECT_CHARS, Event
from tests.support.helpers import KEYS
from worker.compose import Composer, Mail

FROM = "量化提醒 <alerts@example.com>"
TO = ["trader@example.com"]
ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")

# Subjects a strategy may send (the contract allows 256 characters, one line).
SUBJECTS = {
    "cjk 256": "止损触发" * 64,
    "ascii 256 no space": "A" * 256,
    "ascii words 256": ("sell 600519 " * 22)[:256],
    "double spaces": "止损  触发   600519    @ 1700.50  ma_cross" + "  x" * 60,
    "ideographic space": "止损\u3000触发\u3000\u3000600519" + "\u3000价" * 100,
    "no-break spaces": "BUY\xa0600519\xa0\xa0@ 1700.5" + " \xa0a" * 70,
    "leading and trailing spaces": "  止损 600519  ",
    "leading ascii space": " sell now",
    "trailing ascii spaces": "sell now   ",
    "encoded-word lookalike": "=?utf-8?q?hi=20there?= and =?gb2312?b?1tA=?=",
    "emoji 256": "🚀📉" * 128,
    "mixed 256": ("BUY 600519.SH 贵州茅台 @ 1700.50 🚀  " * 10)[:256],
    "one character": "x",
}


def event(**fields: Any) -> Event:
    return Event.model_validate(fields)


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def compose(ev: Event, *, composer: Composer | None = None, **kw: Any) -> Mail:
    composer = composer or Composer(mail_from=FROM)
    return composer.compose(ev, event_id=kw.pop("event_id", ev.id or "evt-1"), recipients=TO, **kw)


def head_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def header_lines(data: bytes, name: str) -> list[bytes]:
    """The physical lines of header ``name`` (its first line and its continuations)."""
    out: list[bytes] = []
    inside = False
    for line in head_lines(data):
        if line[:1] in (b" ", b"\t"):
            if inside:
                out.append(line)
            continue
        inside = line.lower().startswith(name.lower().encode() + b":")
        if inside:
            out.append(line)
    assert out, f"no {name} header"
    return out


# -- 1. the subject arrives exactly as sent ----------------------------------------------------


@pytest.mark.parametrize("subject", SUBJECTS.values(), ids=SUBJECTS.keys())
def test_subject_arrives_exactly_as_sent(subject: str) -> None:
    assert len(subject) <= MAX_SUBJECT_CHARS
    mail = compose(event(subject=subject))
    assert mail.subject == subject
    assert parse(mail.data)["Subject"] == subject


@pytest.mark.parametrize("subject", SUBJECTS.values(), ids=SUBJECTS.keys())
def test_subject_lines_are_folded(subject: str) -> None:
    """Unstructured text can always be folded to 78 characters a line (RFC 5322 2.1.1):
    at its spaces, else as encoded words of at most 75 characters (RFC 2047)."""
    lines = header_lines(compose(event(subject=subject)).data, "Subject")
    assert all(len(line) <= 78 for line in lines), [len(line) for line in lines]
    for line in lines[1:]:
        assert line.strip(b" \t"), "a folded line must not be only white space"
    for word in ENCODED_WORD.findall(b"".join(lines)):
        assert len(word) <= 75


def test_critical_and_delayed_prefixes_keep_a_full_subject() -> None:
    subject = "止 " * 128
    mail = compose(event(subject=subject, severity="critical"))
    assert parse(mail.data)["Subject"] == f"[CRITICAL] {subject}"
    mail = compose(event(subject=subject), subject=f"[DELAYED 3m12s] [CRITICAL] {subject}")
    assert parse(mail.data)["Subject"] == f"[DELAYED 3m12s] [CRITICAL] {subject}"


def test_every_header_line_is_short_or_unbreakable() -> None:
    """Lines stay within 78 characters where a fold is possible, and never exceed 998."""
    recipients = [f"desk{i:02d}.trader.longname@example-brokerage.com" for i in range(50)]
    ev = event(id="x" * 128, subject="止损 " * 80, strategy="策略" * 64, data={"side": "buy"})
    mail = Composer(mail_from="量化提醒 " * 20 + "<alerts@example.com>").compose(
        ev, event_id="x" * 128, recipients=recipients
    )
    for line in head_lines(mail.data):
        assert len(line) <= 998
        if len(line) > 78:  # only a single token that cannot be split (e.g. a Message-ID)
            body = line.split(b":", 1)[1] if line[:1] not in (b" ", b"\t") else line
            assert b" " not in body.strip(b" "), line
    parsed = parse(mail.data)
    assert [a.addr_spec for a in parsed["To"].addresses] == recipients
    assert parsed["X-Notifier-Strategy"] == "策略" * 64
    # A display name longer than one encoded word: RFC 2047 6.2 drops the white space
    # between adjacent encoded words (mail clients do; email's address parser adds a space).
    (raw_from,) = [v for k, v in parse(mail.data).raw_items() if k == "From"]
    decoded = str(make_header(decode_header(raw_from)))
    assert decoded == ("量化提醒 " * 20).strip() + " <alerts@example.com>"


def test_rendered_subject_from_a_long_body_is_not_cut_below_the_contract() -> None:
    ev = event(body="止" * 5000)
    subject = parse(compose(ev).data)["Subject"]
    assert subject == "[INFO] " + "止" * (MAX_SUBJECT_CHARS - len("[INFO] "))


# -- 2. canonical text parts -------------------------------------------------------------------


def _decoded_texts(data: bytes) -> list[bytes]:
    parsed = parse(data)
    out = []
    for part in parsed.walk():
        if part.get_content_maintype() == "text":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out.append(payload)
    assert len(out) == 2
    return out


@pytest.mark.parametrize(
    "body",
    ["a\rb", "a\nb", "a\r\nb", "a\r\rb\n\nc\r\n\rd", "\r", "end with cr\r", "多行\r第二行\n第三行"],
)
def test_text_parts_have_only_crlf_line_breaks(body: str) -> None:
    for payload in _decoded_texts(compose(event(body=body)).data):
        assert re.search(rb"\r(?!\n)", payload) is None, payload
        assert re.search(rb"(?<!\r)\n", payload) is None, payload
    plain = parse(compose(event(body=body)).data).get_body(("plain",))
    assert plain is not None
    lines = re.split(r"\r\n|\r|\n", body)
    assert "\r\n".join(lines) in plain.get_content()


def test_digest_text_parts_are_canonical_too() -> None:
    evs = [(f"d{i}", event(body=f"first\rsecond {i}\nthird", ts=1700000000 + i)) for i in range(3)]
    mail = Composer(mail_from=FROM).compose_digest(evs, recipients=TO)
    for payload in _decoded_texts(mail.data):
        assert re.search(rb"\r(?!\n)", payload) is None
        assert re.search(rb"(?<!\r)\n", payload) is None


# -- 3. auto-generated, no auto-replies --------------------------------------------------------


def test_every_mail_says_it_is_auto_generated() -> None:
    composer = Composer(mail_from=FROM)
    single = composer.compose(event(subject="s"), event_id="e1", recipients=TO)
    digest = composer.compose_digest([("e1", event(subject="s"))], recipients=TO)
    for mail in (single, digest):
        parsed = parse(mail.data)
        assert parsed["Auto-Submitted"] == "auto-generated"
        assert parsed["X-Auto-Response-Suppress"] == "All"


# -- 4. one Message-ID per event ---------------------------------------------------------------


FILL = {
    "id": "fill-42",
    "ts": 1700000000.25,
    "subject": "filled",
    "body": "b",
    "data": {"px": 1.5},
    "strategy": "s",
}


def _mid(ev: Event, **kw: Any) -> str:
    return str(parse(compose(ev, **kw).data)["Message-ID"])


def test_the_same_event_keeps_its_message_id() -> None:
    fields = FILL
    first = _mid(event(**fields))
    # a retry (other attempts, other DELAYED subject) or a duplicate copy of the same event
    again = event(**fields).with_meta(attempts=3, last_error="451", first_seen=1700000001.0)
    assert _mid(again, subject="[DELAYED 5m] filled") == first
    assert _mid(event(**fields)) == first
    assert "fill-42" in first
    assert re.fullmatch(r"<[!-~]+@example\.com>", first)


@pytest.mark.parametrize(
    "change",
    [
        {"ts": 1700086400.25},
        {"subject": "filled again"},
        {"body": "other"},
        {"data": {"px": 1.6}},
        {"strategy": "t"},
        {"severity": "critical"},
    ],
)
def test_a_new_event_reusing_an_id_gets_a_new_message_id(change: dict[str, Any]) -> None:
    fields = FILL
    assert _mid(event(**fields)) != _mid(event(**(fields | change)))


def test_digest_message_ids_follow_their_events() -> None:
    composer = Composer(mail_from=FROM)

    def mid(evs: list[tuple[str, Event]]) -> str:
        return str(parse(composer.compose_digest(evs, recipients=TO).data)["Message-ID"])

    a = [("a1", event(subject="x", ts=1.0)), ("a2", event(subject="y", ts=2.0))]
    assert mid(a) == mid(list(a))
    reused = [("a1", event(subject="x", ts=86401.0)), ("a2", event(subject="y", ts=86402.0))]
    assert mid(reused) != mid(a)
    other_second = [a[0], ("b2", event(subject="y", ts=2.0))]
    assert mid(other_second) != mid(a)


# -- end to end through aiosmtpd ---------------------------------------------------------------


async def test_subjects_and_message_ids_end_to_end(make_rig, smtp_server, redis_url) -> None:
    rig = make_rig(smtp_server)
    names = list(SUBJECTS)
    await rig.deliver(*(rig.event(f"s{i}", subject=SUBJECTS[n]) for i, n in enumerate(names)))
    received = smtp_server.wait_for(len(names), 5)
    by_id = {str(parse(m.data)["X-Notifier-Event-Id"]): parse(m.data) for m in received}
    for i, name in enumerate(names):
        msg = by_id[f"s{i}"]
        assert msg["Subject"] == SUBJECTS[name], name
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["X-Auto-Response-Suppress"] == "All"
    for m in received:
        assert max(len(line) for line in m.data.split(b"\r\n")) <= 998
    # The sent mark expires and the id is used again by a new event: a new Message-ID.
    await rig.redis.delete(KEYS.sent("s0"))
    smtp_server.clear()
    await rig.deliver(rig.event("s0", subject="a new event, same id", ts=rig.now() + 86400))
    (again,) = smtp_server.wait_for(1, 5)
    assert parse(again.data)["Message-ID"] != by_id["s0"]["Message-ID"]


@pytest.mark.parametrize("text", ["=?utf-8?q?x=20y?=", "a.=?x?b?eA==?="])
def test_ids_that_look_like_encoded_words_are_hashed_in_message_ids(text: str) -> None:
    """A dot-atom may hold ``=?...?=``, which email's msg-id parser decodes: such an id or
    strategy is hashed in Message-ID and In-Reply-To, like any id that is not a dot-atom."""
    parsed = parse(compose(event(id=text, subject="s", strategy=text), event_id=text).data)
    for name in ("Message-ID", "In-Reply-To", "References"):
        raw = next(v for k, v in parsed.raw_items() if k == name)
        assert "=?" not in raw and str(parsed[name]) == raw.strip(), name
    assert parsed["X-Notifier-Strategy"] == text


@pytest.mark.parametrize("name", ["=?  \\", "=?utf-8?q?evil?=", "a  b", "=?x?= y"])
def test_a_sender_name_with_encoded_word_marks_reads_back_exactly(name):
    """Found by the differential property test in CI: a display name holding "=?" and a run
    of spaces came back with one space (parsers collapse spaces inside encoded words)."""
    from worker.compose import _address_header

    header = _address_header("From", name, "0@0.com")
    parsed = email.message_from_bytes((header + "\r\n\r\n").encode(), policy=email.policy.default)
    assert parsed["From"].addresses[0].display_name == name
    assert not parsed["From"].defects
