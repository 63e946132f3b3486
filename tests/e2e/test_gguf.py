"""GGUF files split over real worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from butterfly import Butterfly, LocalCluster
from butterfly.__main__ import local_greedy
from butterfly.model.loading import ModelSource
from tests.gguf_models import save_gguf
from tests.tolerance import torch_threads

pytestmark = pytest.mark.slow

IDS = torch.tensor([[5, 60, 7, 200, 33, 9], [100, 4, 250, 17, 3, 81]])


@pytest.mark.parametrize("quant", ["F32", "Q4_0"])
def test_a_gguf_file_over_three_worker_processes_computes_the_one_process_logits_bitwise(
    tmp_path: Path, quant: str
) -> None:
    path = save_gguf(tmp_path / f"m-{quant}.gguf", quant)
    source = ModelSource(f"gguf:{path}", profile=False)
    with torch_threads(1), torch.inference_mode():
        expected = source.build_layers(0, source.describe().num_layers)(IDS)
    config = {"partition": {"default_strategy": "uniform"}}
    with (
        LocalCluster(f"gguf:{path}", workers=3, threads=1) as cluster,
        Butterfly.connect(cluster.addresses, config=config) as b,
    ):
        assert len({s.node_id for s in b.cluster().stages}) == 3
        got = b.infer(IDS)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_gguf_model_brings_its_tokenizer_and_chats_as_one_process_does(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", "Q8_0")
    messages = [{"role": "user", "content": "hello world"}]
    with Butterfly.local(f"gguf:{path}", workers=3, threads=1) as b:
        assert b.tokenizer is not None
        tokenizer = b.tokenizer
        prompt = tokenizer.encode_chat(messages)
        tokens = b.generate(torch.tensor([prompt]), max_new_tokens=8, stop=())[0].tolist()
        text = b.chat(messages, max_new_tokens=8)
    with torch_threads(1):
        local, _ = local_greedy(ModelSource(f"gguf:{path}", profile=False), prompt, 8, ())
    assert tokens[len(prompt) :] == local
    # The chat stops at the file's EOS, <|im_end|>, if the random model says it.
    assert tokenizer.eos_token_ids == (2,)
    answer = local[: local.index(2)] if 2 in local else local
    assert text == tokenizer.decode(answer)
