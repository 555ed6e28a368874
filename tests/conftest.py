"""Fixtures: a real nats-server (and redis-server) on free ports, roombus services as processes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import client as ws_client
from tests.support.cluster import NatsCluster, start_cluster
from tests.support.procs import NatsServer, RedisServer, ServiceProc, until


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One JetStream-enabled nats-server for the session; tests use unique rooms."""
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats-session")).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test's own, for tests that restart it or need clean JetStream."""
    server = NatsServer(store_dir=tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nats-server nodes forming a JetStream cluster, meta leader elected."""
    cluster = start_cluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def room() -> str:
    """A room name no other test uses."""
    return "r" + uuid.uuid4().hex[:12]


ServiceFactory = Callable[..., ServiceProc]


def service_env(service: str, url: str, env: dict[str, object]) -> dict[str, str]:
    """The environment of a test's ``roombus <service>`` on the server at ``url``.

    Tests blast hundreds of frames a second; the rate-limit tests set their own. Most run
    with ROOMBUS_AUTH=none and exchange DMs (the tests of the default set it false).
    """
    defaults = (
        {
            "RATE_LIMIT": "100000",
            "RATE_BURST": "100000",
            "HISTORY_RATE": "100000",
            "HISTORY_BURST": "100000",
            "INSECURE_DMS": "true",
        }
        if service == "gateway"
        else {}
    )
    return {"NATS_URL": url, "LOG_LEVEL": "info", **defaults, **{k: str(v) for k, v in env.items()}}


@pytest.fixture
def services(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start ``roombus <service>`` processes; every one is stopped after the test.

    ``services("gateway", nats)`` starts a gateway on a free port against that server;
    keyword arguments become environment settings (``MAX_ROOMS=2``). Messages reach clients
    only once stored, so the first gateway of a test on a server also starts a history
    service there, unless ``history=False`` (or the test started one itself).
    """
    started: list[ServiceProc] = []
    with_history: set[str] = set()

    def start(
        service: str,
        nats: NatsServer | NatsCluster | str,
        *args: str,
        wait: bool = True,
        history: bool = True,
        **env: object,
    ) -> ServiceProc:
        url = nats if isinstance(nats, str) else nats.url
        if service == "history":
            with_history.add(url)
        elif service == "gateway" and history and url not in with_history:
            start("history", nats, EPHEMERAL_ROOMS=str(env.get("EPHEMERAL_ROOMS", "")))
        proc = ServiceProc(
            service, env=service_env(service, url, env), logdir=tmp_path / "logs", args=list(args)
        )
        started.append(proc)
        return proc.start(wait_ready=wait)

    yield start
    for proc in started:
        if proc.alive():
            proc.kill()


@dataclass
class Stack:
    """A nats-server of its own with a history service, two gateways (and, for
    ``shared_presence_stack``, a presence service), all with the settings ``services`` gives:
    started once per worker process and shared by the tests that need nothing else.

    A test on it uses its own rooms (the ``room`` fixture) and users no other test of the stack
    writes DMs to; it reads counters as deltas, and never stops, restarts or reconfigures the
    shared processes (one it needs with other settings it starts itself, with ``services`` on
    ``stack.nats``, ``history=False``). A test's clients are closed when it ends, and the
    gateways must count them gone before the next test gets the stack.
    """

    nats: NatsServer
    history: ServiceProc
    gateways: list[ServiceProc]
    presence: ServiceProc | None = None

    @property
    def gateway(self) -> ServiceProc:
        return self.gateways[0]

    @property
    def procs(self) -> list[ServiceProc]:
        return [self.history, *self.gateways, *([self.presence] if self.presence else [])]

    @classmethod
    def start(cls, workdir: Path, presence: bool) -> Stack:
        nats = NatsServer(store_dir=workdir / "nats").start()

        def proc(service: str) -> ServiceProc:
            env = service_env(
                service, nats.url, {"EPHEMERAL_ROOMS": ""} if service == "history" else {}
            )
            return ServiceProc(service, env=env, logdir=workdir / "logs")

        stack = cls(nats, proc("history"), [proc("gateway"), proc("gateway")])
        if presence:
            stack.presence = proc("presence")
        try:
            # As ``services`` does: one after the other, storage (and presence) first.
            presence_proc = [stack.presence] if stack.presence is not None else []
            for service in [stack.history, *presence_proc, *stack.gateways]:
                service.start()
        except BaseException:
            stack.stop()
            raise
        return stack

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        self.nats.stop()

    def dead(self) -> list[ServiceProc]:
        return [p for p in self.procs if not p.alive()]


@pytest.fixture(scope="session")
def _stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, Stack]]:
    """The shared stacks of this worker process, started on first use (by presence or not)."""
    stacks: dict[bool, Stack] = {}
    yield stacks
    for stack in stacks.values():
        stack.stop()


async def _use_stack(
    stacks: dict[bool, Stack], tmp_path_factory: pytest.TempPathFactory, presence: bool
) -> AsyncIterator[Stack]:
    stack = stacks.get(presence)
    if stack is None:
        name = "stack-presence" if presence else "stack"
        stack = stacks[presence] = Stack.start(tmp_path_factory.mktemp(name), presence)
    yield stack
    # This test's clients go now (not after this check, as ``_close_clients`` would), and
    # the gateways must count them gone: the next test starts with none connected.
    await ws_client.close_all()
    problem = ""
    if not stack.dead():
        try:
            await until(
                lambda: all(
                    g.metric("roombus_gateway_open_connections") == 0 for g in stack.gateways
                ),
                15,
                "the shared gateways to count this test's connections closed",
            )
        except AssertionError as exc:
            problem = f"{exc}: a connection of this test was left open"
    dead = stack.dead()
    if dead:
        problem = "a shared service died during this test:\n" + "\n".join(
            f"--- {p.service} :{p.port} ---\n{p.log()}" for p in dead
        )
    if problem:  # said here, at the test that did it; the next test gets a new stack
        del stacks[presence]
        stack.stop()
        raise AssertionError(problem)


@pytest.fixture
async def shared_stack(
    _stacks: dict[bool, Stack], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The worker's shared history + two gateways (no presence service), see ``Stack``."""
    async for stack in _use_stack(_stacks, tmp_path_factory, presence=False):
        yield stack


@pytest.fixture
async def shared_presence_stack(
    _stacks: dict[bool, Stack], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The worker's shared history + presence + two gateways, see ``Stack``."""
    async for stack in _use_stack(_stacks, tmp_path_factory, presence=True):
        yield stack


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await ws_client.close_all()
