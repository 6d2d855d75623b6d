"""Event -> e-mail (worker/compose.py + worker/templates/), checked on the bytes as sent."""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
import time
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from producer.event import MAX_SUBJECT_CHARS, Event
from worker.compose import Composer, message_id, render_subject
from worker.content import build_alert, build_digest
from worker.mailer import message_bytes

FROM = "量化提醒 <alerts@example.com>"


def event(**fields: object) -> Event:
    return Event.model_validate(fields)


def sent(
    ev: Event,
    *,
    composer: Composer | None = None,
    recipients: tuple[str, ...] = ("trader@example.com",),
    event_id: str | None = None,
) -> tuple[bytes, EmailMessage]:
    """Compose, flatten as the mailer does, and parse back as a mail client would."""
    composer = composer or Composer(mail_from=FROM)
    msg = composer.compose(ev, event_id=event_id or ev.id or "evt-1", recipients=list(recipients))
    raw = message_bytes(msg)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return raw, parsed


def parts(msg: EmailMessage) -> tuple[str, str]:
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None and html is not None
    return plain.get_content(), html.get_content()


# -- headers -----------------------------------------------------------------------------------


def test_headers_of_a_chinese_event():
    ev = event(id="evt-1", subject="止损触发 600519", strategy="ma_cross", data={"price": 1700.5})
    before = time.time()
    raw, msg = sent(ev, recipients=("trader@example.com", "risk@example.com"))
    assert raw.isascii()  # 7-bit on the wire: RFC 2047 headers, base64 bodies
    assert b"=?utf-8?" in raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert msg["Subject"] == "止损触发 600519"
    (sender,) = msg["From"].addresses
    assert sender.display_name == "量化提醒"
    assert sender.addr_spec == "alerts@example.com"
    assert [a.addr_spec for a in msg["To"].addresses] == ["trader@example.com", "risk@example.com"]
    assert re.fullmatch(r"<[0-9a-f]{12}\.evt-1@example\.com>", msg["Message-ID"])
    assert msg["X-Notifier-Event-Id"] == "evt-1"
    assert msg["X-Notifier-Strategy"] == "ma_cross"
    assert msg["X-Notifier-Severity"] == "info"
    date = parsedate_to_datetime(msg["Date"])
    assert date.tzinfo is not None
    assert before - 2 <= date.timestamp() <= time.time() + 1


def test_from_without_display_name_is_notifier():
    _, msg = sent(event(subject="s"), composer=Composer(mail_from="alerts@example.com"))
    (sender,) = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("notifier", "alerts@example.com")


def test_from_display_name_with_specials_is_quoted():
    composer = Composer(mail_from='"Quant, Alerts" <alerts@example.com>')
    _, msg = sent(event(subject="s"), composer=composer)
    (sender,) = msg["From"].addresses
    assert sender.display_name == "Quant, Alerts"


@pytest.mark.parametrize("event_id", ["<a@b>", "a..b", "x@y", '"q"', "a.", "(c)"])
def test_message_id_is_hashed_when_the_id_is_not_a_dot_atom(event_id):
    _, msg = sent(event(id=event_id, subject="s"))
    digest = hashlib.sha256(event_id.encode()).hexdigest()[:32]
    assert re.fullmatch(rf"<[0-9a-f]{{12}}\.{digest}@example\.com>", msg["Message-ID"])
    assert msg["X-Notifier-Event-Id"] == f"{digest}@example.com"


@pytest.mark.parametrize("event_id", ["abc", "a.b.c", "order-42+fill", "0123456789abcdef" * 2])
def test_message_id_keeps_a_dot_atom_id(event_id):
    assert message_id(event_id, "example.com") == f"<{event_id}@example.com>"


def test_message_id_domain_falls_back_to_the_hostname():
    assert Composer(mail_from="alerts", hostname="host.test").domain == "host.test"


