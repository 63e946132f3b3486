"""``python -m butterfly.api``: the HTTP gateway in front of a cluster.

Prints ``butterfly gateway ready on http://HOST:PORT model NAME`` once the model is placed
and the port listens; SIGINT or SIGTERM shut it down (exit code 0). Bad flags exit 2 with
a one-line reason.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

import trio

from .._errors import unwrap_groups
from ..config import load_config
from ..credentials import is_loopback, load_secret
from ..errors import ButterflyError
from ..transport.websocket import parse_address
from . import load_api_keys, serve

PROG = "python -m butterfly.api"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT to serve HTTP on")
    p.add_argument(
        "--peers", required=True, help="comma-separated worker addresses (ws://HOST:PORT)"
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help="the cluster's shared secret (default: network.secret_file, else BUTTERFLY_SECRET)",
    )
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="API keys clients must send as 'Authorization: Bearer KEY', one per line",
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="the model's directory with tokenizer.json, or its .gguf file (text prompts "
        "and chat need it)",
    )
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return p


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        host, _ = parse_address(args.listen)
        config = load_config(args.config)
        peers = [p.strip() for p in args.peers.split(",") if p.strip()]
        secret = load_secret(secret_file=args.secret_file or config.network.secret_file)
        api_keys = load_api_keys(args.api_key_file) if args.api_key_file else frozenset()
        if args.tokenizer:
            from ..text import Tokenizer

            tokenizer = Tokenizer.load(args.tokenizer)
        else:
            tokenizer = None
    except ButterflyError as exc:
        _fail(str(exc), 2)
    if not api_keys and not is_loopback(host):
        logging.getLogger("butterfly.api").warning(
            "no --api-key-file: anyone who reaches %s can use the model", args.listen
        )

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def shutdown() -> None:
                async for _ in signals:
                    return

            async with trio.open_nursery() as nursery:
                url, gateway = await nursery.start(
                    lambda task_status: serve(
                        peers,
                        listen=args.listen,
                        config=config,
                        secret=secret,
                        tokenizer=tokenizer,
                        api_keys=api_keys,
                        shutdown=shutdown,
                        task_status=task_status,
                    )
                )
                print(f"butterfly gateway ready on {url} model {gateway.model_id}", flush=True)

    try:
        with unwrap_groups():
            trio.run(run)
    except ButterflyError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
