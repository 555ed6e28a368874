"""redis and cryptography are optional extras: without them, a clear error at start."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from gateway.settings import GatewaySettings
from services import cli, extras


def test_bridge_without_redis_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # None in sys.modules makes `import redis` raise ModuleNotFoundError, as if not installed.
    monkeypatch.setitem(sys.modules, "redis", None)
    for name in [m for m in sys.modules if m == "bridge.main" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("bridge.service", "bridge.redisconn", "bridge.lease", "bridge.outbound"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert cli.main(["bridge"]) == 2
    err = capsys.readouterr().err
    assert "roombus bridge needs the 'redis' package" in err
    assert "pip install 'roombus[bridge]'" in err


def test_rs256_key_without_cryptography_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(extras, "available", lambda module: module != "cryptography")
    with pytest.raises(ValidationError, match=r"roombus\[rs256\]"):
        GatewaySettings(roombus_auth="jwt", jwt_public_key="-----BEGIN PUBLIC KEY-----")
    # HS256 needs nothing optional.
    GatewaySettings(roombus_auth="jwt", jwt_secret="s" * 32)


def test_require_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extras, "available", lambda module: False)
    with pytest.raises(extras.MissingExtraError, match=r"pip install 'roombus\[bridge\]'"):
        extras.require("redis", "the bridge")


def test_the_cli_prints_the_missing_extra_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(extras, "available", lambda module: module != "cryptography")
    monkeypatch.setenv("ROOMBUS_AUTH", "jwt")
    monkeypatch.setenv("JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----")
    assert cli.main(["gateway"]) == 2
    assert capsys.readouterr().err == (
        "roombus gateway: JWT_PUBLIC_KEY (RS256 tokens) needs the 'cryptography' package, which"
        " is not installed: pip install 'roombus[rs256]' (or install it with your requirements)\n"
    )
