"""GGUF files as Butterfly layers: the config, the tensors, the fingerprint, the tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from butterfly import ModelError
from butterfly.model.loading import ModelSource
from butterfly.text import Tokenizer
from tests.gguf_models import dequantised_state, llama_weights, save_gguf, smollm2_path
from tests.tolerance import reduction_length, rounding_bound, torch_threads

IDS = torch.tensor([[5, 60, 7, 200, 33, 9], [100, 4, 250, 17, 3, 81]])


def _reference_logits(path: Path, ids: torch.Tensor, **overrides: object) -> torch.Tensor:
    """transformers' Llama run with the file's tensors as the gguf library dequantises them."""
    import transformers

    state = dequantised_state(path)
    c, _ = llama_weights(state["model.embed_tokens.weight"].shape[0], **overrides)
    model = transformers.LlamaForCausalLM(c).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head has no tensor
    model.tie_weights()
    with torch.inference_mode():
        logits: torch.Tensor = model(ids).logits
    return logits


def _ours(path: Path, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    source = ModelSource(f"gguf:{path}", profile=False, **kwargs)  # type: ignore[arg-type]
    layers = source.build_layers(0, source.describe().num_layers)
    with torch.inference_mode():
        out: torch.Tensor = layers(ids)
    return out


@pytest.mark.parametrize("quant", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_a_gguf_llama_computes_what_transformers_computes_with_its_dequantised_weights(
    tmp_path: Path, quant: str
) -> None:
    path = save_gguf(tmp_path / f"llama-{quant}.gguf", quant)
    with torch_threads(1):
        got = _ours(path, IDS)
        expected = _reference_logits(path, IDS)
    # Same weights, the same arithmetic in another implementation: rounding only.
    torch.testing.assert_close(
        got,
        expected,
        rtol=0,
        atol=rounding_bound(expected, reduction_length("llama", IDS.shape[1])),
    )


@pytest.mark.parametrize("quant", ["F32", "Q8_0", "Q4_0"])
def test_transformers_own_gguf_loading_agrees_within_1e_4(tmp_path: Path, quant: str) -> None:
    import transformers

    path = save_gguf(tmp_path / f"llama-{quant}.gguf", quant)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        expected = model(IDS).logits
    torch.testing.assert_close(_ours(path, IDS), expected, rtol=0, atol=1e-4)


def test_the_quantised_weights_are_not_the_float_ones(tmp_path: Path) -> None:
    """The Q4_0 file really holds quantised weights: its answers move away from F32's."""
    f32 = _ours(save_gguf(tmp_path / "a.gguf", "F32"), IDS)
    q4 = _ours(save_gguf(tmp_path / "b.gguf", "Q4_0"), IDS)
    assert (f32 - q4).abs().max() > 1e-2


