"""Neutral content (worker/content.py): what an alert says, before any channel renders it,
and the plain-text / markdown renderings and the byte-limit helper that IM channels reuse."""

from __future__ import annotations

import dataclasses
import json
import re
import time
import unicodedata
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from producer.event import Event, parse_event
from worker.content import (
    TRUNCATED,
    Alert,
    Digest,
    Thread,
    as_markdown,
    as_text,
    build_alert,
    build_digest,
    delayed_prefix,
    digest_as_markdown,
    digest_as_text,
    escape_markdown,
    event_key,
    fit,
    format_value,
    is_critical,
    markdown_of,
    render_subject,
    repeated_note,
    text_of,
)


def event(**fields: Any) -> Event:
    return Event.model_validate(fields)


def local_ts(day: int, hour: int, minute: int = 0) -> float:
    return datetime(2026, 11, day, hour, minute).astimezone().timestamp()


def size(text: str) -> int:
    return len(text.encode("utf-8"))


FILL = event(
    id="fill-42",
    ts=local_ts(25, 9, 30),
    strategy="ma_cross",
    kind="fill",
    severity="warning",
    subject="成交 600519",
    body="价格跌破止损线\n第二行",
    data={"symbol": "600519.SH", "side": "buy", "price": 1700.5, "qty": 100, "dd": -0.0123},
)


# -- the alert ------------------------------------------------------------------------------


def test_alert_says_what_the_event_says() -> None:
    a = build_alert(FILL, event_id="fill-42")
    assert isinstance(a, Alert)
    assert a.event_id == "fill-42"
    assert a.subject == "成交 600519"
    assert (a.severity, a.strategy, a.kind) == ("warning", "ma_cross", "fill")
    assert a.severity_label == "WARNING"
    assert a.text == "价格跌破止损线\n第二行"
    assert a.notes == ()
    assert a.ts == FILL.ts
    assert a.produced is not None and a.produced.startswith("2026-11-25 09:30:00.000 ")
    assert a.key == event_key(FILL)
    assert a.locale == "en"


def test_alert_is_frozen() -> None:
    a = build_alert(FILL, event_id="fill-42")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.subject = "changed"  # type: ignore[misc]


def test_rows_keep_the_data_order_and_format_numbers() -> None:
    ev = event(
        data={
            "symbol": "600519.SH",
            "price": 1700.5,
            "qty": 100,
            "tiny": 0.000123,
            "dd": -0.0123,
            "big": 97250.0,
            "ok": True,
            "名称": "贵州茅台",
            "note": "two  spaces\nand a line",
        }
    )
    rows = build_alert(ev, event_id="e").rows
    assert rows == (
        ("symbol", "600519.SH"),
        ("price", "1700.50"),
        ("qty", "100"),
        ("tiny", "0.000123"),
        ("dd", "-0.0123"),
        ("big", "97250.00"),
        ("ok", "True"),
        ("名称", "贵州茅台"),
        ("note", "two spaces and a line"),
    )
    assert format_value(1700.5) == "1700.50" and format_value(0.5) == "0.5"
    assert build_alert(event(subject="s"), event_id="e").rows == ()


def test_subject_prefixes_critical_and_delayed() -> None:
    ev = event(subject="止损触发", severity="critical")
    assert build_alert(ev, event_id="e").subject == "[CRITICAL] 止损触发"
    late = build_alert(ev, event_id="e", delayed_s=192)
    assert late.subject == "[DELAYED 3m12s] [CRITICAL] 止损触发"
    zh = build_alert(ev, event_id="e", delayed_s=192, locale="zh")
    assert zh.subject == "[延迟 3分12秒] [CRITICAL] 止损触发"
    assert zh.locale == "zh"
    assert build_alert(ev, event_id="e", delayed_s=3 * 3600 + 5).subject.startswith(
        "[DELAYED 3h5s] "
    )
    assert delayed_prefix(192, "zh") == "[延迟 3分12秒]"


