"""A connected peer is held to what its connection is: it cannot speak for another client,
make a worker dial without bound, or feed the model an input it does not accept (in-memory
transport, real worker service)."""

from __future__ import annotations

import contextlib
import itertools
import logging

import numpy as np
import pytest
import torch
import trio

from butterfly import AsyncButterfly
from butterfly.config import load_config
from butterfly.errors import ApiError, NetworkError
from butterfly.model import ModelSource
from butterfly.protocol import (
    PROTOCOL_VERSION,
    Activation,
    Assign,
    Error,
    Handshake,
    Heartbeat,
    Hello,
    InputSpec,
    StageSpec,
)
from butterfly.protocol.codec import array_to_wire
from butterfly.transport import Connection, MemoryNetwork, Peer, open_peer
from butterfly.worker import WorkerService
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
                    session=0, position=0, keep=(), trace=(), report=False,
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


async def _coordinator(
    net: MemoryNetwork, address: str, node: str
) -> tuple[contextlib.AsyncExitStack, Peer]:
    """A hand-driven coordinator connection (one that may send what the library never
    would), heartbeating so that the worker keeps it."""
    stack = contextlib.AsyncExitStack()
    conn = await stack.enter_async_context(net.connect(address))
    peer = await stack.enter_async_context(
        open_peer(conn, max_message_size=1 << 20, send_queue_size=4, dialer=True)
    )
    local = _hello(node, "coordinator", heartbeat_interval=0.2)
    await peer.handshake(local, Handshake(local, expect_roles=frozenset({"worker"})), timeout=5)
    nursery = await stack.enter_async_context(trio.open_nursery())
    stack.callback(nursery.cancel_scope.cancel)

    async def heartbeat() -> None:
        for seq in itertools.count():
            await peer.send(Heartbeat(seq=seq))
            await trio.sleep(0.2)

    nursery.start_soon(heartbeat)
    return stack, peer


async def test_a_placement_naming_an_unreachable_upstream_does_not_hold_up_other_coordinators() -> (
    None
):
    # Linking to the silent upstream holds mallory's placement for 2 × connect_timeout (6 s).
    config = load_config({**FAST, "network": {"connect_timeout": 3.0}})
    net = MemoryNetwork()
    dialled = trio.Event()

    async def silent(conn: Connection) -> None:  # accepts, then never answers the handshake
        dialled.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        await nursery.start(net.serve, "mem://silent", silent)
        (worker,) = await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1, config=config)
        stack, mallory = await _coordinator(net, "mem://w0", "mallory")
        async with stack:
            stages = (
                StageSpec(index=0, start=0, stop=3, node_id="ghost", address="mem://silent"),
                StageSpec(index=1, start=3, stop=6, node_id=worker.node_id, address="mem://w0"),
            )
            await mallory.send(Assign(epoch=1, stages=stages))
            await dialled.wait()  # the worker is waiting on the silent upstream
            with trio.fail_after(3.0):  # before: alice's placement waited for mallory's (6 s)
                async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
                    x = torch.randn(2, 64)
                    torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            with trio.fail_after(15):
                while not isinstance(reply := await mallory.receive(), Error):
                    pass
            assert reply.message == "cannot link to upstream worker 'ghost' at mem://silent"
            # The failed placement is forgotten and holds nothing: its stage (layers 3-5) is
            # released (alice, gone by now, released hers when she left).
            assert 1 not in worker._plans["mallory"]
            assert worker._runtimes == {}
        nursery.cancel_scope.cancel()


async def test_max_memory_counts_the_stages_every_coordinator_placed() -> None:
    # mlp: three Linear layers of 16,640 bytes (49,920 in all): one copy fits in 80,000,
    # a second one split differently does not.
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        worker = WorkerService(
            ModelSource("butterfly.model.zoo:mlp"),
            transport=net,
            listen="mem://w0",
            config=load_config(FAST),
            max_memory=80_000,
        )
        await nursery.start(worker.run)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            x = torch.randn(2, 64)
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            stack, mallory = await _coordinator(net, "mem://w0", "mallory")
            async with stack:
                stages = tuple(
                    StageSpec(index=i, start=a, stop=z, node_id=worker.node_id, address="mem://w0")
                    for i, (a, z) in enumerate([(0, 3), (3, 6)])
                )
                await mallory.send(Assign(epoch=1, stages=stages))
                with trio.fail_after(10):
                    while not isinstance(reply := await mallory.receive(), Error):
                        pass
                assert reply.message == (
                    f"placement epoch 1 gives worker {worker.node_id} 99840 bytes of weights "
                    "(with the stages other coordinators placed here); its --max-memory is 80000"
                )
                assert sorted(worker._runtimes) == [(0, 6)]
                torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()
