"""The compose check: build and run compose.yaml on a real Docker engine, test it end to end.

    .venv/bin/python scripts/compose_check.py          # what `make test` runs (tests/e2e)

No registry is reachable from these machines, so the official images compose.yaml names are
replaced by local stand-ins with the same tags (only where no such image exists yet, or where
it is already one of ours): a Debian bookworm base made by debootstrap from the apt mirror,
plus Debian's python3 (``python:3.11-slim``), the pinned nats-server binary from the venv
(``nats:*``), Debian's redis-server (``redis:*``) and haproxy (``haproxy:*``). There is no
package of the ``nats`` CLI on the registries we reach, so no stand-in for ``nats-box``: the
check verifies the ``tools`` profile's wiring but does not run it.

Then: ``build``, ``up -d --scale gateway=3``, and from outside the containers, through the
load balancer's published port on loopback: clients spread over all three replicas (counted by
each replica's ``roombus_gateway_open_connections``), messages cross replicas, sends are acked
and stored (``history`` query), presence counts every member; scale to 1 and back to 3 and the
load balancer follows without a restart; the per-address limit counts this host's own address
through HAProxy (a forged ``X-Forwarded-For`` changes nothing, another address is still
served); ``down -v``; stop dockerd if this script started it.

The stack stays on this machine: dockerd runs with ``--ip-forward=false --ip-masq=false``, the
published ports bind 127.0.0.1, and only build steps (apt-get, pip) use the host network to
reach the package mirrors. Runs are serialized by a lock file (one dockerd, shared ports).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import fcntl
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from services.ports import free_port, port_free  # noqa: E402
from tests.support.client import Client, close_all  # noqa: E402
from tests.support.wait import wait_for  # noqa: E402

# Probes run `docker`/HTTP against the stack: every 0.25 s is often enough (poll=0.25).

BASE_IMAGE = "roombus-standin/debian:bookworm"
STANDIN_LABEL = "org.roombus.standin"
LOCK = Path("/tmp/roombus-compose-check.lock")
GATEWAYS = 3
PER_IP = 12
"""MAX_CONNECTIONS_PER_IP of the gateways in the check (the per-address step fills it)."""
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[compose-check {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def run(
    *argv: str,
    check: bool = True,
    capture: bool = False,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        check=False,
        text=True,
        capture_output=capture,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL if input is None else None,
        input=None if input is None else input.decode(),
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or "")[-3000:] if capture else ""
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}\n{detail}")
    return proc


# --- the engine ------------------------------------------------------------------------------


def ensure_packages() -> None:
    """docker.io (dockerd), docker-compose and debootstrap, from Debian, when missing."""
    wanted = {"dockerd": "docker.io", "debootstrap": "debootstrap"}
    missing = [pkg for exe, pkg in wanted.items() if shutil.which(exe) is None]
    if compose_cmd() is None:
        missing.append("docker-compose")
    if not missing:
        return
    say(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *missing]
    if run(*install, check=False, capture=True, env=env).returncode != 0:
        run("apt-get", "update", "-q", capture=True, env=env)
        run(*install, capture=True, env=env)


def compose_cmd() -> list[str] | None:
    """``docker compose`` (v2 plugin) when present, else Debian's ``docker-compose`` (1.29)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def engine_up() -> bool:
    return (
        subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=30).returncode
        == 0
    )


