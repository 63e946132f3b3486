"""Local worker processes: the embedded default behind ``Butterfly.local``, the demo and the e2e tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .credentials import SECRET_ENV
from .errors import ApiError, NetworkError

__all__ = ["LocalCluster", "WorkerProcess", "model_import_path"]

_READY = re.compile(r"^butterfly worker ready on (\S+) node (\S+)")


def model_import_path(model: str | Callable[..., Any]) -> str:
    """``package.module:callable`` for a model given as a path or as a module-level function."""
    if isinstance(model, str):
        if ":" not in model:
            raise ApiError(
                f"model {model!r} is not an import path; expected 'package.module:callable'"
            )
        return model
    if callable(model):
        module = getattr(model, "__module__", None)
        qualname = getattr(model, "__qualname__", "")
        if not module or module == "__main__" or "<" in qualname:
            raise ApiError(
                f"model {model!r} is not importable by worker processes; define it at module "
                "level in an importable module, or pass 'package.module:callable'"
            )
        return f"{module}:{qualname}"
    raise ApiError(
        f"model must be an import path or a module-level factory function, got {type(model).__name__}; "
        "worker processes build the model themselves"
    )


class WorkerProcess:
    """One ``python -m butterfly.worker`` subprocess; its stderr goes to a log file."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        """``launcher`` prefixes the command (e.g. ``ip netns exec NS``); it must exec the
        worker, so that the process and its signals are the worker's own."""
        self.args = list(args)
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - open as long as the process runs
            prefix="butterfly-worker-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "butterfly.worker", *self.args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.address = ""
        self.node_id = ""
        self._terminating = False

    def wait_ready(self, timeout: float) -> str:
        """Read stdout until the ready line; raise ``NetworkError`` with the worker's log otherwise."""
        assert self.proc.stdout is not None
        found: list[str] = []

        def read(stream: IO[str]) -> None:
            for line in stream:
                match = _READY.match(line)
                if match and not found:
                    found.append(match[1])
                    found.append(match[2])
                    break
            # Keep draining so a chatty worker never blocks on a full pipe.
            for _ in stream:
                pass

        reader = threading.Thread(target=read, args=(self.proc.stdout,), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while not found and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.02)
        if not found:
            self.stop()
            raise NetworkError(
                f"worker {' '.join(self.args)} did not become ready within {timeout:g} s "
                f"(exit code {self.proc.returncode}): {self.log_tail()}"
            )
        self.address, self.node_id = found
        return self.address

    def log_tail(self, lines: int = 5) -> str:
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to say goodbye."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def suspend(self) -> None:
        """SIGSTOP: the process freezes with its sockets open (a hung machine, a long GC pause)."""
        if self.alive():
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`suspend`."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        """Send SIGTERM once: a second one during shutdown would kill the worker uncleanly."""
        if self.alive() and not self._terminating:
            self._terminating = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class LocalCluster:
    """Start ``workers`` worker processes on loopback; stop them all on ``close``.

    The first worker starts alone; the others name it in ``--peers``, so a
    coordinator can discover everyone from any one address.
    """

    def __init__(
        self,
        model: str | Callable[..., Any],
        workers: int = 3,
        *,
        weights: str | os.PathLike[str] | None = None,
        threads: int | None = 1,
        device: str = "cpu",
        config: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 120.0,
        extra_args: Sequence[str] = (),
        worker_env: Sequence[Mapping[str, str]] = (),
        secret: str | None = None,
    ) -> None:
        """``secret``: the workers' shared secret (passed in their environment, never on
        their command line, which any user of the machine can read)."""
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ApiError(f"workers must be a positive integer, got {workers!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ApiError(f"threads must be a positive integer or None, got {threads!r}")
        self.model = model_import_path(model)
        self.options: list[str] = ["--model", self.model, "--device", device]
        if weights is not None:
            self.options += ["--weights", os.fspath(weights)]
        if threads is not None:
            self.options += ["--threads", str(threads)]
        if config is not None:
            self.options += ["--config", os.fspath(config)]
        self.options += list(extra_args)
        self.host = host
        self.secret = secret
        self.startup_timeout = startup_timeout
        self.processes: list[WorkerProcess] = []
        envs = [dict(e) for e in worker_env] + [{}] * (workers - len(worker_env))
        try:
            first = self.spawn(env=envs[0])
            rest = [
                self.spawn(peers=[first.address], wait=False, env=envs[i])
                for i in range(1, workers)
            ]
            for proc in rest:
                proc.wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise

    def spawn(
        self,
        *,
        peers: Sequence[str] = (),
        wait: bool = True,
        listen: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> WorkerProcess:
        """Start one more worker (e.g. to replace a killed one); ``env`` adds environment variables."""
        args = ["--listen", listen or f"{self.host}:0", *self.options]
        if peers:
            args += ["--peers", ",".join(peers)]
        extra = {**(env or {}), **({SECRET_ENV: self.secret} if self.secret else {})}
        proc = WorkerProcess(args, env={**os.environ, **extra} if extra else None)
        self.processes.append(proc)
        if wait:
            proc.wait_ready(self.startup_timeout)
        return proc

    def restart(self, proc: WorkerProcess) -> WorkerProcess:
        """Kill ``proc`` if it still runs and start a new worker on the same address."""
        proc.kill()
        host_port = proc.address.removeprefix("ws://")
        return self.spawn(listen=host_port, peers=[a for a in self.addresses if a != proc.address])

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.processes if p.address and p.alive()]

    def close(self) -> None:
        for proc in self.processes:
            proc.terminate()
        for proc in self.processes:
            proc.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