def test_subject_argument_overrides():
    _, msg = sent(event(subject="original"), composer=None)
    assert msg["Subject"] == "original"
    composer = Composer(mail_from=FROM)
    m = composer.compose(
        event(subject="x"),
        event_id="e",
        recipients=["a@example.com"],
        subject="replaced",
        extra_headers={"X-Test": "1"},
    )
    assert m["Subject"] == "replaced" and m["X-Test"] == "1"


# -- body parts -------------------------------------------------------------------------------


def test_multipart_alternative_plain_and_html():
    ev = event(
        id="evt-2",
        ts=1700000000,
        subject="止损触发",
        strategy="ma_cross",
        kind="order",
        body="价格跌破止损线\n第二行",
        data={"symbol": "600519.SH", "price": 1700.5, "qty": 100},
    )
    _, msg = sent(ev)
    assert msg.get_content_type() == "multipart/alternative"
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in msg.iter_parts())
    plain, html = parts(msg)
    for text in (plain, html):
        assert "价格跌破止损线" in text
        assert "600519.SH" in text
        assert "1700.50" in text
        assert "evt-2" in text
        assert "ma_cross" in text
        assert "order" in text
    assert "symbol: 600519.SH" in plain
    assert "price: 1700.50" in plain
    assert "qty: 100" in plain
    assert "<table" in html
    assert ">price</th>" in html and ">1700.50</td>" in html
    assert "Produced" in plain and "Produced" in html


def test_plain_text_layout():
    plain, _ = parts(sent(event(subject="s", strategy="st", body="hello", data={"a": 1}))[1])
    lines = plain.splitlines()
    assert lines[0] == "INFO · info · st"
    assert lines[1] == ""  # a blank line after the severity line
    assert lines[2] == "hello"
    assert "a: 1" in lines


@pytest.mark.parametrize("severity", ["info", "warning", "critical"])
def test_severity_visible_in_both_parts(severity):
    _, msg = sent(event(subject="s", severity=severity))
    plain, html = parts(msg)
    assert plain.startswith(severity.upper())
    assert f">{severity.upper()}</span>" in html
    assert msg["X-Notifier-Severity"] == severity


def test_html_is_escaped_and_plain_text_is_not():
    ev = event(
        subject="<b>subj</b>",
        strategy="<script>strategy()</script>",
        body="<script>alert('body')</script>",
        data={"<script>k</script>": "<script>alert('data')</script>", "amp": "a & b"},
    )
    _, msg = sent(ev)
    plain, html = parts(msg)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;body&#39;)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(&#39;data&#39;)&lt;/script&gt;" in html
    assert "&lt;script&gt;k&lt;/script&gt;" in html
    assert "&lt;script&gt;strategy()&lt;/script&gt;" in html
    assert "<title>&lt;b&gt;subj&lt;/b&gt;</title>" in html
    assert "a &amp; b" in html
    assert "<script>alert('body')</script>" in plain  # text is text
    assert "<script>alert('data')</script>" in plain


def test_no_header_injection_from_data_or_strategy():
    ev = event(data={"side": "buy", "symbol": "600519\r\nBcc: victim@example.com", "qty": 1})
    raw, msg = sent(ev)
    assert msg["Bcc"] is None
    assert b"\r\nBcc:" not in raw
    assert msg["Subject"] == "[BUY] 600519 Bcc: victim@example.com 1"