def start_dockerd(logdir: Path) -> subprocess.Popen[bytes]:
    """Debian's dockerd as on these machines: no forwarding, no masquerading (no way out)."""
    args = ["dockerd", "--ip-forward=false", "--ip-masq=false"]
    for attempt in (args, [*args, "--iptables=false"]):
        log = logdir / "dockerd.log"
        say(f"starting {' '.join(attempt)}")
        with log.open("ab") as out:
            proc = subprocess.Popen(
                attempt, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if engine_up():
                return proc
            time.sleep(0.5)
        stop_dockerd(proc)
        say("dockerd did not come up; its log:\n" + log.read_text(errors="replace")[-2000:])
    raise RuntimeError("could not start dockerd")


def stop_dockerd(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- stand-ins for the official images -------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror apt uses here (debootstrap fetches from the same one)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        m = re.search(r"^URIs:\s*(\S+)", path.read_text(), re.M)
        if m and "security" not in m.group(1):
            return m.group(1)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", sources.read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def image_labels(name: str) -> dict[str, str] | None:
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    import json

    return json.loads(proc.stdout.strip() or "null") or {}


def ensure_base(workdir: Path) -> None:
    if image_labels(BASE_IMAGE) is not None:
        say(f"base image {BASE_IMAGE} cached")
        return
    rootfs = workdir / "rootfs"
    mirror = apt_mirror()
    say(f"debootstrap --variant=minbase bookworm from {mirror}")
    run(
        "debootstrap",
        "--variant=minbase",
        "bookworm",
        str(rootfs),
        mirror,
        capture=True,
        timeout=480,
    )
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        [
            "docker",
            "import",
            "--change",
            f"LABEL {STANDIN_LABEL}=base",
            "--change",
            'CMD ["bash"]',
            "-",
            BASE_IMAGE,
        ],
        stdin=tar.stdout,
        check=True,
        capture_output=True,
        timeout=300,
    )
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    say(f"imported {BASE_IMAGE}")


APT = (
    "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q"
    " --no-install-recommends {pkgs} && rm -rf /var/lib/apt/lists/*\n"
)

# Each recipe: (Dockerfile text after FROM, files to put in the build context).
RECIPES: dict[str, str] = {
    # Debian's python3 is 3.11 on bookworm. The official image has `python` on PATH too.
    # It also trusts the CAs this machine trusts (its local additions, e.g. an egress proxy's),
    # so that pip inside builds reaches PyPI as pip on the host does.
    "python": APT.format(pkgs="python3 python3-pip python3-venv ca-certificates")
    + "COPY ca/ /usr/local/share/ca-certificates/\n"
    + "RUN update-ca-certificates && ln -s /usr/bin/python3 /usr/local/bin/python\n"
    + "ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt"
    + " SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\n"
    + 'CMD ["python3"]\n',
    # The official image's alpine variant has busybox wget for the health check.
    "nats": APT.format(pkgs="wget")
    + "COPY nats-server /usr/local/bin/nats-server\n"
    + 'EXPOSE 4222 8222\nCMD ["nats-server"]\n',
    "redis": APT.format(pkgs="redis-server") + 'CMD ["redis-server"]\n',
    "haproxy": APT.format(pkgs="haproxy")
    + 'CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]\n',
}


def images_named() -> dict[str, str]:
    """Every external image compose.yaml and the Dockerfile name: {"nats:2.15.1-alpine": "nats"}."""
    names = re.findall(
        r"^\s*image:\s*[\"']?([^\s\"'#]+)", (ROOT / "compose.yaml").read_text(), re.M
    )
    names += re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    out: dict[str, str] = {}
    for name in names:
        if name.startswith("roombus:") or "$" in name:
            continue  # ours, built by compose
        repo = name.rsplit(":", 1)[0]
        out[name] = repo
    return out


def ensure_standins(workdir: Path) -> list[str]:
    """Build a stand-in for each named official image; returns the names left without one."""
    missing: list[str] = []
    nats_bin = Path(sys.executable).parent / "nats-server"
    for name, repo in images_named().items():
        recipe = RECIPES.get(repo)
        if recipe is None:
            missing.append(name)
            continue
        labels = image_labels(name)
        if labels is not None and STANDIN_LABEL not in labels:
            say(f"{name}: a real image is present, kept")
            continue
        ctx = workdir / f"ctx-{repo}"
        ctx.mkdir(parents=True, exist_ok=True)
        if repo == "nats":
            shutil.copy2(nats_bin, ctx / "nats-server")
        if repo == "python":
            (ctx / "ca").mkdir(exist_ok=True)
            for crt in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
                shutil.copy2(crt, ctx / "ca" / crt.name)
        dockerfile = f"FROM {BASE_IMAGE}\n{recipe}LABEL {STANDIN_LABEL}={repo}\n"
        (ctx / "Dockerfile").write_text(dockerfile)
        started = time.monotonic()
        run("docker", "build", "--network", "host", "-q", "-t", name, str(ctx), capture=True)
        say(f"stand-in {name} ready ({time.monotonic() - started:.1f}s)")
    return missing


# --- the stack -------------------------------------------------------------------------------


class Stack:
    def __init__(self, compose: list[str], project: str, env: dict[str, str]) -> None:
        self.base = [*compose, "-p", project, "-f", str(ROOT / "compose.yaml")]
        self.project = project
        self.env = {**os.environ, **env}

    def __call__(
        self, *args: str, capture: bool = False, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(*self.base, *args, capture=capture, timeout=timeout, env=self.env, check=check)

    def containers(self, service: str, running: bool = True) -> list[str]:
        argv = [
            "docker",
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ]
        if running:
            argv += ["--filter", "status=running"]
        return run(*argv, capture=True).stdout.split()


def lb_servers(stats_port: int) -> list[dict[str, str]]:
    """The gateway slots HAProxy has filled from DNS: name, addr, status, current sessions."""
    with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=3) as r:
        text = r.read().decode()
    rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
    return [
        row
        for row in rows
        if row["pxname"] == "gateways" and row["svname"] not in ("BACKEND", "FRONTEND")
    ]


def lb_up(stats_port: int) -> list[str]:
    # "UP 1/2" is an UP server whose last check failed: still taking traffic.
    return sorted(
        s["addr"].rsplit(":", 1)[0] for s in lb_servers(stats_port) if s["status"].startswith("UP")
    )


def gateway_ips(stack: Stack) -> dict[str, str]:
    """container id -> its address on the compose network."""
    out: dict[str, str] = {}
    for cid in stack.containers("gateway"):
        ip = run(
            "docker",
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            cid,
            capture=True,
        ).stdout.strip()
        out[cid] = ip
    return out


def open_connections(cid: str) -> int:
    """The replica's own count of open WebSockets (its /metrics, read inside the container)."""
    code = (
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:8080/metrics', timeout=3).read().decode())"
    )
    text = run("docker", "exec", cid, "python", "-c", code, capture=True, timeout=30).stdout
    m = re.search(r"^roombus_gateway_open_connections\s+([0-9.e+]+)$", text, re.M)
    if m is None:
        raise AssertionError(f"no roombus_gateway_open_connections in {cid}'s /metrics")
    return int(float(m.group(1)))


def spread(stack: Stack) -> dict[str, int]:
    return {cid[:12]: open_connections(cid) for cid in stack.containers("gateway")}


def wait_spread(stack: Stack, total: int, replicas: int) -> dict[str, int]:
    def probe() -> dict[str, int] | None:
        s = spread(stack)
        return s if len(s) == replicas and sum(s.values()) == total else None

    result: dict[str, int] = wait_for(
        probe, 20, f"{total} connections on {replicas} gateways", poll=0.25
    )
    return result


def health(cid: str) -> str:
    return run(
        "docker", "inspect", "--format", "{{.State.Health.Status}}", cid, capture=True
    ).stdout.strip()


def started_at(cid: str) -> str:
    return run(
        "docker", "inspect", "--format", "{{.State.StartedAt}}", cid, capture=True
    ).stdout.strip()


async def connect_many(url: str, prefix: str, n: int) -> list[Client]:
    return [await Client.open(url, user=f"{prefix}{i}") for i in range(n)]


async def chat_round(clients: list[Client], room: str, tag: str, acks: bool) -> None:
    """Everyone joins ``room`` and says one line; everyone hears every line (and is acked)."""
    for c in clients:
        await c.join(room)
    texts = [f"{tag}-{i}" for i in range(len(clients))]
    for i, (c, text) in enumerate(zip(clients, texts, strict=True)):
        await c.send("chat.message", room=room, text=text, client_id=f"{tag}-cid-{i}")
    for c in clients:
        await c.wait_texts(texts, room, timeout=20)
    if acks:
        for i, c in enumerate(clients):
            await c.next("ack", timeout=20, client_id=f"{tag}-cid-{i}")


def check_history_and_presence(
    url: str, room: str, texts: list[str], users: set[str], services: set[str]
) -> None:
    async def go() -> None:
        probe = await Client.open(url, user="probe")
        try:
            await probe.join(room)
            if "history" in services:
                await probe.send("history", room=room, limit=100)
                page = (await probe.next("history", room=room, timeout=15))["data"]
                stored = [m["text"] for m in page["messages"]]
                assert set(texts) <= set(stored), f"history of {room}: {stored}"
                say(f"history: {len(stored)} messages stored in {room}")
            if "presence" in services:
                want = users | {"probe"}
                deadline = time.monotonic() + 20
                members: list[str] = []
                while time.monotonic() < deadline:
                    await probe.send("presence", room=room)
                    answer = await probe.next("presence", room=room, timeout=10)
                    if "event" in answer["data"]:
                        continue
                    members = sorted(answer["data"]["members"])
                    if set(members) == want:
                        break
                    await asyncio.sleep(0.5)
                assert set(members) == want, f"presence of {room}: {members}, want {sorted(want)}"
                say(f"presence: {len(members)} members of {room} on every gateway")
        finally:
            await probe.close()

    asyncio.run(go())


def check_bridge(stack: Stack, url: str, room: str) -> None:
    """Redis pub/sub ``room:<room>`` <-> the room, both ways, via the redis container's CLI."""
    redis = stack.containers("redis")[0]
    channel = f"room:{room}"

    def redis_cli(*args: str) -> str:
        return run("docker", "exec", redis, "redis-cli", *args, capture=True).stdout

    # redis-cli buffers a subscriber's output when it is not a terminal: run it for a bounded
    # time and read what it printed when it exits.
    sub = subprocess.Popen(
        ["docker", "exec", redis, "timeout", "8", "redis-cli", "subscribe", channel],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_for(
            lambda: redis_cli("pubsub", "numsub", channel).split()[-1] != "0",
            10,
            "redis-cli to subscribe",
            poll=0.25,
        )

        async def go() -> None:
            c = await Client.open(url, user="bridged")
            await c.join(room)
            # Redis -> WebSocket: publish until the bridge (once subscribed and holding its
            # lease) forwards one; every copy carries the same text.
            deadline = time.monotonic() + 30
            while "from-redis" not in c.texts(room):
                assert time.monotonic() < deadline, "nothing published on Redis reached the room"
                await asyncio.to_thread(redis_cli, "publish", channel, "from-redis")
                with contextlib.suppress(AssertionError):
                    await c.wait(lambda _: "from-redis" in c.texts(room), timeout=1)
            # WebSocket -> Redis.
            await c.send("chat.message", room=room, text="to-redis")
            await c.wait_texts(["to-redis"], room)
            await c.close()

        asyncio.run(go())
        out, _ = sub.communicate(timeout=20)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert "to-redis" in out, f"the room's message never reached Redis: {out[-500:]}"
    say("bridge: Redis publish reached the room, the room's message reached Redis")


def e2e(stack: Stack, lb_port: int, stats_port: int, services: set[str]) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{lb_port}/ws"
    report: dict[str, Any] = {}
    acks = "history" in services

    # 1. three replicas behind the load balancer; clients spread over all of them.
    t = time.monotonic()
    wait_for(
        lambda: len(lb_up(stats_port)) == GATEWAYS,
        60,
        "HAProxy to see 3 healthy gateways",
        poll=0.25,
    )
    say(f"HAProxy sees {GATEWAYS} gateways UP ({time.monotonic() - t:.1f}s)")
    room = "compose" + uuid.uuid4().hex[:8]
    n = 3 * GATEWAYS

    async def round_one() -> dict[str, int]:
        clients = await connect_many(url, "u", n)
        s = await asyncio.to_thread(wait_spread, stack, n, GATEWAYS)
        assert all(v >= 1 for v in s.values()), f"a replica got no client: {s}"
        await chat_round(clients, room, "hello", acks)
        await close_all()
        return s

    report["spread_3"] = asyncio.run(round_one())
    say(f"{n} clients over {GATEWAYS} replicas: {report['spread_3']}; every message reached all")
    if acks:
        say("every send acked (stored by history)")
    texts = [f"hello-{i}" for i in range(n)]
    check_history_and_presence(url, room, texts, set(), services - {"presence"})

    async def presence_round() -> None:
        clients = await connect_many(url, "p", n)
        for c in clients:
            await c.join(room)
        await asyncio.to_thread(
            check_history_and_presence, url, room, [], {c.user for c in clients}, {"presence"}
        )
        await close_all()

    if "presence" in services:
        asyncio.run(presence_round())

    if "bridge" in services:
        check_bridge(stack, url, room)

    # An unhealthy replica (paused: /readyz stops answering) is taken out, then back in.
    paused = stack.containers("gateway")[0]
    t = time.monotonic()
    run("docker", "pause", paused, capture=True)
    try:
        wait_for(
            lambda: len(lb_up(stats_port)) == 2,
            30,
            "HAProxy to mark the paused gateway DOWN",
            poll=0.25,
        )
        report["unhealthy_out_s"] = round(time.monotonic() - t, 1)

        async def around_paused() -> dict[str, int]:
            clients = await connect_many(url, "h", 4)
            await chat_round(clients, room, "paused", acks)
            others = {cid[:12] for cid in stack.containers("gateway")} - {paused[:12]}
            s = {
                cid: open_connections(cid)
                for cid in stack.containers("gateway")
                if cid[:12] in others
            }
            await close_all()
            return {k[:12]: v for k, v in s.items()}

        s = asyncio.run(around_paused())
        assert sum(s.values()) == 4, f"clients reached the paused gateway: {s}"
    finally:
        run("docker", "unpause", paused, capture=True)
    wait_for(
        lambda: len(lb_up(stats_port)) == GATEWAYS,
        30,
        "HAProxy to take the gateway back",
        poll=0.25,
    )
    # Docker's own health check, too: `up` refuses to go on while a dependency is unhealthy.
    wait_for(
        lambda: health(paused) == "healthy",
        30,
        "the unpaused gateway to be healthy again",
        poll=0.25,
    )
    say(
        f"paused gateway out of rotation in {report['unhealthy_out_s']}s; 4 clients served by"
        f" the other two {s}; back in after unpause"
    )

    lb_cid = stack.containers("lb")[0]
    lb_started = started_at(lb_cid)
    up_args = ["up", "-d", "--no-recreate", "--no-build"]
    svc_args = sorted(services | {"nats", "redis", "lb"})

    # 2. scale down to 1: HAProxy drops the gone replicas.
    t = time.monotonic()
    stack(*up_args, "--scale", "gateway=1", *svc_args, capture=True)
    ips = gateway_ips(stack)
    assert len(ips) == 1, ips
    wait_for(
        lambda: lb_up(stats_port) == sorted(ips.values()),
        30,
        "HAProxy to drop the removed gateways",
        poll=0.25,
    )
    report["scale_down_s"] = round(time.monotonic() - t, 1)
    say(f"scaled to 1: HAProxy follows ({report['scale_down_s']}s incl. stopping 2 replicas)")

    async def round_two() -> dict[str, int]:
        clients = await connect_many(url, "d", 4)
        s = await asyncio.to_thread(wait_spread, stack, 4, 1)
        await chat_round(clients, room, "down", acks)
        await close_all()
        return s

    report["spread_1"] = asyncio.run(round_two())
    say(f"4 new clients, all on the one replica: {report['spread_1']}")

    # 3. back to 3: HAProxy picks up the new replicas, new clients reach them.
    t = time.monotonic()
    stack(*up_args, "--scale", f"gateway={GATEWAYS}", *svc_args, capture=True)
    ips = gateway_ips(stack)
    assert len(ips) == GATEWAYS, ips
    wait_for(
        lambda: lb_up(stats_port) == sorted(ips.values()),
        60,
        "HAProxy to add the new gateways",
        poll=0.25,
    )
    report["scale_up_s"] = round(time.monotonic() - t, 1)
    say(f"scaled to {GATEWAYS}: HAProxy follows ({report['scale_up_s']}s incl. container start)")

    async def round_three() -> dict[str, int]:
        await asyncio.to_thread(wait_spread, stack, 0, GATEWAYS)  # the earlier clients left
        clients = await connect_many(url, "v", n)
        s = await asyncio.to_thread(wait_spread, stack, n, GATEWAYS)
        assert all(v >= 1 for v in s.values()), f"a replica got no client after scaling: {s}"
        await chat_round(clients, room, "again", acks)
        await close_all()
        return s

    report["spread_3_again"] = asyncio.run(round_three())
    say(f"{n} new clients over {GATEWAYS} replicas again: {report['spread_3_again']}")
    assert started_at(lb_cid) == lb_started, "the load balancer was restarted"
    assert stack.containers("lb") == [lb_cid], "the load balancer was recreated"
    say("the load balancer was neither restarted nor recreated")

    # 4. the per-address limit sees each client's own address through HAProxy, and a forged
    # X-Forwarded-For changes nothing (HAProxy replaces it).
    report["per_ip"] = asyncio.run(per_ip_round(stack, url, lb_cid))
    say(
        f"per-address limit through HAProxy: {PER_IP * GATEWAYS} from this host accepted, the"
        f" next refused with {report['per_ip']['next']} (a forged X-Forwarded-For too); another"
        f" address still served (HTTP {report['per_ip']['other']})"
    )

    if "history" in services:
        replicas = len(stack.containers("history"))
        assert replicas == 2, f"history runs {replicas} replicas, compose.yaml says 2"
        report["history_replicas"] = replicas
    return report


async def refused_code(url: str, headers: dict[str, str]) -> int | None:
    """The close code a new WebSocket gets before any frame, or None when it is served."""
    ws = await connect(url + "?user=onemore", additional_headers=headers, open_timeout=10)
    try:
        await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed:
        return ws.close_code
    finally:
        await ws.close()
    return None


def sse_status_inside(cid: str) -> str:
    """Status line of GET /sse sent from inside the lb container (another client address)."""
    probe = (
        "exec 3<>/dev/tcp/127.0.0.1/8080 &&"
        " printf 'GET /sse?user=inside HTTP/1.0\\r\\nHost: lb\\r\\n\\r\\n' >&3 &&"
        " timeout 5 head -c 12 <&3"
    )
    out = run("docker", "exec", cid, "bash", "-c", probe, capture=True, check=False, timeout=30)
    return out.stdout.strip()


async def per_ip_round(stack: Stack, url: str, lb_cid: str) -> dict[str, Any]:
    await asyncio.to_thread(wait_spread, stack, 0, GATEWAYS)  # the earlier clients left
    # leastconn fills the replicas evenly: PER_IP each from this host's address.
    await connect_many(url, "ip", PER_IP * GATEWAYS)
    nxt = await refused_code(url, {})
    forged = await refused_code(url, {"X-Forwarded-For": "198.51.100.7"})
    assert nxt == 4029, f"connection {PER_IP * GATEWAYS + 1} from one address got {nxt}"
    assert forged == 4029, f"a forged X-Forwarded-For got past the per-address limit ({forged})"
    other = await asyncio.to_thread(sse_status_inside, lb_cid)
    assert other.endswith("200"), f"another address was refused too (HAProxy hides it?): {other}"
    await close_all()
    return {"next": nxt, "forged": forged, "other": other.split()[-1]}


def check_image(image: str) -> None:
    """What the issue asks of the image: non-root, a health check, no compilers, no caches."""
    user = run("docker", "run", "--rm", image, "id", "-u", capture=True).stdout.strip()
    assert user != "0", "the image runs as root"
    health = run(
        "docker",
        "image",
        "inspect",
        "--format",
        "{{json .Config.Healthcheck}}",
        image,
        capture=True,
    ).stdout
    assert "readyz" in health, f"no HEALTHCHECK on /readyz: {health}"
    probe = (
        "for c in gcc cc g++ make; do command -v $c && exit 1; done;"
        " ls /root/.cache/pip /tmp/requirements.txt /src 2>/dev/null && exit 1;"
        " find /opt/roombus -name pip -maxdepth 3 | grep -q . && exit 1; exit 0"
    )
    found = run(
        "docker", "run", "--rm", "--user", "0", image, "sh", "-c", probe, check=False, capture=True
    )
    assert found.returncode == 0, f"compilers or caches in the image: {found.stdout.strip()}"
    say(f"{image}: runs as uid {user}, HEALTHCHECK on /readyz, no compilers, no caches")


def available_services(image: str) -> set[str]:
    """The roombus subcommands this image has (bridge lands later than the rest)."""
    found = set()
    for svc in ("gateway", "history", "presence", "bridge"):
        probe = run(
            "docker", "run", "--rm", image, "roombus", svc, "--help", check=False, capture=True
        )
        if probe.returncode == 0:
            found.add(svc)
    return found


def remove_leftovers(compose: list[str]) -> None:
    """Stacks of earlier checks that died before their ``down -v`` (their ports, their data)."""
    out = run(
        "docker", "ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}', capture=True
    ).stdout
    for project in sorted({p for p in out.split() if p.startswith("roombuscheck")}):
        say(f"removing the leftover stack {project}")
        run(
            *compose,
            "-p",
            project,
            "-f",
            str(ROOT / "compose.yaml"),
            "down",
            "-v",
            "--remove-orphans",
            capture=True,
            check=False,
            timeout=180,
        )


@contextlib.contextmanager
def locked() -> Iterator[None]:
    with LOCK.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run the stack on the `cluster` profile (nats-1..3, deploy/cluster.env)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("compose check: needs root (installs and starts dockerd)", file=sys.stderr)
        return 3
    with locked(), tempfile.TemporaryDirectory(prefix="roombus-compose-") as tmp:
        workdir = Path(tmp)
        ensure_packages()
        compose = compose_cmd()
        assert compose is not None
        dockerd = None if engine_up() else start_dockerd(workdir)
        stack: Stack | None = None
        ok = False
        try:
            remove_leftovers(compose)
            ensure_base(workdir)
            no_standin = ensure_standins(workdir)
            lb_port = 8080 if port_free(8080) else free_port()
            stats_port = 8404 if port_free(8404) else free_port()
            env = {
                "LB_BIND": "127.0.0.1",
                "LB_PORT": str(lb_port),
                "LB_STATS_PORT": str(stats_port),
                "NATS_BIND": "127.0.0.1",
                "NATS_HOST_PORT": str(free_port()),
                "NATS_MONITOR_HOST_PORT": str(free_port()),
                "MAX_CONNECTIONS_PER_IP": str(PER_IP),
            }
            nodes: list[str] = []
            if args.cluster:
                for line in (ROOT / "deploy" / "cluster.env").read_text().splitlines():
                    if line.strip() and not line.startswith("#"):
                        key, _, value = line.partition("=")
                        env[key.strip()] = value.strip()
                env["COMPOSE_PROFILES"] = "cluster"
                nodes = ["nats-1", "nats-2", "nats-3"]
            project = f"roombuscheck{os.getpid()}"
            stack = Stack(compose, project, env)
            t = time.monotonic()
            stack("build", capture=True, timeout=900)
            say(f"built roombus:local ({time.monotonic() - t:.1f}s)")
            check_image("roombus:local")
            services = available_services("roombus:local")
            say(f"services in the image: {sorted(services)}")
            core = {"gateway", "history", "presence"} - services
            assert not core, f"`roombus <service> --help` fails in the image for {sorted(core)}"
            config = stack("--profile", "tools", "config", "--services", capture=True).stdout
            assert "nats-box" in config.split(), "the tools profile has no nats-box"
            if no_standin:
                say(f"no stand-in (no package on reachable registries): {no_standin}")
            t = time.monotonic()
            stack(
                "up",
                "-d",
                "--no-build",
                "--scale",
                f"gateway={GATEWAYS}",
                *sorted(services | {"nats", "redis", "lb", *nodes}),
                capture=True,
                timeout=300,
            )
            say(f"up -d --scale gateway={GATEWAYS} ({time.monotonic() - t:.1f}s), lb on :{lb_port}")
            report = e2e(stack, lb_port, stats_port, services)
            ok = True
            say(f"PASSED in {time.monotonic() - T0:.0f}s: {report}")
        finally:
            if stack is not None and not ok:
                logs = stack("logs", "--no-color", "--tail", "40", capture=True, check=False)
                print(logs.stdout[-8000:], flush=True)
            if stack is not None and not args.keep:
                stack("down", "-v", "--remove-orphans", capture=True, check=False, timeout=180)
                say("down -v")
            if dockerd is not None and not args.keep:
                stop_dockerd(dockerd)
                say("stopped the dockerd this check started")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
