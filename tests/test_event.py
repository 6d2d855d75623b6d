"""The wire contract (producer/event.py): defaults, limits, time stamps, parse_event reasons."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from producer.event import (
    MAX_EVENT_BYTES,
    MAX_RECIPIENTS,
    MAX_SUBJECT_CHARS,
    Event,
    InvalidEvent,
    event_from_dict,
    new_event_id,
    parse_event,
    valid_address,
)


def parse(obj: object) -> Event:
    return parse_event(json.dumps(obj, ensure_ascii=False).encode())


def reason(obj: object) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse(obj)
    assert info.value.reason == str(info.value)
    assert "\n" not in info.value.reason
    return info.value.reason


# -- defaults and round trip ---------------------------------------------------------------


def test_defaults_of_a_minimal_event():
    event = parse({"subject": "止损触发 600519"})
    assert event.v == 1
    assert event.id is None
    assert event.ts is None
    assert event.kind == "info"
    assert event.severity == "info"
    assert event.strategy is None
    assert event.body is None
    assert event.data is None
    assert event.to is None
    assert event.meta is None
    assert event.attempts == 0


def test_the_issue_example_parses():
    raw = '{"subject":"止损触发 600519","strategy":"ma_cross","data":{"price":1700.5}}'
    event = parse_event(raw.encode())
    assert event.subject == "止损触发 600519"
    assert event.strategy == "ma_cross"
    assert event.data == {"price": 1700.5}


def test_to_json_round_trips_and_stays_utf8():
    event = parse(
        {
            "id": "evt-1",
            "ts": 1700000000.25,
            "strategy": "ma_cross",
            "kind": "signal",
            "severity": "warning",
            "subject": "止损",
            "body": "line 1\nline 2\twith tab",
            "data": {"price": 1700.5, "qty": 100, "ok": True, "note": None, "sym": "600519.SH"},
            "to": ["A@Example.com"],
        }
    )
    text = event.to_json()
    assert "止损" in text  # not ASCII-escaped
    obj = json.loads(text)
    assert "_meta" not in obj and "meta" not in obj  # unset fields are left out
    assert obj["data"]["note"] is None  # but a null data value is kept
    again = parse_event(text.encode())
    assert again == event
    assert again.to == ["a@example.com"]


@pytest.mark.parametrize("content", [{"subject": "s"}, {"body": "b"}, {"data": {"k": 1}}])
def test_any_one_of_subject_body_data_is_enough(content):
    assert parse(content)


@pytest.mark.parametrize("obj", [{}, {"strategy": "x"}, {"data": {}}, {"kind": "fill"}])
def test_an_event_needs_content(obj):
    assert "at least one of subject, body, data" in reason(obj)


def test_unknown_fields_are_ignored():
    event = parse({"subject": "s", "future_field": {"nested": [1, 2]}, "priority": 9})
    assert event.subject == "s"
    assert "future_field" not in event.to_json()


def test_meta_is_read_and_written_under_its_alias():
    event = parse({"subject": "s", "_meta": {"attempts": 3, "last_error": "451 busy"}})
    assert event.meta is not None
    assert event.attempts == 3
    assert event.meta.last_error == "451 busy"
    later = event.with_meta(attempts=4, first_seen=1700000000.0)
    assert later.attempts == 4
    assert later.meta is not None and later.meta.last_error == "451 busy"
    text = later.to_json()
    assert json.loads(text)["_meta"]["attempts"] == 4
    assert parse_event(text.encode()).attempts == 4


def test_meta_with_wrong_types_is_rejected():
    assert reason({"subject": "s", "_meta": {"attempts": -1}}).startswith("_meta.attempts")


# -- version, id ---------------------------------------------------------------------------


@pytest.mark.parametrize("v", [0, 2, 99])
def test_other_contract_versions_are_rejected(v):
    text = reason({"v": v, "subject": "s"})
    assert text.startswith("v: ")
    assert f"contract version {v} is not supported" in text


def test_version_must_be_an_integer():
    assert reason({"v": "1", "subject": "s"}).startswith("v: ")


@pytest.mark.parametrize("event_id", ["a", "x" * 128, "strategy.ma_cross:2026-01-01#7", "<a@b>"])
def test_valid_ids(event_id):
    assert parse({"id": event_id, "subject": "s"}).id == event_id


@pytest.mark.parametrize("event_id", ["", "x" * 129, "has space", "tab\there", "中文", "a\nb"])
def test_invalid_ids(event_id):
    text = reason({"id": event_id, "subject": "s"})
    assert text.startswith("id: ")
    assert "printable ASCII" in text


def test_id_must_be_a_string():
    assert reason({"id": 42, "subject": "s"}).startswith("id: ")


def test_new_event_id_is_unique_hex():
    ids = {new_event_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(parse({"id": i, "subject": "s"}).id == i for i in list(ids)[:3])


# -- ts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ts", [1700000000, 1700000000.125, 0])
def test_ts_as_unix_seconds(ts):
    assert parse({"ts": ts, "subject": "s"}).ts == float(ts)


def test_ts_as_iso8601_with_offset():
    event = parse({"ts": "2026-11-25T09:30:00+08:00", "subject": "s"})
    expected = datetime(2026, 11, 25, 1, 30, tzinfo=UTC).timestamp()
    assert event.ts == expected


def test_ts_as_iso8601_utc_z():
    event = parse({"ts": "2026-11-25T01:30:00Z", "subject": "s"})
    assert event.ts == datetime(2026, 11, 25, 1, 30, tzinfo=UTC).timestamp()


def test_ts_as_naive_iso8601_is_local_time():
    event = parse({"ts": "2026-11-25T09:30:00.500", "subject": "s"})
    expected = datetime(2026, 11, 25, 9, 30, 0, 500000).astimezone().timestamp()
    assert event.ts == pytest.approx(expected)


def test_ts_offsets_differ_by_the_offset():
    a = parse({"ts": "2026-11-25T09:30:00+08:00", "subject": "s"}).ts
    b = parse({"ts": "2026-11-25T09:30:00+00:00", "subject": "s"}).ts
    assert a is not None and b is not None
    assert b - a == timedelta(hours=8).total_seconds()


@pytest.mark.parametrize(
    ("ts", "words"),
    [
        ("yesterday", "ISO-8601"),
        (True, "not a boolean"),
        (-5, "positive"),
        ([1], "unix seconds"),
        ({"t": 1}, "unix seconds"),
    ],
)
def test_invalid_ts(ts, words):
    text = reason({"ts": ts, "subject": "s"})
    assert text.startswith("ts: ")
    assert words in text


# -- subject and single-line fields ----------------------------------------------------------


def test_subject_limit_is_256_characters():
    assert parse({"subject": "止" * MAX_SUBJECT_CHARS}).subject == "止" * 256
    text = reason({"subject": "止" * (MAX_SUBJECT_CHARS + 1)})
    assert text.startswith("subject: ")
    assert "256" in text


@pytest.mark.parametrize("subject", ["a\r\nBcc: victim@example.com", "a\nb", "a\rb", "a\x00b"])
def test_subject_must_be_one_line(subject):
    text = reason({"subject": subject})
    assert text.startswith("subject: ")
    assert "single line" in text


@pytest.mark.parametrize("field", ["strategy", "kind"])
def test_strategy_and_kind_are_single_line(field):
    assert reason({"subject": "s", field: "a\nb"}).startswith(f"{field}: ")


def test_body_may_have_newlines_and_tabs_but_not_other_controls():
    assert parse({"body": "a\nb\r\n\tc"}).body == "a\nb\r\n\tc"
    assert reason({"body": "bell\x07"}).startswith("body: ")


@pytest.mark.parametrize("severity", ["info", "warning", "critical"])
def test_severities(severity):
    assert parse({"subject": "s", "severity": severity}).severity == severity


def test_unknown_severity_is_rejected():
    text = reason({"subject": "s", "severity": "fatal"})
    assert text.startswith("severity: ")
    assert "critical" in text


# -- to --------------------------------------------------------------------------------------


def test_to_accepts_fifty_addresses_lowercased_and_deduplicated():
    many = [f"user{i}@example.com" for i in range(MAX_RECIPIENTS)]
    assert parse({"subject": "s", "to": many}).to == many
    event = parse({"subject": "s", "to": ["Trader@Example.COM", "trader@example.com"]})
    assert event.to == ["trader@example.com"]


def test_to_more_than_fifty_is_rejected():
    many = [f"user{i}@example.com" for i in range(MAX_RECIPIENTS + 1)]
    text = reason({"subject": "s", "to": many})
    assert text.startswith("to: ")
    assert "50" in text


@pytest.mark.parametrize(
    "address",
    ["not-an-address", "a@b", "Name <a@example.com>", "a@@example.com", "a b@example.com",
     "<a@example.com>", "a@example.com\r\nBcc: x@example.com", "用户@example.com"],
)  # fmt: skip
def test_to_invalid_addresses_are_named(address):
    text = reason({"subject": "s", "to": [address]})
    assert text.startswith("to: ")
    assert "is not a plain address like name@example.com" in text


def test_to_empty_list_and_wrong_type():
    assert reason({"subject": "s", "to": []}).startswith("to: ")
    assert reason({"subject": "s", "to": "a@example.com"}).startswith("to: ")


def test_valid_address():
    assert valid_address("first.last+tag@sub.example.co")
    assert not valid_address("x" * 250 + "@example.com")
    assert not valid_address("a@example")


# -- data --------------------------------------------------------------------------------------


def test_data_accepts_flat_scalars():
    data = {"symbol": "600519.SH", "price": 1700.5, "qty": 100, "filled": False, "note": None}
    assert parse({"data": data}).data == data


@pytest.mark.parametrize(("value", "kind"), [({"b": 1}, "dict"), ([1, 2], "list"), ([], "list")])
def test_data_nested_values_are_rejected_with_a_readable_reason(value, kind):
    text = reason({"data": {"price": 1, "levels": value}})
    assert text.startswith("data: ")
    assert f"value of 'levels' is a {kind}" in text
    assert "flat table" in text


def test_data_must_be_an_object():
    assert reason({"data": [1, 2]}).startswith("data")
    assert reason({"data": "x"}).startswith("data")


def test_data_keys_and_values_are_checked():
    assert "keys must be 1 to 64" in reason({"data": {"": 1}})
    assert "keys must be 1 to 64" in reason({"data": {"k" * 65: 1}})
    assert reason({"data": {"a\nb": 1}}).startswith("data: ")
    assert "control characters" in reason({"data": {"k": "esc\x1b[31m"}})
    assert "at most 100 fields" in reason({"data": {f"k{i}": i for i in range(101)}})


def test_data_infinity_is_rejected():
    # Python's json reads 1e400 as inf
    text = reason_raw(b'{"data":{"price":1e400}}')
    assert "value of 'price' must be a finite number" in text


# -- size and parse_event reasons --------------------------------------------------------------


def reason_raw(raw: bytes | str) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    return info.value.reason


def test_64_kib_limit():
    envelope = len(json.dumps({"body": ""}).encode())
    fits = {"body": "x" * (MAX_EVENT_BYTES - envelope)}
    assert len(json.dumps(fits).encode()) == MAX_EVENT_BYTES
    assert parse(fits).body
    over = {"body": "x" * (MAX_EVENT_BYTES - envelope + 1)}
    text = reason(over)
    assert text == f"event is {MAX_EVENT_BYTES + 1} bytes, the limit is {MAX_EVENT_BYTES} bytes"


def test_64_kib_limit_counts_utf8_bytes_not_characters():
    body = "止" * (MAX_EVENT_BYTES // 3)  # fewer than 64 Ki characters, more than 64 KiB
    assert len(json.dumps({"body": body}, ensure_ascii=False)) < MAX_EVENT_BYTES
    assert "limit is 65536 bytes" in reason({"body": body})


def test_parse_event_not_utf8():
    assert reason_raw(b'{"subject":"\xff\xfe"}') == "event is not valid UTF-8 (byte 12)"
    assert "UTF-8" in reason_raw("止损".encode("gbk"))


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"subject":', b"{'subject': 'x'}"])
def test_parse_event_not_json(raw):
    assert reason_raw(raw).startswith("event is not JSON: ")


@pytest.mark.parametrize(
    ("raw", "kind"), [(b"[1,2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")]
)
def test_parse_event_not_an_object(raw, kind):
    assert reason_raw(raw) == f"event must be a JSON object, got {kind}"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_parse_event_rejects_nan_and_infinity(constant):
    text = reason_raw(f'{{"data":{{"price":{constant}}}}}'.encode())
    assert text == f"event is not JSON: {constant} is not valid JSON"


def test_parse_event_accepts_str():
    assert parse_event('{"subject":"止损"}').subject == "止损"


def test_several_errors_are_joined_on_one_line():
    text = reason({"v": 2, "severity": "fatal", "subject": "a\nb"})
    assert text.count(";") >= 2
    assert "v: " in text and "severity: " in text and "subject: " in text


def test_event_from_dict_raises_invalid_event():
    with pytest.raises(InvalidEvent, match="at least one of"):
        event_from_dict({})
    assert event_from_dict({"subject": "s"}).subject == "s"


def test_event_is_immutable():
    event = parse({"subject": "s"})
    with pytest.raises(Exception, match="frozen"):
        event.subject = "changed"  # type: ignore[misc]
