"""The ``roombus`` command: one subcommand per service, plus ``up`` for the local stack."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from pydantic import ValidationError

from .extras import EXTRAS, message
from .settings import ServiceSettings, settings_from

# subcommand -> (settings class, run function), imported lazily: apps never import apps,
# and `roombus history` should not pay for importing the gateway.
SERVICES: dict[str, tuple[str, str, str]] = {
    "gateway": ("gateway.settings:GatewaySettings", "gateway.main:run", "the WebSocket gateway"),
    "history": ("history.settings:HistorySettings", "history.main:run", "the history service"),
    "presence": ("presence.settings:PresenceSettings", "presence.main:run", "the presence service"),
    "bridge": ("bridge.settings:BridgeSettings", "bridge.main:run", "the Redis bridge"),
}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[ServiceSettings]) -> None:
    """One ``--flag`` per settings field; its docstring is the help text."""
    for name, info in cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = name.upper()
        default = info.default
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            metavar=env,
            # argparse formats help with %: a literal one in a description must be doubled.
            help=f"{info.description or ''} [env {env}, default {default!r}]".replace("%", "%%"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roombus",
        description="NATS-first WebSocket fan-out. Settings come from the environment; "
        "flags override.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (settings_ref, _run, help_text) in SERVICES.items():
        p = sub.add_parser(command, help=f"run {help_text} in the foreground")
        add_settings_flags(p, _load(settings_ref))
    from .stack import add_up_parser

    add_up_parser(sub)
    try:  # tail / send / chat: the Python client's CLI (clients/python, its own distribution)
        from roombus_client.cli import add_parsers
    except ModuleNotFoundError:
        for command in CLIENT_COMMANDS:
            sub.add_parser(command, help="(needs the client: pip install ./clients/python)")
    else:
        add_parsers(sub)
    return parser


CLIENT_COMMANDS = ("tail", "send", "chat")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    args = vars(namespace)
    command = args.pop("command")
    if command in CLIENT_COMMANDS:
        try:
            from roombus_client.cli import run as run_client
        except ModuleNotFoundError:
            print(f"roombus {command}: install the client: pip install ./clients/python")
            return 2
        return run_client(command, namespace)
    if command == "up":
        from .stack import run_up

        return run_up(args)
    settings_ref, run_ref, _ = SERVICES[command]
    cls = cast(type[ServiceSettings], _load(settings_ref))
    try:
        settings = settings_from(cls, args)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            where = f"setting {field.upper()}: " if field else ""  # model checks name theirs
            print(f"roombus {command}: {where}{msg}", file=sys.stderr)
        return 2
    try:
        run = cast(Callable[[ServiceSettings], None], _load(run_ref))
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in EXTRAS:
            raise
        # An optional dependency (``roombus bridge`` without redis): say which extra.
        print(f"roombus {command}: {message(missing, f'roombus {command}')}", file=sys.stderr)
        return 2
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
