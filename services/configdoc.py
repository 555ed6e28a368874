"""The README configuration tables, from the settings classes (`python -m services.configdoc`)."""

from __future__ import annotations

import importlib

from .cli import SERVICES
from .settings import ServiceSettings


def table(cls: type[ServiceSettings], skip: set[str]) -> str:
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        default = info.default
        shown = "" if default in (None, "") else f"`{default}`"
        doc = (info.description or "").replace("\n", " ").replace("|", "\\|")
        rows.append(f"| `{name.upper()}` | {shown} | {doc} |")
    return "\n".join(rows)


def main() -> None:
    common = set(ServiceSettings.model_fields)
    print("### Every service\n")
    print(table(ServiceSettings, set()))
    for command, (settings_ref, _, _) in SERVICES.items():
        module, _, name = settings_ref.partition(":")
        cls = getattr(importlib.import_module(module), name)
        print(f"\n### `roombus {command}`\n")
        print(table(cls, common - {"port"}))


if __name__ == "__main__":
    main()
