"""A connected peer is held to what its connection is: it cannot speak for another client,
make a worker dial without bound, or feed the model an input it does not accept (in-memory
transport, real worker service)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import trio

from butterfly import AsyncButterfly
from butterfly.errors import ApiError, NetworkError
from butterfly.protocol import (
    PROTOCOL_VERSION,
    Activation,
    Handshake,
    Hello,
    InputSpec,
)
from butterfly.protocol.codec import array_to_wire
from butterfly.transport import MemoryNetwork, open_peer
from butterfly.worker.service import MAX_PEERS
from tests.inmemory import FAST, local_forward, start_workers
from tests.waiting import wait_until


def _hello(node: str, role: str, **fields: object) -> Hello:
    return Hello(version=PROTOCOL_VERSION, node_id=node, role=role, **fields)  # type: ignore[arg-type]


async def test_an_activation_naming_another_coordinator_closes_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="butterfly")
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with (
            net.connect("mem://w0") as conn,
            open_peer(conn, max_message_size=1 << 20, send_queue_size=4, dialer=True) as peer,
        ):
            local = _hello("mallory", "coordinator")
            await peer.handshake(
                local, Handshake(local, expect_roles=frozenset({"worker"})), timeout=5
            )
            await peer.send(
                Activation(
                    request_id=1, epoch=0, stage=0, origin="alice", layer=0, compute_s=0.0,
                    session=0, position=0, keep=(),
                    tensor=array_to_wire(np.zeros((1, 64), dtype=np.float32)),
                )
            )  # fmt: skip
            # At once, long before the missing heartbeats would get the link dropped.
            with trio.fail_after(0.5), pytest.raises(NetworkError):
                while True:
                    await peer.receive()
        assert "coordinator 'mallory' sent an Activation for 'alice'" in caplog.text
        nursery.cancel_scope.cancel()


async def test_a_member_hello_listing_thousands_of_peers_is_followed_only_up_to_the_cap() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        (worker,) = await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with (
            net.connect("mem://w0") as conn,
            open_peer(conn, max_message_size=1 << 20, send_queue_size=4, dialer=True) as peer,
        ):
            listed = tuple(f"mem://ghost{i}" for i in range(2000))
            local = _hello("m", "member", address="mem://m", peers=listed)
            await peer.handshake(
                local, Handshake(local, expect_roles=frozenset({"worker"})), timeout=5
            )
            await wait_until(lambda: len(worker._announced) >= MAX_PEERS, what="peers followed")
            await trio.testing.wait_all_tasks_blocked()
            assert len(worker._announced) == MAX_PEERS
            assert len(worker.peers) <= MAX_PEERS
        nursery.cancel_scope.cancel()


async def test_the_first_stage_refuses_an_input_the_client_did_not_check() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            b._system.coordination.input_spec = InputSpec()  # a client that checks nothing
            with pytest.raises(
                ApiError,
                match=r"input has shape \(2, 63\) and dtype float32; the model expects shape \(\*, \.\.\., 64\)",
            ):
                await b.infer(torch.zeros(2, 63))
            x = torch.randn(2, 64)  # and the cluster keeps serving
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()
