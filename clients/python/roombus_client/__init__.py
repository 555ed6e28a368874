"""roombus_client: a Python client for roombus that never loses a message.

``async with Client(urls, user=...) as c``, ``room = await c.join("general")``,
``async for msg in room`` (each stored message once, in stream order, across reconnects;
:class:`NotRecovered` where the gateway could not replay), ``await room.send(text)`` (the ack,
resent with the same ``client_id`` until stored). asyncio only: from synchronous code use
``asyncio.run``.
"""

from .client import Client
from .errors import (
    ClientClosed,
    NotRecovered,
    RequestFailed,
    RoombusError,
    SendRefused,
    SendTimeout,
    Unauthorized,
)
from .room import Room
from .types import Ack, ChatMessage, DirectMessage, Event, Joined, Presence, PresenceChange, Typing

__all__ = [
    "Ack",
    "ChatMessage",
    "Client",
    "ClientClosed",
    "DirectMessage",
    "Event",
    "Joined",
    "NotRecovered",
    "Presence",
    "PresenceChange",
    "RequestFailed",
    "Room",
    "RoombusError",
    "SendRefused",
    "SendTimeout",
    "Typing",
    "Unauthorized",
]