def test_subject_is_rendered_from_data_when_absent() -> None:
    ev = event(kind="signal", strategy="ma_cross", data={"symbol": "X", "side": "buy", "qty": 1})
    assert build_alert(ev, event_id="e").subject == render_subject(ev) == "[BUY] X 1 · ma_cross"


def test_subject_override_is_kept_as_given_and_still_marked_delayed() -> None:
    a = build_alert(FILL, event_id="e", subject="  given  as is ")
    assert a.subject == "  given  as is "
    assert build_alert(FILL, event_id="e", subject="x", delayed_s=61).subject == (
        "[DELAYED 1m1s] x"
    )


def test_notes_carry_the_repeated_note_in_both_locales() -> None:
    en = repeated_note(37, 1000.0, 1300.0)
    zh = repeated_note(37, 1000.0, 1300.0, "zh")
    assert en == "repeated 37× in 5 min"
    assert zh == "此前 5 分钟内重复 37 次（已合并）"
    a = build_alert(FILL, event_id="e", notes=[zh])
    assert a.notes == (zh,)


def test_thread_is_per_strategy_per_local_day() -> None:
    def thread(**fields: Any) -> Thread | None:
        return build_alert(event(subject="s", **fields), event_id="e").thread

    morning = thread(strategy="ma_cross", ts=local_ts(25, 9, 30))
    evening = thread(strategy="ma_cross", ts=local_ts(25, 23, 59))
    assert morning == evening == Thread("ma_cross", "20261125")
    assert morning is not None and morning.key == "ma_cross/20261125"
    assert thread(strategy="ma_cross", ts=local_ts(26, 0, 1)) == Thread("ma_cross", "20261126")
    assert thread(strategy="grid", ts=local_ts(25, 9)) == Thread("grid", "20261125")
    assert thread(ts=local_ts(25, 9)) == Thread("notifier", "20261125")


def test_an_event_without_ts_takes_the_day_from_now() -> None:
    a = build_alert(event(subject="s"), event_id="e", now=local_ts(3, 12))
    assert a.thread == Thread("notifier", "20261103")
    assert a.produced is None and a.ts is None


def test_key_ignores_meta_but_not_content() -> None:
    retried = FILL.with_meta(attempts=3, last_error="451")
    assert build_alert(retried, event_id="x").key == build_alert(FILL, event_id="y").key
    assert build_alert(FILL.model_copy(update={"body": "b"}), event_id="x").key != (
        build_alert(FILL, event_id="x").key
    )


# -- the digest -----------------------------------------------------------------------------


def items() -> list[tuple[str, Event]]:
    t = local_ts(25, 10)
    return [
        ("c", event(subject="third", kind="fill", strategy="grid", ts=t + 20)),
        ("a", event(subject="first", kind="signal", strategy="ma_cross", ts=t)),
        (
            "b",
            event(
                kind="signal", strategy="ma_cross", ts=t + 10, data={"side": "buy", "symbol": "X"}
            ),
        ),
    ]


def test_digest_rows_oldest_first_with_counts_in_the_subject() -> None:
    d = build_digest(items(), reason="qq: rate limit 20/min reached")
    assert isinstance(d, Digest)
    assert d.subject == "[DIGEST] 3 alerts: 2 signal, 1 fill · ma_cross, grid"
    assert d.reason == "qq: rate limit 20/min reached"
    assert d.count == 3
    assert [r.event_id for r in d.rows] == ["a", "b", "c"]
    assert [r.subject for r in d.rows] == ["first", "[BUY] X · ma_cross", "third"]
    assert [r.time for r in d.rows] == ["10:00:00", "10:00:10", "10:00:20"]
    assert [r.kind for r in d.rows] == ["signal", "signal", "fill"]
    assert d.rows[1].rows == (("side", "buy"), ("symbol", "X"))
    assert d.kinds == (("signal", 2), ("fill", 1))
    assert d.strategies == (("ma_cross", 2), ("grid", 1))
    assert d.thread is None  # two strategies: no single thread


