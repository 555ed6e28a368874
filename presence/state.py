"""Who is where: (room -> user -> gateways), and the join/leave transitions of a KV op."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Rooms:
    """Presence state folded from the bucket's entries (in revision order)."""

    rooms: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def put(self, room: str, user: str, gateway: str) -> Literal["join"] | None:
        users = self.rooms.setdefault(room, {})
        gateways = users.setdefault(user, set())
        first = not gateways
        gateways.add(gateway)
        return "join" if first else None

    def remove(self, room: str, user: str, gateway: str) -> Literal["leave"] | None:
        users = self.rooms.get(room)
        if users is None or user not in users:
            return None
        users[user].discard(gateway)
        if users[user]:
            return None
        del users[user]
        if not users:
            del self.rooms[room]
        return "leave"

    def members(self, room: str) -> list[str]:
        return sorted(self.rooms.get(room, {}))

    def count(self, room: str) -> int:
        return len(self.rooms.get(room, {}))