# -- rendered subjects ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "subject"),
    [
        (
            {
                "kind": "signal",
                "strategy": "ma_cross",
                "data": {"symbol": "600519.SH", "side": "buy", "price": 1700.5, "qty": 100},
            },
            "[BUY] 600519.SH 100 @ 1700.50 · ma_cross",
        ),
        (
            {"data": {"symbol": "BTC-USDT", "side": "SELL", "price": 97250.0, "qty": 0.05}},
            "[SELL] BTC-USDT 0.05 @ 97250.00",
        ),
        ({"data": {"symbol": "X", "side": "buy", "price": 0.000123}}, "[BUY] X @ 0.000123"),
        ({"data": {"symbol": "X", "side": "buy"}, "strategy": "s"}, "[BUY] X · s"),
        (
            {"kind": "error", "body": "\n  broker API timeout  \nstack...", "strategy": "grid"},
            "[ERROR] broker API timeout · grid",
        ),
        (
            {"data": {"pnl": 1.5, "dd": -0.02, "n": 3, "ok": True, "fifth": 5}},
            "[INFO] pnl=1.5, dd=-0.02, n=3, ok=True",
        ),
        (
            {"subject": "止损触发 600519", "strategy": "ignored when a subject is given"},
            "止损触发 600519",
        ),
    ],
)
def test_rendered_subjects(fields, subject):
    ev = event(**fields)
    assert render_subject(ev) == subject
    assert sent(ev)[1]["Subject"] == subject


def test_critical_prefix():
    ev = event(subject="止损触发", severity="critical")
    assert render_subject(ev) == "[CRITICAL] 止损触发"
    _, msg = sent(ev)
    assert msg["Subject"] == "[CRITICAL] 止损触发"
    assert msg["X-Priority"] == "1"
    assert msg["Importance"] == "high"
    rendered = event(severity="critical", data={"symbol": "X", "side": "sell", "qty": 1})
    assert render_subject(rendered) == "[CRITICAL] [SELL] X 1"


def test_critical_prefix_is_not_doubled():
    assert render_subject(event(subject="[critical] db down", severity="critical")) == (
        "[critical] db down"
    )


def test_warning_has_no_prefix_and_no_priority():
    ev = event(subject="slow fill", severity="warning")
    _, msg = sent(ev)
    assert msg["Subject"] == "slow fill"
    assert msg["X-Priority"] is None


def test_long_rendered_subject_is_cut_to_the_contract_limit():
    ev = event(body="x" * 5000)
    assert len(render_subject(ev)) == MAX_SUBJECT_CHARS
    assert sent(ev)[1]["Subject"] == render_subject(ev)


# -- template override -----------------------------------------------------------------------


def test_template_directory_overrides_file_by_file(tmp_path: Path):
    (tmp_path / "mail.txt.j2").write_text(
        "CUSTOM {{ severity_label }}: {{ subject }} [{{ id }}]\n"
        "{% for k, v in data %}{{ k }}={{ v | num }};{% endfor %}\n",
        encoding="utf-8",
    )
    composer = Composer(mail_from=FROM, template_dir=tmp_path)
    ev = event(subject="止损", data={"price": 1700.5})
    _, msg = sent(ev, composer=composer, event_id="e9")
    plain, html = parts(msg)
    assert plain.startswith("CUSTOM INFO: 止损 [e9]")
    assert "price=1700.50;" in plain
    assert "<table" in html  # the HTML template was not overridden: the packaged one


def test_overridden_html_template_is_still_autoescaped(tmp_path: Path):
    (tmp_path / "mail.html.j2").write_text("<p>{{ body }}</p>", encoding="utf-8")
    composer = Composer(mail_from=FROM, template_dir=tmp_path)
    _, msg = sent(event(body="<img src=x onerror=alert(1)>"), composer=composer)
    _, html = parts(msg)
    assert html.strip() == "<p>&lt;img src=x onerror=alert(1)&gt;</p>"


def test_from_display_name_keeps_its_spaces():
    composer = Composer(mail_from='"Quant  Desk" <alerts@example.com>')
    _, msg = sent(event(subject="s"), composer=composer)
    assert msg["From"].addresses[0].display_name == "Quant  Desk"


# -- rendered from the neutral content (worker/content.py) ------------------------------------

