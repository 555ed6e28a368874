"""``roombus <command> --help`` is how an operator (and the compose check) learns a service's
settings: it must print every one of them, whatever their descriptions contain."""

from __future__ import annotations

import contextlib
import io

import pytest

from services.cli import SERVICES, _load, main


@pytest.mark.parametrize("command", sorted(SERVICES))
def test_every_service_prints_its_help_with_every_setting(command: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = out.getvalue()
    for name in _load(SERVICES[command][0]).model_fields:
        assert f"--{name.replace('_', '-')}" in text, name
