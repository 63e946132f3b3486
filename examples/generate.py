"""Generate text tokens with a Hugging Face decoder split over three local worker processes.

    python examples/generate.py [MODEL_DIR]

MODEL_DIR is a Hugging Face model directory (config.json + *.safetensors), read offline.
Without one, a small Llama with random weights is saved to a temporary directory with
``transformers`` (installed with the test extra; workers themselves never need it), so the
tokens are meaningless but the mechanics are real: each worker reads only its layers,
keeps the session's KV cache, and the greedy tokens equal transformers' own ``generate``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from butterfly import Butterfly


def random_llama(directory: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(sys.argv[1]) if len(sys.argv) > 1 else random_llama(Path(tmp) / "llama")
        prompt = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
        with Butterfly.local(f"hf:{directory}", workers=3, threads=1) as b:
            print(b.cluster())
            start = time.perf_counter()
            for i, token in enumerate(b.stream(prompt, max_new_tokens=16)):
                print(f"step {i:2d}: token {int(token[0])}")
            elapsed = time.perf_counter() - start
            print(f"16 tokens in {elapsed:.2f} s ({elapsed / 16 * 1000:.1f} ms/token)")


if __name__ == "__main__":
    main()