def test_digest_of_one_strategy_threads_and_many_strategies_are_cut() -> None:
    t = local_ts(25, 10)
    one = build_digest([(f"e{i}", event(subject="s", strategy="s1", ts=t + i)) for i in range(3)])
    assert one.thread == Thread("s1", "20261125")
    assert one.subject == "[DIGEST] 3 alerts: 3 info · s1"
    many = build_digest(
        [(f"e{i}", event(subject="s", strategy=f"s{i}", ts=t + i)) for i in range(5)]
    )
    assert many.subject == "[DIGEST] 5 alerts: 5 info · s0, s1, s2 …"
    bare = build_digest([("e", event(subject="s"))])
    assert bare.subject == "[DIGEST] 1 alerts: 1 info"


# -- plain text -----------------------------------------------------------------------------


def test_as_text_layout() -> None:
    a = build_alert(FILL, event_id="fill-42", notes=["repeated 3× in 5 min"], delayed_s=75)
    lines = as_text(a).splitlines()
    assert lines[0] == "[DELAYED 1m15s] 成交 600519"
    assert lines[1] == "WARNING · fill · ma_cross"
    assert ">> repeated 3× in 5 min" in lines
    assert lines.index("价格跌破止损线") + 1 == lines.index("第二行")
    assert "symbol: 600519.SH" in lines and "price: 1700.50" in lines
    assert lines.index("symbol: 600519.SH") < lines.index("price: 1700.50")
    assert lines[-1].startswith("Produced 2026-11-25 09:30:00.000") and "event fill-42" in lines[-1]


def test_as_text_in_chinese_labels_and_exact_text() -> None:
    body = "止损：600519（贵州茅台）！*不是* _markdown_ [1](x)"
    a = build_alert(event(subject="止损", body=body, ts=local_ts(25, 9)), event_id="e", locale="zh")
    text = as_text(a)
    assert body in text  # plain text is never escaped
    assert "产生于 2026-11-25 09:00:00.000" in text and "事件 e" in text


def test_digest_as_text() -> None:
    d = build_digest(items(), reason="qq: rate limit 20/min reached")
    text = digest_as_text(d)
    lines = text.splitlines()
    assert lines[0] == d.subject
    assert lines[1] == "3 alerts (qq: rate limit 20/min reached), oldest first"
    assert [ln for ln in lines if ln.startswith("10:00:")] == [
        "10:00:00 INFO signal · ma_cross: first",
        "10:00:10 INFO signal · ma_cross: [BUY] X · ma_cross",
        "10:00:20 INFO fill · grid: third",
    ]


# -- markdown -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("*bold* and `code`", r"\*bold\* and \`code\`"),
        (
            "[link](http://x) [ref]: y [CRITICAL] [a][b]",
            r"[link\](http://x) [ref\]: y [CRITICAL] [a\][b]",
        ),
        ("<b>tag</b> & a|b ~s~", r"\<b>tag\</b> & a\|b \~s\~"),
        ("back\\slash", "back\\\\slash"),
        ("ma_cross_v2 stays", "ma_cross_v2 stays"),  # intraword _ is never emphasis
        ("_lead and trail_", r"\_lead and trail\_"),
        (
            "# not a heading\n- not a list\n+ x\n> not a quote\n1. not a list\n2) nor this",
            "\\# not a heading\n\\- not a list\n\\+ x\n\\> not a quote\n1\\. not a list\n2\\) nor this",
        ),
        ("price 1700.50 -0.02 (2%) #1 a>b", "price 1700.50 -0.02 (2%) #1 a>b"),
        ("&amp; stays text", r"\&amp; stays text"),
        (
            "止损触发【600519】（贵州茅台）！—— 价格：1700。",
            "止损触发【600519】（贵州茅台）！—— 价格：1700。",
        ),
        ("__init__ a__b", r"\_\_init\_\_ a\_\_b"),
    ],
)
def test_escape_markdown(text: str, escaped: str) -> None:
    assert escape_markdown(text) == escaped


