"""Optional dependencies: what needs them, and the clear error when they are missing.

``redis`` is needed only by the Redis bridge, ``cryptography`` only by RS256 tokens; both
are extras (``pip install 'roombus[bridge,rs256]'``) so a gateway-only deployment does not
carry them. The dev extra and the container image install both.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "available", "require"]

EXTRAS: dict[str, str] = {"redis": "bridge", "cryptography": "rs256"}
"""Top-level module -> the roombus extra that installs it."""


class MissingExtraError(RuntimeError):
    """``feature`` needs ``module``, which is not installed; says how to install it."""

    def __init__(self, module: str, feature: str) -> None:
        self.module = module
        self.feature = feature
        self.extra = EXTRAS.get(module, module)
        super().__init__(message(module, feature))


def message(module: str, feature: str) -> str:
    """The one-line explanation for a missing optional ``module``."""
    extra = EXTRAS.get(module, module)
    return (
        f"{feature} needs the '{module}' package, which is not installed: "
        f"pip install 'roombus[{extra}]' (or install it with your requirements)"
    )


def available(module: str) -> bool:
    """True when ``module`` can be imported."""
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` can be imported."""
    if not available(module):
        raise MissingExtraError(module, feature)
