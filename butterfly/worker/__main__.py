"""Command line of a worker process.

    python -m butterfly.worker --listen 127.0.0.1:7070 --model butterfly.model.zoo:small_transformer

Prints one line starting with ``butterfly worker ready`` when it serves; SIGINT or
SIGTERM shut it down with exit code 0. Bad flags or a model that cannot be loaded
exit non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

import attrs
import torch
import trio

from .._errors import unwrap_groups
from ..config import ButterflyConfig, load_config
from ..credentials import is_loopback, load_secret
from ..errors import ButterflyError
from ..metrics.http import serve_http
from ..model import ModelSource
from ..transport import WebsocketTransport, parse_address
from .metrics import routes
from .service import WorkerService

PROG = "python -m butterfly.worker"
log = logging.getLogger("butterfly.worker")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not usage + error: operators grep logs for it.
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Serve stages of a PyTorch model for Butterfly coordinators.",
    )
    p.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="address to accept connections on, e.g. 0.0.0.0:7070 (port 0 picks a free port)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="also serve Prometheus /metrics and /health over plain HTTP on this address "
        "(read-only; e.g. 127.0.0.1:9100)",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="IMPORT_PATH|hf:DIR|gguf:FILE",
        help="'package.module:callable' returning a torch.nn.Sequential; without --weights it "
        "must be deterministic (seed its RNG) so that every worker builds the same weights. "
        "Or 'hf:/path/to/dir': a Hugging Face model directory (config.json and "
        "*.safetensors, as save_pretrained writes it; GPT-2, Llama, BERT), read offline. "
        "Or 'gguf:/path/model.gguf': a llama.cpp GGUF file of a Llama (F32, F16, BF16, "
        "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and K-quants); each worker dequantises only its layers",
    )
    p.add_argument(
        "--peers",
        default="",
        metavar="ws://H:P,...",
        help="comma-separated addresses of other workers; they learn about this one and "
        "coordinators discover the whole cluster from any of them",
    )
    p.add_argument(
        "--weights",
        type=Path,
        metavar="FILE",
        help="safetensors file with the model's state_dict (keys like '0.weight')",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="element type of the weights of an hf: or gguf: model (default float32)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device for the stages: cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch intra-op threads (default: torch's choice)",
    )
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="most memory this worker's weights may use, e.g. 512MiB or 2GB (default: the "
        "device's free memory); placement respects it and larger assignments are refused",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--advertise",
        metavar="ws://H:P",
        help="address other nodes should use to reach this worker (default: the bound --listen address)",
    )
    p.add_argument("--node-id", help="stable name of this worker (default: random)")
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help="file holding the cluster's shared secret (default: network.secret_file, else the "
        "BUTTERFLY_SECRET environment variable); every peer must prove it before anything "
        "it sends is decoded",
    )
    p.add_argument(
        "--tls-cert", metavar="PEM", help="serve wss:// (TLS) with this certificate chain"
    )
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA certificates that wss:// peers must be signed by (default: the system's)",
    )
    p.add_argument(
        "--tls-client-auth",
        action="store_true",
        help="mutual TLS: accept only clients whose certificate --tls-ca signed",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without a secret: anyone who can "
        "reach the port can then drive this worker and read what it computes",
    )
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return p


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional unit (B, KB, MB, GB, TB, KiB … TiB)."""
    number = text.strip().rstrip("bBiIkKmMgGtT ")
    unit = text.strip()[len(number) :].strip().lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise ValueError(f"{text!r} is not a size; expected e.g. 512MiB, 2GB or 1000000")
    return int(value * _UNITS[unit])


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _with_tls(config: ButterflyConfig, args: argparse.Namespace) -> ButterflyConfig:
    """The config with the --tls-* flags (they override the file's network.tls_* keys)."""
    given = {
        key: value
        for key, value in {
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "tls_ca": args.tls_ca,
            "tls_client_auth": args.tls_client_auth or None,
        }.items()
        if value is not None
    }
    return attrs.evolve(config, network=attrs.evolve(config.network, **given))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        host, port = parse_address(args.listen)
        metrics_at = parse_address(args.metrics_listen) if args.metrics_listen else None
        config = load_config(args.config)
        peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
        for peer in peers:
            parse_address(peer)
        if args.advertise:
            parse_address(args.advertise)
        secret = load_secret(secret_file=args.secret_file or config.network.secret_file)
        config = _with_tls(config, args)
        transport = WebsocketTransport(config.network)
    except ButterflyError as exc:
        _fail(str(exc), 2)
    if secret is None and not is_loopback(host):
        if not args.insecure:
            _fail(
                f"--listen {args.listen} accepts connections from other machines, and no shared "
                "secret is set: give --secret-file FILE (or BUTTERFLY_SECRET), or --insecure to "
                "let anyone who reaches the port drive this worker",
                2,
            )
        log.warning(
            "insecure: listening on %s without a shared secret; anyone who reaches it can "
            "drive this worker and read what it computes",
            args.listen,
        )
    if args.threads is not None:
        if args.threads < 1:
            _fail(f"--threads must be at least 1, got {args.threads}", 2)
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        _fail(f"--device {args.device!r} is not a torch device: {exc}", 2)
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {args.device} asked for, but torch sees no CUDA device", 2)
    dtype: torch.dtype | None = None
    if args.model.startswith("hf:"):
        directory = Path(args.model[len("hf:") :]).expanduser()
        if not directory.is_dir():
            _fail(f"--model {args.model!r}: {str(directory)!r} is not a directory", 2)
        if args.weights is not None:
            _fail("--weights does not apply to an hf: model; it reads its own directory", 2)
        dtype = getattr(torch, args.dtype or "float32")
    elif args.model.startswith("gguf:"):
        file = Path(args.model[len("gguf:") :]).expanduser()
        if not file.is_file():
            _fail(f"--model {args.model!r}: {str(file)!r} is not a file", 2)
        if args.weights is not None:
            _fail("--weights does not apply to a gguf: model; it reads its own file", 2)
        dtype = getattr(torch, args.dtype or "float32")
    elif args.dtype is not None:
        _fail("--dtype applies to hf: and gguf: models only", 2)
    if args.weights is not None and not args.weights.is_file():
        _fail(f"--weights {str(args.weights)!r} is not a file", 2)
    try:
        max_memory = parse_size(args.max_memory) if args.max_memory is not None else None
    except ValueError as exc:
        _fail(f"--max-memory {exc}", 2)

    source = ModelSource(args.model, weights=args.weights, device=device, dtype=dtype)
    worker = WorkerService(
        source,
        transport=transport,
        listen=f"{transport.scheme}://{host}:{port}",
        config=config,
        peers=peers,
        advertise=args.advertise,
        node_id=args.node_id,
        max_memory=max_memory,
        secret=secret,
    )
    try:
        with unwrap_groups():
            trio.run(_serve, worker, metrics_at)
    except ButterflyError as exc:
        _fail(str(exc))


async def _serve(worker: WorkerService, metrics_at: tuple[str, int] | None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            if metrics_at is not None:
                # Before the model loads: /health says "loading" meanwhile.
                host, port = await nursery.start(serve_http, *metrics_at, routes(worker))
                print(f"butterfly worker metrics on http://{host}:{port}/metrics", flush=True)
            address = await nursery.start(worker.run)
            info = worker.info
            assert info is not None
            print(
                f"butterfly worker ready on {address} node {worker.node_id} model {info.name} "
                f"({info.num_layers} layers, fingerprint {info.fingerprint[:12]}, "
                f"{torch.get_num_threads()} threads, device {worker.source.device}, "
                f"{'shared-secret' if worker.secret is not None else 'no'} authentication)",
                flush=True,
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    main()
