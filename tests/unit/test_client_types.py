"""The Python client's own message types agree with the server's committed JSON Schemas."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from roombus_client import types as ct

SCHEMAS = Path(__file__).resolve().parents[2] / "proto" / "schemas"


def _schema(name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((SCHEMAS / f"{name}.json").read_text())
    return loaded


@pytest.mark.parametrize(
    ("cls", "schema"),
    [(ct.ChatMessage, "chat_message"), (ct.DirectMessage, "direct_message")],
)
def test_client_message_fields_are_the_schema_fields(cls: type, schema: str) -> None:
    s = _schema(schema)
    props = s["properties"]
    assert isinstance(props, dict)
    wire = ct.wire_names(cls)
    assert set(wire) == set(props), f"{cls.__name__} vs {schema}.json"
    required = set(s.get("required", []))  # type: ignore[call-overload]
    # What the schema requires the client parses without a default.
    by_wire = {f.metadata.get("wire", f.name): f for f in fields(cls)}
    for name in required:
        assert name in by_wire, name


def test_every_frame_the_client_sends_is_in_the_client_frame_schema() -> None:
    defs = _schema("client_frame")["$defs"]
    assert isinstance(defs, dict)
    frames = {}
    for d in defs.values():
        kind = d.get("properties", {}).get("type", {}).get("const")
        if kind:
            ref = d["properties"]["data"]["$ref"].rsplit("/", 1)[-1]
            frames[kind] = defs[ref]
    assert set(ct.OUTGOING) == set(frames)
    for kind, names in ct.OUTGOING.items():
        data = frames[kind]
        assert set(names) == set(data["properties"]), kind
        assert set(data.get("required", [])) <= set(names), kind


def test_a_stored_message_parses_and_ignores_unknown_fields() -> None:
    m = ct.ChatMessage.from_wire(
        {
            "id": "01",
            "room": "r",
            "user": "u",
            "text": "hi",
            "ts": "2026-11-28T15:28:55.375Z",
            "seq": 7,
            "prev": 3,
            "verified": True,
            "new_field": 1,
        }
    )
    assert (m.seq, m.prev, m.verified, m.ts.year) == (7, 3, True, 2026)
    dm = ct.DirectMessage.from_wire(
        {"id": "02", "from": "a", "to": "b", "text": "x", "ts": "2026-11-28T15:28:55Z"}
    )
    assert (dm.sender, dm.seq) == ("a", None)


def test_the_client_distribution_needs_only_websockets_pinned_as_the_server_pins_it() -> None:
    import subprocess
    import sys
    import tomllib

    root = SCHEMAS.parents[1]
    client = tomllib.loads((root / "clients/python/pyproject.toml").read_text())
    server = tomllib.loads((root / "pyproject.toml").read_text())
    pin = [d for d in server["project"]["dependencies"] if d.startswith("websockets")]
    assert client["project"]["dependencies"] == pin
    # Importing it loads none of the server's packages.
    probe = (
        "import sys, roombus_client; bad = {'litestar', 'nats', 'pydantic', 'proto', 'services'}"
        " & {m.partition('.')[0] for m in sys.modules}; print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "[]", out.stderr