ALERTS = [
    {"id": "a1", "subject": "止损触发 600519", "strategy": "ma_cross", "ts": 1700000000.5},
    {
        "id": "a2",
        "severity": "critical",
        "kind": "fill",
        "body": "第一行\n第二行",
        "data": {"symbol": "600519.SH", "side": "buy", "price": 1700.5, "qty": 100},
    },
    {"id": "a<3>", "data": {"pnl": -0.0123, "ok": True}, "strategy": "均线 策略"},
]


@pytest.mark.parametrize("fields", ALERTS, ids=lambda f: f["id"])
def test_compose_is_render_mail_of_the_alert(fields: dict[str, object]) -> None:
    ev = event(**fields)
    composer = Composer(mail_from=FROM)
    kw = {"recipients": ["trader@example.com"], "sender": "备用 <b@example.com>"}
    notes = ["repeated 3× in 5 min"]
    composed = composer.compose(ev, event_id=str(fields["id"]), notes=notes, **kw)
    alert = build_alert(ev, event_id=str(fields["id"]), notes=notes)
    rendered = composer.render_mail(alert, **kw)
    assert rendered.draft == composed.draft
    assert rendered.subject == alert.subject == render_subject(ev)
    assert rendered.message_id == composed.message_id


def test_render_mail_shows_the_alerts_prefixes_and_notes() -> None:
    alert = build_alert(
        event(subject="止损", severity="critical", ts=1700000000),
        event_id="e1",
        delayed_s=192,
        notes=["此前 5 分钟内重复 37 次（已合并）"],
        locale="zh",
    )
    mail = Composer(mail_from=FROM).render_mail(alert, recipients=["t@example.com"])
    assert mail["Subject"] == "[延迟 3分12秒] [CRITICAL] 止损"
    plain, html = parts(mail.message())
    assert ">> 此前 5 分钟内重复 37 次（已合并）" in plain
    assert "此前 5 分钟内重复 37 次（已合并）</p>" in html


def test_compose_digest_is_render_digest_of_the_digest() -> None:
    items = [
        ("d2", event(subject="second", kind="fill", strategy="s", ts=1700000010)),
        ("d1", event(body="first\nline", strategy="s", ts=1700000000, data={"px": 1.5})),
    ]
    composer = Composer(mail_from=FROM)
    kw = {"recipients": ["trader@example.com"], "sender": None}
    composed = composer.compose_digest(items, reason="qq: rate limit 20/min reached", **kw)
    digest = build_digest(items, reason="qq: rate limit 20/min reached")
    rendered = composer.render_digest(digest, **kw)
    assert rendered.draft == composed.draft
    assert rendered.subject == digest.subject == "[DIGEST] 2 alerts: 1 info, 1 fill · s"
    plain, html = parts(rendered.message())
    assert "2 alerts in one mail (qq: rate limit 20/min reached)" in plain
    assert plain.index("(event d1)") < plain.index("(event d2)")
    assert "px: 1.50" in plain and "px=1.50" in html


def test_templates_can_read_the_alert_and_the_event(tmp_path: Path) -> None:
    (tmp_path / "mail.txt.j2").write_text(
        "{{ alert.subject }}|{{ alert.thread.key }}|{{ event.kind }}|"
        "{% for k, v in alert.rows %}{{ k }}={{ v }};{% endfor %}\n",
        encoding="utf-8",
    )
    composer = Composer(mail_from=FROM, template_dir=tmp_path)
    ev = event(subject="止损", kind="fill", strategy="s", ts=1700000000, data={"px": 1.5})
    plain, _ = parts(sent(ev, composer=composer)[1])
    day = time.strftime("%Y%m%d", time.localtime(1700000000))
    assert plain.strip() == f"止损|s/{day}|fill|px=1.50;"


def test_the_words_live_in_content_and_compose_re_exports_them() -> None:
    from worker import compose, content

    for name in ("render_subject", "delayed_prefix", "format_delay", "repeated_note", "event_key"):
        assert getattr(compose, name) is getattr(content, name), name
    source = Path(compose.__file__).read_text(encoding="utf-8")
    assert "fmt: skip" not in source
