"""Live fuzzing of a running worker: ``python -m tests.fuzz_worker --frames 100000``.

Starts one worker (with a shared secret, as a deployment would) and opens connection after
connection to it, each sending a websocket upgrade and then a burst of random frames: valid
binary frames, fragments, pings and closes with random codes, unmasked frames, frames with
reserved bits, bogus lengths, random bytes, authentication offers and proofs that are almost
right, and bit-flipped copies of all of these. After every burst the connection must be
closed by the worker or still be answered within a deadline (no hang), and the worker must
still serve a real client (checked every ``--check-every`` connections) and must not have
exited (no crash). Prints the counts; exits 1 on any crash or hang.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import time

import torch

from butterfly import Butterfly, LocalCluster
from butterfly.protocol.auth import OFFER_MAGIC, PROOF_MAGIC
from butterfly.transport.rfc6455 import Opcode, encode_header, mask

SECRET = "the fuzzed worker's shared secret"
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def frame(rng: random.Random, opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    key = rng.randbytes(4)
    body = bytearray(payload)
    mask(body, key)
    return encode_header(Opcode(opcode), len(payload), fin=fin, mask_key=key) + bytes(body)


def random_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return frame(rng, 0x2, rng.randbytes(rng.choice([0, 1, 41, 125, 126, 4096, 70000])))
    if kind == 1:
        return frame(rng, 0x2, OFFER_MAGIC + rng.randbytes(32))
    if kind == 2:
        return frame(rng, 0x2, PROOF_MAGIC + rng.randbytes(32))
    if kind == 3:
        return frame(rng, 0x0, rng.randbytes(rng.randrange(64)), fin=rng.random() < 0.5)
    if kind == 4:
        return frame(rng, 0x9, rng.randbytes(rng.randrange(126)))
    if kind == 5:
        code = rng.choice([999, 1000, 1002, 1005, 1006, 1015, 3000, 65535, rng.randrange(65536)])
        return frame(rng, 0x8, struct.pack("!H", code) + rng.randbytes(rng.randrange(8)))
    if kind == 6:  # unmasked, reserved bits, unknown opcodes
        return bytes([rng.randrange(256), rng.randrange(128)]) + rng.randbytes(rng.randrange(32))
    if kind == 7:  # a length far beyond what follows
        return bytes([0x82, 0xFF]) + rng.randbytes(8) + rng.randbytes(4)
    if kind == 8:
        return rng.randbytes(rng.randrange(1, 64))
    data = bytearray(random_frame(rng))  # a mutated frame
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def burst(address: tuple[str, int], frames: list[bytes], deadline: float) -> bool:
    """Send one connection's frames; True if the worker closed it or kept answering in time."""
    with socket.create_connection(address, timeout=deadline) as s:
        s.sendall(UPGRADE)
        try:
            for f in frames:
                s.sendall(f)
            s.shutdown(socket.SHUT_WR)
            while s.recv(1 << 16):  # until the worker closes its side
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed by the worker while we were still sending: fine
        except TimeoutError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_worker", description=__doc__)
    parser.add_argument("--frames", type=int, default=100_000, help="frames to send in all")
    parser.add_argument("--per-connection", type=int, default=20, help="frames per connection")
    parser.add_argument("--check-every", type=int, default=500, help="connections between checks")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    sent = connections = hangs = checks = 0
    started = time.monotonic()
    config = {"network": {"connect_timeout": 2.0}}
    with LocalCluster("butterfly.model.zoo:mlp", workers=1, secret=SECRET) as cluster:
        host, port = cluster.addresses[0].removeprefix("ws://").rsplit(":", 1)
        address = (host, int(port))
        x = torch.randn(1, 64)
        with Butterfly.connect(cluster.addresses, secret=SECRET, config=config) as client:
            expected = client.infer(x)
            while sent < args.frames:
                frames = [random_frame(rng) for _ in range(args.per_connection)]
                if not burst(address, frames, deadline=10.0):
                    hangs += 1
                sent += len(frames)
                connections += 1
                if connections % args.check_every == 0:
                    assert torch.equal(client.infer(x), expected)
                    checks += 1
                    print(f"{sent} frames, {connections} connections, {hangs} hangs", flush=True)
            assert torch.equal(client.infer(x), expected)
        crashed = not cluster.processes[0].alive()
    elapsed = time.monotonic() - started
    print(
        f"fuzzed a worker with {sent} frames over {connections} connections in {elapsed:.0f} s: "
        f"crashes {int(crashed)}, hangs {hangs}, served correctly after {checks + 1} checks"
    )
    return 1 if crashed or hangs else 0


if __name__ == "__main__":
    sys.exit(main())
