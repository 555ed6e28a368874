"""The wire contract: names, ids, subjects, frames, bus payloads, schemas."""

from __future__ import annotations

import json

import pytest

from proto import subjects
from proto.bus import parse_bus_chat
from proto.errors import ErrorCode
from proto.frames import Chat, FrameError, Join, parse_client_frame
from proto.ids import id_time, is_id, new_id
from proto.names import InvalidNameError, check_name, sanitize_user
from proto.schemagen import SCHEMA_DIR, render, schemas

BAD_NAMES = [
    "",
    "a.b",
    "*",
    ">",
    "room*",
    "a b",
    "tab\there",
    "new\nline",
    "nul\x00",
    "x" * 65,
    "caf\u00e9",
    "\u0430dmin",  # Cyrillic a: a look-alike
    "full\uff0ewidth",
    "room\u200b",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_never_become_subjects(name: str) -> None:
    with pytest.raises(InvalidNameError):
        check_name(name)
    with pytest.raises(InvalidNameError):
        subjects.room_message(name)
    assert subjects.parse_room_message(f"room.{name}.message") is None


@pytest.mark.parametrize("name", ["general", "a", "A-b_9", "x" * 64])
def test_good_names_round_trip_through_subjects(name: str) -> None:
    assert subjects.parse_room_message(subjects.room_message(name)) == name
    assert subjects.parse_svc_history(subjects.svc_history(name)) == name
    assert subjects.parse_room_presence(subjects.room_presence(name)) == name


def test_event_types_are_dotted_names() -> None:
    assert subjects.event("order.created") == "event.order.created"
    assert subjects.parse_event("event.order.created") == "order.created"
    for bad in ("order..created", "order.*", ">", "", ".x"):
        with pytest.raises(InvalidNameError):
            subjects.event(bad)


def test_ids_are_unique_and_time_sortable() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(is_id(i) for i in ids)
    assert ids == sorted(ids)
    assert id_time(ids[0]).tzinfo is not None
    assert not is_id("not-an-id") and not is_id("8" + ids[0][1:])


def test_sanitized_user_names_are_valid_tokens() -> None:
    assert sanitize_user("Alice Smith") == "Alice_Smith"
    assert sanitize_user("a.b>c*") == "a_b_c_"
    assert sanitize_user("...") is None
    assert sanitize_user("x" * 100) == "x" * 64


def _err(raw: str | bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        parse_client_frame(raw)
    return info.value


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("nope", ErrorCode.BAD_FRAME),
        ("[1,2]", ErrorCode.BAD_FRAME),
        ('{"type":"fly","data":{}}', ErrorCode.UNKNOWN_TYPE),
        ('{"data":{}}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"join","data":{}}', ErrorCode.INVALID),
        ('{"type":"join","data":{"room":5}}', ErrorCode.INVALID),
        ('{"type":"join","data":{"room":"a.b"}}', ErrorCode.BAD_NAME),
        ('{"type":"join","data":{"room":"g","since":"zzz"}}', ErrorCode.BAD_CURSOR),
        ('{"type":"chat.message","data":{"text":""}}', ErrorCode.INVALID),
        ('{"type":"chat.message","data":{"text":"' + "x" * 4001 + '"}}', ErrorCode.TEXT_TOO_LONG),
        ('{"type":"history","data":{"room":"g","limit":101}}', ErrorCode.INVALID),
        ('{"type":"history","data":{"room":"g","limit":0}}', ErrorCode.INVALID),
    ],
)
def test_bad_frames_get_their_documented_code(raw: str, code: ErrorCode) -> None:
    assert _err(raw).code is code


def test_good_frames_parse_and_ignore_unknown_fields() -> None:
    frame = parse_client_frame('{"type":"join","data":{"room":"general","future":1}}')
    assert isinstance(frame, Join) and frame.data.room == "general"
    frame = parse_client_frame('{"type":"chat.message","data":{"text":"hi"}}')
    assert isinstance(frame, Chat) and frame.data.room is None


def test_hand_published_bus_payload_gets_id_and_ts() -> None:
    msg = parse_bus_chat(b'{"user":"ops","text":"hi"}', "general")
    assert is_id(msg.id) and msg.room == "general" and msg.ts.tzinfo is not None
    kept = parse_bus_chat(json.dumps({"id": msg.id, "user": "ops", "text": "x"}).encode(), "g")
    assert kept.id == msg.id


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"text":"no user"}',
        b'{"user":"a.b","text":"x"}',
        b'{"user":"ops","text":""}',
        b'{"user":"ops","text":"x","room":"other"}',
        b'{"user":"ops","text":"x","id":"bad"}',
    ],
)
def test_malformed_bus_payloads_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_bus_chat(payload, "general")


def test_committed_json_schemas_match_the_models() -> None:
    for name, schema in schemas().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{name} missing: run `make schemas`"
        assert path.read_text() == render(schema), f"{name} drifted: run `make schemas`"