def test_escape_markdown_after_other_text_on_the_line() -> None:
    assert escape_markdown("-0.02 # 1. x", line_start=False) == "-0.02 # 1. x"
    assert escape_markdown("a\n- b\n3. c", line_start=False) == "a\n\\- b\n3\\. c"
    assert escape_markdown("*x*", line_start=False) == r"\*x\*"


def test_as_markdown_layout_escapes_user_text_and_keeps_chinese_exact() -> None:
    ev = event(
        subject="止损 *600519*",
        strategy="ma_cross",
        kind="order",
        severity="critical",
        body="第一行 [x]\n第二行",
        data={"名称": "贵州茅台", "a_b": "<i>", "symbol": "600519.SH", "pnl": -0.0123, "n": "1. x"},
        ts=local_ts(25, 9),
    )
    md = as_markdown(build_alert(ev, event_id="e-1", notes=["此前 5 分钟内重复 3 次（已合并）"]))
    lines = md.split("\n")
    assert lines[0] == r"**[CRITICAL] 止损 \*600519\***"
    assert lines[1] == ""  # paragraphs: every renderer breaks the line there
    assert lines[2] == "**CRITICAL** · order · ma_cross"
    assert "> 此前 5 分钟内重复 3 次（已合并）" in lines
    assert "第一行 [x]  " in lines and "第二行" in lines  # a hard break between lines
    assert "**名称**: 贵州茅台  " in lines
    assert r"**a_b**: \<i>  " in lines
    # mid-line, what would start a list or heading at a line start is left as it is
    assert "**symbol**: 600519.SH  " in lines and "**pnl**: -0.0123  " in lines
    assert "**n**: 1. x" in lines
    assert lines[-1] == "Produced 2026-11-25 09:00:00.000 " + ev_offset(ev) + " · event e-1"


def ev_offset(ev: Event) -> str:
    assert ev.ts is not None
    return datetime.fromtimestamp(ev.ts).astimezone().strftime("%z")


def test_digest_as_markdown() -> None:
    md = digest_as_markdown(build_digest(items(), reason="qq: rate limit 20/min reached"))
    lines = md.split("\n")
    assert lines[0] == "**[DIGEST] 3 alerts: 2 signal, 1 fill · ma_cross, grid**"
    assert lines[2] == "3 alerts (qq: rate limit 20/min reached), oldest first"
    assert "- 10:00:10 INFO signal · ma_cross: [BUY] X · ma_cross" in lines


# -- fit: byte limits -----------------------------------------------------------------------


def test_fit_leaves_short_text_alone() -> None:
    assert fit("止损", 6) == "止损"
    assert fit("", 0) == ""


def test_fit_cuts_cjk_on_character_boundaries() -> None:
    text = "止损触发" * 10  # 3 bytes a character
    for limit in range(size(TRUNCATED), size(text)):
        out = fit(text, limit)
        assert size(out) <= limit
        assert out.endswith(TRUNCATED)
        kept = out.removesuffix(TRUNCATED)
        assert text.startswith(kept)
        assert size(kept) + size(TRUNCATED) > limit - 3  # as much as fits, whole characters


def test_fit_never_splits_an_emoji_or_a_joined_sequence() -> None:
    family = "👨\u200d👩\u200d👧"
    text = "ok " + family + " 🚀🚀🚀 " + "e\u0301" * 5 + " 🇨🇳🇺🇸🇯🇵 👍🏽👍🏽 ❤️❤️"
    for limit in range(size(TRUNCATED), size(text)):
        kept = fit(text, limit).removesuffix(TRUNCATED)
        assert size(kept) + size(TRUNCATED) <= limit
        assert text.startswith(kept)
        rest = text[len(kept) :]
        assert not kept.endswith("\u200d")
        flags = len(kept) - len(kept.rstrip("🇦🇧🇨🇩🇪🇫🇬🇭🇮🇯🇰🇱🇲🇳🇴🇵🇶🇷🇸🇹🇺🇻🇼🇽🇾🇿"))
        assert flags % 2 == 0, (limit, kept)  # a flag is two regional indicators
        assert not rest.startswith(("\U0001f3fd", "\ufe0f")), limit  # skin tone, emoji style
        assert not (rest and (unicodedata.combining(rest[0]) or rest[0] == "\u200d")), limit


