"""The container stack: static checks of the compose files, and the compose check on a real
Docker engine (``scripts/compose_check.py``: stand-in images, build, ``up --scale gateway=3``,
clients through the load balancer, scaling, ``down -v``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import SERVICES, _load

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def _env_file_lines(service: str) -> list[str]:
    """What deploy/<service>.env should hold: every setting, commented out, with its default."""
    cls = _load(SERVICES[service][0])
    in_compose = set(_compose()["services"][service]["environment"])
    lines = []
    for name, info in cls.model_fields.items():
        if name.upper() in in_compose:
            continue  # compose.yaml sets it (from the shell or .env where it is a variable)
        default = info.default
        if isinstance(default, bool):
            default = str(default).lower()
        elif default is None:
            default = ""
        lines.append(f"# {' '.join((info.description or '').split())}")
        lines.append(f"# {name.upper()}={default}")
    return lines


ENV_HEADER = """\
# Settings of `roombus {service}`: environment variables, read when the container starts.
# Uncomment a line to change it. The rest (NATS_URL, LOG_LEVEL, HOST, PORT, ...) are set in
# compose.yaml, from your shell or .env where they are ${{VARIABLES}}; the README explains each.
# Regenerate after adding a setting: .venv/bin/python -m tests.e2e.test_compose

"""


def write_env_files() -> None:
    for service in SERVICES:
        text = ENV_HEADER.format(service=service) + "\n".join(_env_file_lines(service)) + "\n"
        (ROOT / "deploy" / f"{service}.env").write_text(text)


def test_every_service_of_the_cli_runs_in_compose_by_command() -> None:
    services = _compose()["services"]
    for name in SERVICES:
        assert name in services, f"compose.yaml has no `{name}` service"
        assert services[name]["command"] == ["roombus", name]
        env = services[name]["environment"]
        assert env["HOST"] == "0.0.0.0" and env["NATS_URL"].endswith("nats://nats:4222}")


def test_every_setting_is_listed_in_the_service_env_file() -> None:
    for name in SERVICES:
        text = (ROOT / "deploy" / f"{name}.env").read_text()
        missing = [
            line
            for line in _env_file_lines(name)
            if line.startswith("# ") and "=" in line and line.split("=")[0] + "=" not in text
        ]
        assert not missing, (
            f"deploy/{name}.env lacks {missing}: run .venv/bin/python -m tests.e2e.test_compose"
        )


def test_every_image_is_pinned() -> None:
    for name, svc in _compose()["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: image {image!r} has no pinned tag"


def test_gateway_has_no_fixed_host_port_and_history_runs_twice() -> None:
    services = _compose()["services"]
    assert "ports" not in services["gateway"]
    assert services["history"]["deploy"]["replicas"] == 2
    assert services["nats-box"]["profiles"] == ["tools"]


def test_the_build_context_admits_every_package() -> None:
    allowed = set(re.findall(r"^!(\S+)$", (ROOT / ".dockerignore").read_text(), re.M))
    packages = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert packages is not None
    for pkg in re.findall(r'"([^"]+)"', packages.group(1)):
        assert pkg in allowed, f".dockerignore must allow `!{pkg}` (a package of pyproject.toml)"


def _why_not_docker() -> str | None:
    if os.geteuid() != 0:
        return "the compose check installs and starts dockerd: run as root"
    if shutil.which("dockerd") is None and shutil.which("apt-get") is None:
        return "no dockerd and no apt-get to install Debian's docker.io"
    return None


@pytest.mark.docker
@pytest.mark.slow  # ~50 s: installs/starts dockerd, builds the image; `make test` and CI run it
@pytest.mark.timeout(900)
def test_compose_stack_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reason = _why_not_docker()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the compose check: {reason}")
        pytest.skip(reason)
    log = tmp_path / "compose_check.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "compose_check.py")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            timeout=840,
            check=False,
        )
    text = log.read_text(errors="replace")
    summary = [line for line in text.splitlines() if line.startswith("[compose-check")]
    with capsys.disabled():
        print(f"\ncompose check ({time.monotonic() - started:.0f}s):", *summary, sep="\n  ")
    assert proc.returncode == 0, text[-8000:]
    assert any("PASSED" in line for line in summary)


if __name__ == "__main__":
    write_env_files()
