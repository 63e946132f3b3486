"""Memory: a model larger than any worker's ``--max-memory`` runs across workers that each
hold only their own weights.

    python -m bench.memory [--hidden 1024] [--layers 12] [--workers 3] [--json out.json]

A Llama-shaped model with random weights (saved with ``save_pretrained`` as safetensors,
float32) is served by ``--workers`` worker processes whose ``--max-memory`` is 40 % of the
model's weight bytes, so none could hold it alone. After a forward and a short greedy
generation, each worker's peak resident memory (VmHWM) is compared with the weight bytes
of the layers it holds: the target is weights + 300 MiB (issue 5). For scale, the report
also gives a bare Python process that imports torch and butterfly (workers never import
transformers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from butterfly import Butterfly, LocalCluster
from butterfly.model import ModelSource

from .models import save_model

MiB = 1 << 20
ALLOWANCE = 300 * MiB


def status(pid: int, field: str) -> int:
    """Bytes of ``field`` (VmHWM: peak resident, VmRSS: resident now) of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def bare_import_rss() -> int:
    code = (
        "import torch, butterfly.worker.service, pathlib\n"
        "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('VmHWM')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def run(hidden: int, layers: int, vocab: int, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_model(Path(tmp) / "model", hidden, layers, vocab)
        info = ModelSource(f"hf:{directory}").describe()
        layer_bytes = [p.memory_bytes for p in info.profiles]
        total = sum(layer_bytes)
        budget = int(total * 0.4)
        with (
            LocalCluster(
                f"hf:{directory}",
                workers=workers,
                threads=1,
                extra_args=["--max-memory", str(budget)],
            ) as cluster,
        ):
            # Ready, before any weight is loaded: Python, torch, butterfly and the model
            # code, its description (digests streamed layer by layer) and the listener.
            ready = {p.node_id: status(p.pid, "VmRSS") for p in cluster.processes}
            b = Butterfly.connect(cluster.addresses)
            stages = b.cluster().stages
            ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
            logits = b.infer(ids)
            generated = b.generate(ids, max_new_tokens=8)
            pids = {p.node_id: p.pid for p in cluster.processes}
            per_worker = []
            for node, pid in pids.items():
                held = sum(
                    sum(layer_bytes[i] for i in s.layers) for s in stages if s.node_id == node
                )
                per_worker.append(
                    {
                        "node": node,
                        "weights": held,
                        "ready_rss": ready[node],
                        "peak_rss": status(pid, "VmHWM"),
                    }
                )
            b.close()
    return {
        "model_bytes": total,
        "max_memory": budget,
        "stages": [(s.node_id, s.layers.start, s.layers.stop) for s in stages],
        "logits_shape": list(logits.shape),
        "generated_shape": list(generated.shape),
        "workers": per_worker,
        "bare_import_rss": bare_import_rss(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = run(args.hidden, args.layers, args.vocab, args.workers)
    print(
        f"model {report['model_bytes'] / MiB:.0f} MiB of weights; --max-memory "
        f"{report['max_memory'] / MiB:.0f} MiB per worker; stages {report['stages']}"
    )
    print(f"bare python + torch + butterfly: {report['bare_import_rss'] / MiB:.0f} MiB peak RSS")
    worst = 0.0
    for w in report["workers"]:
        over = w["peak_rss"] - w["weights"]
        loading = w["peak_rss"] - w["ready_rss"] - w["weights"]
        worst = max(worst, over)
        print(
            f"worker {w['node']}: holds {w['weights'] / MiB:.0f} MiB of weights, peak RSS "
            f"{w['peak_rss'] / MiB:.0f} MiB = weights + {over / MiB:.0f} MiB "
            f"({'within' if over <= ALLOWANCE else 'over'} the 300 MiB allowance); "
            f"{w['ready_rss'] / MiB:.0f} MiB resident when ready, before any weight, so "
            f"loading and serving added weights + {loading / MiB:.0f} MiB"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if worst <= ALLOWANCE else 1


if __name__ == "__main__":
    sys.exit(main())