def test_the_config_comes_from_the_metadata(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", "Q8_0", tie_word_embeddings=True)
    info = ModelSource(f"gguf:{path}", profile=False).describe()
    assert info.name == "gguf:m.gguf"
    assert info.num_layers == 3 + 2  # embeddings, three blocks, norm + head
    assert info.input_spec.max_length == 64
    assert info.eos_token_ids == (2,)  # <|im_end|>


def test_a_tied_head_reads_the_token_embeddings(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "tied.gguf", "F32", tie_word_embeddings=True)
    with torch_threads(1):
        got = _ours(path, IDS)
        expected = _reference_logits(path, IDS, tie_word_embeddings=True)
    torch.testing.assert_close(
        got,
        expected,
        rtol=0,
        atol=rounding_bound(expected, reduction_length("llama", IDS.shape[1])),
    )


def test_a_stage_reads_only_its_own_tensors(tmp_path: Path) -> None:
    from butterfly.model.gguf import GGUFModel

    model = GGUFModel(f"gguf:{save_gguf(tmp_path / 'm.gguf', 'Q8_0')}", profile=False)
    model.describe()
    before = len(model.statistics().keys_read)
    model.build_layers(2, 3)  # block 1
    read = model.statistics().keys_read[before:]
    assert sorted(read) == sorted(
        f"model.layers.1.{n}"
        for n in (
            "input_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "post_attention_layernorm.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        )
    )


def test_the_fingerprint_is_the_files_content_not_its_path(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    path = save_gguf(tmp_path / "a" / "m.gguf", "Q8_0")
    copy = Path(shutil.copy(path, tmp_path / "b" / "m.gguf"))
    a = ModelSource(f"gguf:{path}", profile=False).describe()
    b = ModelSource(f"gguf:{copy}", profile=False).describe()
    assert a.fingerprint == b.fingerprint


def test_the_dtype_a_worker_reads_into_changes_the_fingerprint(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", "Q8_0")
    f32 = ModelSource(f"gguf:{path}", profile=False).describe()
    bf16 = ModelSource(f"gguf:{path}", profile=False, dtype=torch.bfloat16).describe()
    assert f32.fingerprint != bf16.fingerprint
    assert _ours(path, IDS, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_a_changed_tensor_changes_only_its_layers_digest(tmp_path: Path) -> None:
    from butterfly.model.gguf_file import GGUFFile

    path = save_gguf(tmp_path / "m.gguf", "F32")
    before = ModelSource(f"gguf:{path}", profile=False).describe().layer_digests
    tensor = GGUFFile(path).stored["model.layers.1.mlp.up_proj.weight"]
    with path.open("r+b") as f:
        f.seek(tensor.offset)
        f.write(np.float32(7.0).tobytes())
    after = ModelSource(f"gguf:{path}", profile=False).describe().layer_digests
    assert [i for i, (x, y) in enumerate(zip(before, after, strict=True)) if x != y] == [2]


def test_a_file_changed_after_start_up_is_refused_when_a_stage_is_built(tmp_path: Path) -> None:
    from butterfly.model.gguf_file import GGUFFile

    path = save_gguf(tmp_path / "m.gguf", "F32")
    source = ModelSource(f"gguf:{path}", profile=False)
    source.describe()
    tensor = GGUFFile(path).stored["model.layers.0.mlp.up_proj.weight"]
    with path.open("r+b") as f:
        f.seek(tensor.offset)
        f.write(np.float32(7.0).tobytes())
    with pytest.raises(ModelError, match="layer 1 differs from the one fingerprinted"):
        source.build_layers(1, 2)


def test_an_unsupported_architecture_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", architecture="mamba")
    with pytest.raises(ModelError, match=r"general.architecture is 'mamba'; supported: llama"):
        ModelSource(f"gguf:{path}").describe()


def test_an_unsupported_quant_type_is_refused_naming_the_tensor_and_the_types(
    tmp_path: Path,
) -> None:
    path = save_gguf(tmp_path / "m.gguf", "Q8_0", raw_types={"blk.1.ffn_up.weight": "IQ4_NL"})
    with pytest.raises(
        ModelError,
        match=r"tensor 'blk.1.ffn_up.weight' is IQ4_NL; supported types: F32, F16, BF16, Q4_0",
    ):
        ModelSource(f"gguf:{path}", profile=False).describe()


def test_yarn_rope_scaling_is_refused(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(
        ModelError, match=r"llama.rope.scaling.type is 'yarn'; supported: none, linear"
    ):
        ModelSource(f"gguf:{path}").describe()


def test_per_frequency_rope_factors_are_refused(tmp_path: Path) -> None:
    path = save_gguf(
        tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": np.ones(4, dtype=np.float32)}
    )
    with pytest.raises(ModelError, match=r"has tensor 'rope_freqs.weight'"):
        ModelSource(f"gguf:{path}").describe()


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match=r"cannot read GGUF file .*m.gguf"):
        ModelSource(f"gguf:{path}").describe()


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"is not a file; expected a .gguf file"):
        ModelSource(f"gguf:{tmp_path / 'nope.gguf'}").describe()


# -- the tokenizer ---------------------------------------------------------------------

TEXTS = [
    "hello world, how are you today?",
    "  two leading spaces\n\nand newlines\tand tabs",
    "Ünïcödé — 日本語 😀 and digits 12345 67.89",
    "<|im_start|>user\nhi<|im_end|>\n",
    "don't I'LL we've",
]


def _transformers_tokenizer(path: Path) -> object:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("which", ["test file", "SmolLM2"])
def test_the_tokenizer_encodes_as_transformers_gguf_conversion_does(
    tmp_path: Path, which: str
) -> None:
    path = save_gguf(tmp_path / "m.gguf") if which == "test file" else smollm2_path()
    ours = Tokenizer.load(f"gguf:{path}")
    reference = _transformers_tokenizer(path)
    for text in TEXTS:
        assert ours.encode(text) == reference(text).input_ids, text  # type: ignore[operator]


@pytest.mark.parametrize("which", ["test file", "SmolLM2"])
def test_the_tokenizer_decodes_what_it_encodes(tmp_path: Path, which: str) -> None:
    path = save_gguf(tmp_path / "m.gguf") if which == "test file" else smollm2_path()
    ours = Tokenizer.load(path)
    for text in TEXTS[:3] + TEXTS[4:]:
        assert ours.decode(ours.encode(text)) == text


def test_the_chat_template_and_special_tokens_come_from_the_file() -> None:
    ours = Tokenizer.load(smollm2_path())
    reference = _transformers_tokenizer(smollm2_path())
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.encode_chat(messages) == reference.apply_chat_template(  # type: ignore[attr-defined]
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ours.eos_token_ids == (2,)
    assert ours.special_tokens["eos_token"] == "<|im_end|>"
    # Control tokens are matched whole and dropped from decoded text.
    assert ours.encode("<|im_end|>") == [2]
    assert ours.decode([2, 19556]) == "Hello"


def test_smollm2s_digits_are_split_one_by_one_as_llama_cpp_splits_them() -> None:
    ours = Tokenizer.load(smollm2_path())
    assert ours.encode("2024") == [ours._tokenizer.token_to_id(d) for d in "2024"]


def test_a_file_without_a_tokenizer_says_so(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"has no tokenizer \(no tokenizer.ggml.model\)"):
        Tokenizer.load(path)


def test_an_unknown_pre_tokenizer_is_refused_naming_it(tmp_path: Path) -> None:
    path = save_gguf(tmp_path / "m.gguf", metadata={"tokenizer.ggml.pre": "mystery"})
    with pytest.raises(ModelError, match=r"tokenizer.ggml.pre is 'mystery'; supported: "):
        Tokenizer.load(path)