def test_fit_with_a_marker_longer_than_the_limit_still_keeps_the_limit() -> None:
    out = fit("止损触发止损触发", 5, marker="…（已截断）")
    assert size(out) <= 5
    assert fit("abcdef", 3, marker="") == "abc"
    with pytest.raises(ValueError, match="max_bytes"):
        fit("x", -1)


@given(
    st.text(max_size=200),
    st.integers(min_value=0, max_value=400),
    st.sampled_from(["", "…", TRUNCATED]),
)
def test_fit_property(text: str, limit: int, marker: str) -> None:
    out = fit(text, limit, marker=marker)
    out.encode("utf-8")  # never a lone surrogate half
    assert size(out) <= limit
    if size(text) <= limit:
        assert out == text
    elif size(marker) <= limit:
        assert out.endswith(marker) and text.startswith(out[: len(out) - len(marker)])


def test_as_text_and_markdown_fit_a_limit_keeping_subject_and_marker() -> None:
    ev = event(subject="止损触发 600519", body="价格跌破止损线 [x] *y*\n" * 400, data={"k": "v"})
    a = build_alert(ev, event_id="e")
    for render in (as_text, as_markdown):
        full = render(a)
        assert size(full) > 2048
        out = render(a, max_bytes=2048)
        assert size(out) <= 2048
        assert size(out) > 1500  # the body is cut, not the whole message dropped
        assert "止损触发 600519" in out.split("\n")[0]
        assert TRUNCATED in out
        assert "k" in out  # the data rows after the cut body survive
        assert not re.search(r"(?<!\\)(?:\\\\)*\\…", out)  # no escape left dangling
    zh = build_alert(ev, event_id="e", locale="zh")
    assert "…（已截断）" in as_text(zh, max_bytes=1000)


def test_digest_text_fits_a_limit_by_dropping_rows() -> None:
    t = local_ts(25, 10)
    many = [(f"e{i}", event(subject=f"信号 {i}", strategy="s", ts=t + i)) for i in range(200)]
    d = build_digest(many)
    for render in (digest_as_text, digest_as_markdown):
        out = render(d, max_bytes=2000)
        assert size(out) <= 2000
        assert out.split("\n")[0].endswith(d.subject) or d.subject in out.split("\n")[0]
        m = re.search(r"(\d+) more", out)
        assert m is not None, out[-200:]
        shown = sum(1 for line in out.split("\n") if "信号" in line)
        assert shown + int(m.group(1)) == 200


def test_building_an_alert_is_cheap() -> None:
    start = time.perf_counter()
    for _ in range(200):
        build_alert(FILL, event_id="fill-42")
    assert (time.perf_counter() - start) / 200 < 0.001


def test_channels_render_alerts_and_digests_through_one_helper_each():
    info = parse_event(json.dumps({"id": "a", "subject": "开仓 600519", "ts": 1796100000}))
    crit = parse_event(json.dumps({"id": "b", "subject": "断线", "severity": "critical"}))
    alert = build_alert(info, event_id="a")
    digest = build_digest([("a", info), ("b", crit)], reason="qq: rate limit 20/min reached")
    assert text_of(alert) == as_text(alert) and markdown_of(alert) == as_markdown(alert)
    assert text_of(digest, max_bytes=200) == digest_as_text(digest, max_bytes=200)
    assert markdown_of(digest) == digest_as_markdown(digest)
    assert not is_critical(alert)
    assert is_critical(build_alert(crit, event_id="b")) and is_critical(digest)
    assert not is_critical(build_digest([("a", info)]))
