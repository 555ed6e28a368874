"""Unset *_REPLICAS: min(3, the cluster size the server reports), never lowering a stream."""

from __future__ import annotations

from typing import Any, cast

import pytest
from nats.aio.client import Client

from services.jetstream import _resolve, cluster_size, default_replicas


class FakeClient:
    def __init__(self, info: dict[str, Any], servers: int = 1) -> None:
        self._server_info = info
        self.servers = ["nats://x"] * servers


def nc(info: dict[str, Any], servers: int = 1) -> Client:
    return cast(Client, FakeClient(info, servers))


@pytest.mark.parametrize(
    ("info", "servers", "size"),
    [
        ({"server_name": "solo"}, 1, 1),  # no cluster field: a single server
        ({"server_name": "solo"}, 3, 1),  # three URLs given, still one server answering
        ({"cluster": "c", "connect_urls": ["a:4222", "b:4222", "c:4222"]}, 1, 3),
        ({"cluster": "c", "connect_urls": ["a:4222", "a:4222"]}, 1, 1),
        ({"cluster": "c", "connect_urls": [f"n{i}:4222" for i in range(5)]}, 1, 5),
        ({"cluster": "c"}, 3, 3),  # no_advertise: the URLs the client was given
    ],
)
def test_cluster_size_from_the_servers_info(info: dict[str, Any], servers: int, size: int) -> None:
    assert cluster_size(nc(info, servers)) == size
    assert default_replicas(nc(info, servers)) == min(3, size)


def test_a_set_value_wins_and_unset_never_lowers_an_existing_stream() -> None:
    single = nc({"server_name": "solo"})
    three = nc({"cluster": "c", "connect_urls": ["a:1", "b:1", "c:1"]})
    assert _resolve(1, 3, three) == 1  # explicit R1 on a cluster: honoured
    assert _resolve(5, None, single) == 5  # explicit: the server will say if it cannot
    assert _resolve(None, None, three) == 3
    assert _resolve(None, 1, three) == 3  # R1 -> R3 when a deployment moves onto a cluster
    assert _resolve(None, 3, single) == 3  # a node that sees only itself yet: keep R3
    assert _resolve(0, None, single) == 1  # 0: KeyValueConfig's "unset"
