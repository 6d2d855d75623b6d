"""The hand-written MIME (worker/compose.py, :func:`mime_bytes`) against the standard library.

The worker writes mail bytes itself for speed. That is only allowed as long as, on random
input (CJK, emoji, C1 control characters, no-break and ideographic spaces, long lines and
words, text that looks like an encoded word ``=?...?=``), the mail it writes and one built
from the same :class:`Draft` with ``email.message.EmailMessage`` parse
(``email.parser``, ``policy=email.policy.default``) to the same headers and the same decoded
text, and the hand-written one is wire-clean: ASCII, CRLF only, lines of at most 998 octets,
unstructured header lines of at most 78, encoded words of at most 75 characters.

Where the standard library itself does not give the text back (it writes ``=?`` text
as is, so it is read back as an encoded word; it drops leading white space; folding, it
loses the spaces between encoded words), the hand-written mail must give back the
original; the test records such cases with ``hypothesis.event``. A display name too long
for one encoded word is checked as RFC 2047 6.2 reads it (white space between adjacent
encoded words ignored, as mail clients do): email's address parser adds a space there.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from producer.event import MAX_SUBJECT_CHARS, Event, InvalidEvent, event_from_dict
from worker.compose import AUTO_HEADERS, Composer, Draft, mime_bytes, render_subject

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENCODED_WORD = re.compile(rb"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
DATE = "Tue, 25 Nov 2025 20:00:00 +0800"

# -- what to write ----------------------------------------------------------------------------

# Characters a single-line field may hold (the contract refuses C0 controls, DEL, U+0085,
# U+2028/2029 and lone surrogates), weighted towards the ones that break writers.
TRICKY = [
    " ",
    "  ",
    "\u3000",
    "\xa0",
    "=?",
    "?=",
    "=?utf-8?q?x=20y?=",
    "=?gb2312?b?1tA=?=",
    "\x80",
    "\x9f",
    "止损",
    "触发",
    "贵州茅台",
    "🚀",
    "📉",
    "👨‍👩‍👧",
    "é",
    "ß",
    "\\",
    '"',
    ",",
    ";",
    ":",
    "<",
    ">",
    "@",
    "(",
    ")",
    "[",
    "]",
    ".",
    "=",
    "?",
    "_",
]
LINE_CHARS = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters="\x85\u2028\u2029\x7f",
    min_codepoint=0x20,
)
line_text = st.lists(
    st.one_of(
        st.sampled_from(TRICKY),
        st.text(LINE_CHARS, min_size=1, max_size=12),
        st.text(st.sampled_from("abcxyz"), min_size=60, max_size=120),
    ),
    max_size=40,
).map("".join)
subjects = line_text.map(lambda s: s[:MAX_SUBJECT_CHARS]).filter(lambda s: s.strip())
BREAKS = ["\n", "\r", "\r\n", "\t", "\n\n", "\r\r", "\n\r"]
bodies = st.lists(
    st.one_of(
        st.sampled_from(TRICKY),
        st.sampled_from(BREAKS),
        st.text(LINE_CHARS, max_size=30),
        st.text(st.sampled_from("ab "), min_size=200, max_size=1200),
    ),
    max_size=30,
).map("".join)
display_names = (
    st.lists(st.one_of(st.sampled_from(TRICKY), LINE_CHARS), min_size=1, max_size=20)
    .map(lambda parts: "".join(parts)[:40])
    .filter(lambda s: s == s.strip(" \xa0\u3000") and s.strip())
)
addresses = st.from_regex(
    r"[a-z0-9+_-]{1,20}(\.[a-z0-9+_-]{1,10})?@[a-z0-9-]{1,20}\.(com|cn|net)", fullmatch=True
)


ID_LEFT = st.from_regex(r"[a-z0-9-]{1,70}(\.[a-z0-9-]{1,70})?", fullmatch=True)
EVENT_IDS = st.one_of(
    st.from_regex(r"[!-~]{1,128}", fullmatch=True),
    st.sampled_from(["=?utf-8?q?a?=", "a.=?x?b?eA==?=", "fill-42", "<a@b>", "a..b"]),
)


@st.composite
def drafts(draw: st.DrawFn) -> Draft:
    headers = [("X-Notifier-Severity", draw(st.sampled_from(["info", "warning", "critical"])))]
    if draw(st.booleans()):
        headers.append(("X-Notifier-Strategy", draw(line_text.filter(lambda s: s.strip()))[:128]))
    root = f"<thread.{draw(st.from_regex(r'[a-z0-9_]{1,20}', fullmatch=True))}.20251125@x.cn>"
    headers += [("In-Reply-To", root), ("References", root)]
    return Draft(
        subject=draw(subjects),
        sender=(draw(display_names), draw(addresses)),
        recipients=tuple(draw(st.lists(addresses, min_size=1, max_size=50, unique=True))),
        message_id=f"<{draw(ID_LEFT)}@x.cn>",
        headers=tuple(headers),
        text=draw(bodies),
        html=f"<pre>{draw(bodies)}</pre>",
    )


# -- the reference and the checks -------------------------------------------------------------


def reference(draft: Draft) -> bytes:
    """The same mail built with the standard library (CRLF, base64 text parts)."""
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["Subject"] = draft.subject
    msg["From"] = Address(display_name=draft.sender[0], addr_spec=draft.sender[1])
    msg["To"] = ", ".join(draft.recipients)
    msg["Date"] = DATE
    msg["Message-ID"] = draft.message_id
    for name, value in (*draft.headers, *AUTO_HEADERS):
        msg[name] = value
    msg.set_content(draft.text, cte="base64")
    msg.add_alternative(draft.html, subtype="html", cte="base64")
    return msg.as_bytes()


def parse(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def assert_wire_clean(data: bytes) -> None:
    assert data.isascii()
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None, "a bare CR or LF on the wire"
    lines = data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    for word in ENCODED_WORD.findall(data):
        assert len(word) <= 75, word
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    name = b""
    for line in head:
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].lower()
        elif not line.strip():
            raise AssertionError("a folded header line holds only white space")
        if name in (b"subject", b"x-notifier-strategy", b"from"):
            assert len(line) <= 78, line


def decoded_words(raw: str) -> str:
    """The text of a run of base64 encoded words, white space between them ignored
    (RFC 2047 6.2), as a mail client reads a display name."""
    words = re.findall(r"=\?utf-8\?b\?([^?]*)\?=", raw)
    return b"".join(base64.b64decode(w) for w in words).decode("utf-8")


def assert_same_mail(draft: Draft, ours: bytes) -> None:
    assert_wire_clean(ours)
    mine, theirs = parse(ours), parse(reference(draft))
    assert not mine.defects
    expected = {
        "Subject": draft.subject,
        "Message-ID": draft.message_id,
        **{name: value for name, value in (*draft.headers, *AUTO_HEADERS)},
    }
    for name, value in expected.items():
        got, ref = str(mine[name]), str(theirs[name])
        assert not mine[name].defects, (name, mine[name].defects)
        if ref == value:
            assert got == ref, name  # the same as the standard library's
        else:
            event(f"the standard library loses {name}")
            assert got == value, name  # the original text where the stdlib loses it
    assert [a.addr_spec for a in mine["To"].addresses] == list(draft.recipients)
    assert mine["To"].addresses == theirs["To"].addresses
    (sender,), (ref_sender,) = mine["From"].addresses, theirs["From"].addresses
    assert sender.addr_spec == ref_sender.addr_spec == draft.sender[1]
    raw_from = next(v for k, v in mine.raw_items() if k == "From")
    words = raw_from.count("=?utf-8?b?")
    if words > 1:
        # A name longer than one encoded word: email's address parser puts a space between
        # adjacent encoded words, where RFC 2047 6.2 (and mail clients) ignore the white
        # space between them; so the name is checked as a mail client reads it.
        event("display name in several encoded words")
    elif ref_sender.display_name == draft.sender[0]:
        assert sender.display_name == ref_sender.display_name
    else:
        event("the standard library loses the display name")
    if words:  # what a mail client reads (RFC 2047)
        assert decoded_words(raw_from) == draft.sender[0]
    else:
        assert sender.display_name == draft.sender[0]
    assert mine.get_content_type() == theirs.get_content_type() == "multipart/alternative"
    for subtype in ("plain", "html"):
        part, ref_part = mine.get_body((subtype,)), theirs.get_body((subtype,))
        assert part is not None and ref_part is not None
        assert part.get_content_type() == ref_part.get_content_type()
        assert part.get_content_charset() == ref_part.get_content_charset() == "utf-8"
        assert part.get_content() == ref_part.get_content()  # CRLF lines in both
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        assert re.search(rb"\r(?!\n)|(?<!\r)\n", payload) is None


# -- the properties ---------------------------------------------------------------------------


@SETTINGS
@given(draft=drafts())
@example(
    draft=Draft(
        subject="=?utf-8?q?hi=0D=0ABcc:_victim@example.com?=",
        sender=("量化提醒", "alerts@example.com"),
        recipients=("trader@example.com",),
        message_id="<a@b.cn>",
        headers=(),
        text="a\rb\nc\r\n",
        html="",
    )
)
@example(
    draft=Draft(
        subject="  止损 \u3000 触发  " + "x" * 200,
        sender=('Quant "Desk", Alerts', "alerts@example.com"),
        recipients=tuple(f"u{i}@example.com" for i in range(50)),
        message_id="<" + "m" * 140 + "@b.cn>",
        headers=(("X-Notifier-Strategy", "策略" * 64),),
        text="line\r" * 300,
        html="x" * 5000,
    )
)
def test_hand_written_mime_reads_like_the_standard_library(draft: Draft) -> None:
    assert_same_mail(draft, mime_bytes(draft, date=DATE))


SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    bodies.map(lambda s: s[:200]),
)
fields = st.fixed_dictionaries(
    {"id": EVENT_IDS},
    optional={
        "subject": subjects,
        "body": bodies,
        "strategy": line_text.map(lambda s: s[:128]),
        "kind": st.sampled_from(["signal", "order", "fill", "error", "info", "止损"]),
        "severity": st.sampled_from(["info", "warning", "critical"]),
        "ts": st.floats(0, 4e9),
        "data": st.dictionaries(line_text.map(lambda s: s[:64]).filter(bool), SCALARS, max_size=8),
    },
)
COMPOSER = Composer(mail_from="量化提醒 <alerts@example.com>")


@SETTINGS
@given(fields=fields)
def test_composed_events_read_like_the_standard_library(fields: dict[str, Any]) -> None:
    try:
        ev: Event = event_from_dict(fields)
    except InvalidEvent:
        event("invalid event")
        return
    mail = COMPOSER.compose(ev, event_id=ev.id or "x", recipients=["trader@example.com"])
    assert mail.draft is not None
    assert mail.subject == render_subject(ev)
    if ev.subject and ev.subject.strip():
        assert ev.subject in mail.subject  # the event's own, whole
    # the Date of the reference is fixed; the rest must read the same
    ours = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: " + DATE.encode(), mail.data, count=1)
    assert_same_mail(mail.draft, ours)
    if ev.body:
        text = parse(mail.data).get_body(("plain",))
        assert text is not None
        canonical = "\r\n".join(re.split(r"\r\n|\r|\n", ev.body))
        assert canonical in text.get_content()
