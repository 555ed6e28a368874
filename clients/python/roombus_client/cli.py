"""``roombus tail | send | chat``: the command line on top of the client (the ``nats`` CLI's
cousin). The ``roombus`` command of the server wires these in; ``python -m roombus_client``
runs them without it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from .client import Client
from .errors import NotRecovered, RoombusError, SendTimeout
from .types import ChatMessage

DEFAULT_URL = "ws://127.0.0.1:8080/ws"
COMMANDS = ("tail", "send", "chat")


def add_parsers(sub: Any) -> None:
    """Add ``tail``, ``send`` and ``chat`` to an argparse subparsers object."""
    p = sub.add_parser("tail", help="print a room's messages as they come (each once, in order)")
    _common(p)
    p.add_argument("--since", type=int, default=None, metavar="SEQ", help="replay after SEQ")
    p.add_argument("--epoch", default=None, help="the epoch SEQ belongs to")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = sub.add_parser("send", help="send one message to a room; prints its id and seq")
    _common(p)
    p.add_argument("text")
    p.add_argument("--client-id", default=None, help="idempotency key (a retry is stored once)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the ack")
    p.add_argument("--json", action="store_true", help="print the ack as JSON")
    p = sub.add_parser("chat", help="interactive chat in a terminal (line editing, history)")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("room")
    p.add_argument(
        "--url",
        action="append",
        default=None,
        help=f"gateway WebSocket URL, repeatable (env ROOMBUS_URL, default {DEFAULT_URL})",
    )
    p.add_argument("--user", default=None, help="your name (auth off; env USER)")
    p.add_argument("--token", default=None, help="a JWT (env ROOMBUS_TOKEN)")


def _client(args: argparse.Namespace) -> Client:
    urls = args.url or os.environ.get("ROOMBUS_URL", DEFAULT_URL).split(",")
    token = args.token or os.environ.get("ROOMBUS_TOKEN") or None
    user = None if token else (args.user or os.environ.get("USER") or "cli")
    return Client(urls, user=user, token=token)


def run(command: str, args: argparse.Namespace) -> int:
    """Run one command; the exit status."""
    try:
        if command == "tail":
            return asyncio.run(tail(args))
        if command == "send":
            return asyncio.run(send(args))
        from .chat import chat

        return asyncio.run(chat(_client(args), args.room))
    except KeyboardInterrupt:
        return 130
    except RoombusError as exc:
        print(f"roombus {command}: {exc}", file=sys.stderr)
        return 1


def line(msg: ChatMessage, as_json: bool) -> str:
    """A message as ``tail`` prints it."""
    if as_json:
        body = {f.name: getattr(msg, f.name) for f in fields(msg)}
        body["ts"] = msg.ts.isoformat().replace("+00:00", "Z")
        return json.dumps({k: v for k, v in body.items() if v is not None})
    return f"{msg.seq or '-':>8} {msg.ts:%H:%M:%S} {msg.user}: {msg.text}"


async def tail(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        room = await c.join(args.room, since=args.since, epoch=args.epoch)
        if not args.json:
            print(f"# {args.room} at seq {room.seq} (epoch {room.epoch})", file=sys.stderr)
        while True:
            try:
                async for msg in room:
                    print(line(msg, args.json), flush=True)
            except NotRecovered as gap:
                print(f"# not recovered: {gap.reason} (now at {gap.seq})", file=sys.stderr)


async def send(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        room = await c.join(args.room)
        try:
            ack = await room.send(args.text, client_id=args.client_id, timeout=args.timeout)
        except SendTimeout as exc:
            print(f"roombus send: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"client_id": ack.client_id, "id": ack.id, "seq": ack.seq}))
        else:
            print(f"{ack.id} seq {ack.seq}")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="roombus-client")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parsers(sub)
    args = parser.parse_args(argv)
    return run(args.command, args)
