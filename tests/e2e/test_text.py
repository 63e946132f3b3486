"""Text in and out, and Hugging Face calling conventions, over real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from butterfly import AutoDistributedModelForCausalLM, Butterfly, LocalCluster
from tests.text_models import save_chat_llama

pytestmark = pytest.mark.slow

TEXTS = ["hello world", "what is the capital of france?"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_llama(tmp_path_factory.mktemp("text") / "chatllama")


@pytest.fixture(scope="module")
def cluster(chat_model: Path) -> Iterator[LocalCluster]:
    with LocalCluster(f"hf:{chat_model}", workers=2, threads=1) as running:
        yield running


def test_hf_generate_code_runs_unchanged_but_for_the_model_line(
    chat_model: Path, cluster: LocalCluster
) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(chat_model), padding_side="left")
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    local = transformers.AutoModelForCausalLM.from_pretrained(str(chat_model))
    expected = local.generate(**inputs, max_new_tokens=10, do_sample=False)
    with AutoDistributedModelForCausalLM.from_pretrained(
        chat_model, peers=cluster.addresses, secret=cluster.secret
    ) as model:
        got = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        logits = model(**inputs).logits
    assert torch.equal(got, expected)
    reference = local(**inputs).logits
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], reference[mask], rtol=1e-4, atol=1e-4)


def test_unimplemented_generate_arguments_are_refused_by_name(
    chat_model: Path, cluster: LocalCluster
) -> None:
    from butterfly import ApiError

    with AutoDistributedModelForCausalLM.from_pretrained(
        chat_model, peers=cluster.addresses, secret=cluster.secret
    ) as model:
        with pytest.raises(ApiError, match="does not implement logits_processor"):
            model.generate(torch.tensor([[3, 4]]), logits_processor=[], max_new_tokens=2)
        with pytest.raises(ApiError, match="beam search"):
            model.generate(torch.tensor([[3, 4]]), num_beams=4, max_new_tokens=2)


def test_generation_stops_at_the_eos_of_generation_config(
    chat_model: Path, cluster: LocalCluster
) -> None:
    """A later greedy token of the model, made its EOS in a copy of the directory's
    generation_config.json, ends the answer there: no stop= is needed."""
    with Butterfly.connect(cluster.addresses, secret=cluster.secret) as b:
        free = b.generate(torch.tensor([[3, 40, 41]]), max_new_tokens=6, stop=())
    generated = free[0, 3:].tolist()
    at = next(i for i in range(1, 6) if generated[i] not in generated[:i])
    with Butterfly.connect(
        cluster.addresses, secret=cluster.secret, tokenizer=_with_eos(chat_model, generated[at])
    ) as b:
        stopped = b.generate(torch.tensor([[3, 40, 41]]), max_new_tokens=6)
    assert stopped[0].tolist() == free[0, : 3 + at + 1].tolist()  # ended with its EOS token


def _with_eos(directory: Path, eos: int) -> Path:
    import json
    import shutil

    copy = directory.parent / f"{directory.name}-eos{eos}"
    if not copy.exists():
        shutil.copytree(directory, copy)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    return copy


def test_text_generate_chat_and_stream_agree(cluster: LocalCluster, chat_model: Path) -> None:
    messages = [{"role": "user", "content": "hello"}]
    with Butterfly.connect(cluster.addresses, secret=cluster.secret, tokenizer=chat_model) as b:
        answers = b.generate(TEXTS, max_new_tokens=6)
        single = b.generate(TEXTS[1], max_new_tokens=6)
        streamed = "".join(b.stream(TEXTS[1], max_new_tokens=6))
        chat = b.chat(messages, max_new_tokens=6)
        chat_streamed = "".join(b.stream(messages, max_new_tokens=6))
    assert isinstance(answers, list) and answers[1] == single == streamed
    assert chat == chat_streamed and chat
