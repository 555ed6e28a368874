"""Generate the committed JSON Schemas (``python -m proto.schemagen``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from .bus import BusChatInput, ChatMessage, DirectMessage, PresenceEvent
from .frames import ClientFrame
from .redis import RedisEnvelopeOut

SCHEMA_DIR = Path(__file__).parent / "schemas"


def schemas() -> dict[str, dict[str, Any]]:
    """Every public model's JSON Schema, by file name."""
    return {
        "client_frame.json": TypeAdapter(ClientFrame).json_schema(),
        "chat_message.json": ChatMessage.model_json_schema(),
        "bus_chat_input.json": BusChatInput.model_json_schema(),
        "presence_event.json": PresenceEvent.model_json_schema(),
        "direct_message.json": DirectMessage.model_json_schema(by_alias=True),
        "redis_envelope.json": RedisEnvelopeOut.model_json_schema(),
    }


def render(schema: dict[str, Any]) -> str:
    """The committed text of one schema."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, schema in schemas().items():
        (SCHEMA_DIR / name).write_text(render(schema))
        print(f"wrote {SCHEMA_DIR / name}")


if __name__ == "__main__":
    main()
