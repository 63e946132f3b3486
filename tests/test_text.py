"""The tokenizer wrapper, the chat template and the detokenizing stream (no workers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from butterfly import ApiError, ModelError, Tokenizer
from butterfly.generation.completion import Completion, split_stop
from butterfly.model.eos import read_eos_token_ids
from butterfly.text import TextStream
from tests.text_models import CHATML, build_tokenizer


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save(str(path / "tokenizer.json"))  # type: ignore[attr-defined]
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    return path


@pytest.fixture(scope="module")
def tokenizer(directory: Path) -> Tokenizer:
    return Tokenizer.from_directory(directory)


def test_chat_prompt_equals_transformers_apply_chat_template(
    directory: Path, tokenizer: Tokenizer
) -> None:
    import transformers

    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), chat_template=CHATML
    )
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
    ]
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tokenizer.render_chat(messages) == expected
    assert (
        tokenizer.encode_chat(messages)
        == reference(expected, add_special_tokens=False)["input_ids"]
    )


def test_eos_comes_from_generation_config_before_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert read_eos_token_ids(tmp_path) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    assert read_eos_token_ids(tmp_path) == (2, 4)


def test_a_directory_without_tokenizer_json_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"has no tokenizer\.json"):
        Tokenizer.from_directory(tmp_path)


def test_bad_chat_messages_are_api_errors(tokenizer: Tokenizer) -> None:
    with pytest.raises(ApiError, match="messages is empty"):
        tokenizer.render_chat([])
    with pytest.raises(ApiError, match=r"messages\[0\] must be a dict with a 'role' string"):
        tokenizer.render_chat([{"content": "hi"}])


def test_streamed_text_equals_decoding_everything_at_once(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog", add_special_tokens=False)
    stream = TextStream(tokenizer, context=ids[:2])
    pieces = [stream.push(t) for t in ids[2:]]
    assert "".join(pieces) == tokenizer.decode(ids)[len(tokenizer.decode(ids[:2])) :]
    assert len([p for p in pieces if p]) > 1  # it came piece by piece


def test_a_stop_string_split_across_tokens_is_never_let_out(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hello world, how are you", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=("world,",))
    out = "".join(stream.push(t) for t in ids)
    assert out == "hello " and stream.finished


def test_text_held_for_a_stop_string_that_never_comes_is_flushed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("hello wor", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=("world,",))
    out = "".join(stream.push(t) for t in ids) + stream.flush()
    assert out == "hello wor" and not stream.finished


def test_rows_finish_at_a_stop_token_or_at_the_length(tokenizer: Tokenizer) -> None:
    completion = Completion(tokenizer, [[5, 6], [7]], max_new_tokens=2, stop_ids=frozenset({2}))
    np.testing.assert_array_equal(completion.input_ids(), [[5, 6], [7, -1]])
    completion.step(np.array([2, 9]))
    completion.step(np.array([2, 10]))
    assert completion.finish_reasons == ["stop", "length"]
    assert completion.generated == [1, 2] and completion.done


def test_stop_mixes_strings_and_token_ids() -> None:
    assert split_stop(["\n", 2, "end"]) == (("\n", "end"), (2,))
    assert split_stop("x") == (("x",), ())
    with pytest.raises(ApiError, match="must not be empty"):
        split_stop([""])
    with pytest.raises(ApiError, match="ints ≥ 0, got -1"):
        split_stop([-1])


def test_from_pretrained_refuses_arguments_the_workers_decide(tmp_path: Path) -> None:
    from butterfly import AutoDistributedModelForCausalLM

    with pytest.raises(ApiError, match="does not take device_map, torch_dtype"):
        AutoDistributedModelForCausalLM.from_pretrained(
            tmp_path, peers=["ws://127.0.0.1:1"], torch_dtype="float16", device_map="auto"
        )


def test_a_character_that_never_completes_is_flushed_as_transformers_decodes_it() -> None:
    from tests.gguf_models import smollm2_path

    tokenizer = Tokenizer.load(smollm2_path())
    # "😀" is four bytes; its first two byte tokens alone are not a character.
    ids = tokenizer.encode("😀")[:2]
    stream = TextStream(tokenizer)
    assert [stream.push(i) for i in ids] == ["", ""]
    assert stream.flush() == tokenizer.decode(ids) == "\ufffd"
    assert stream.text == "\ufffd"
