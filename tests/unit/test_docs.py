"""The README's configuration section is generated from the settings classes: no drift."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

from services import configdoc

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_matches_the_settings() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        configdoc.main()
    text = README.read_text()
    start = text.index("<!-- config:start -->\n") + len("<!-- config:start -->\n")
    end = text.index("<!-- config:end -->")
    assert text[start:end] == out.getvalue(), "run: python -m services.configdoc (README drifted)"
