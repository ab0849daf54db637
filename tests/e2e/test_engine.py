"""`lightloop engine --model tiny` as a real HTTP server, driven with the `openai` SDK."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import safetensors.torch
import torch

from tests.conftest import LIGHTLOOP
from tests.e2e.conftest import clean_env, wait_healthy
from tests.support.stub_engine import free_port

MESSAGES = [{"role": "user", "content": "What is 17 + 25?"}]


@pytest.fixture
def client(engine: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny(engine: str, engine_home: Path) -> Any:
    """The same model and tokenizer, loaded in the test process for direct forward passes."""
    from lightloop.models import load_model

    return load_model("tiny", engine_home / "models")


def direct_logprobs(tiny: Any, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = tiny.model(input_ids=ids).logits[0].float()  # [P+C, V]
    if temperature > 0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]


def test_prompt_ids_are_the_rendered_template_and_token_ids_decode_to_the_text(
    client: openai.OpenAI, tiny: Any
) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    data = r.model_dump()
    rendered = tiny.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert data["prompt_token_ids"] == tiny.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ids = data["choices"][0]["token_ids"]
    assert len(ids) == r.usage.completion_tokens == 12
    assert tiny.tokenizer.decode(ids, skip_special_tokens=True) == r.choices[0].message.content
    assert r.usage.prompt_tokens == len(data["prompt_token_ids"])


def test_greedy_stream_and_non_stream_agree_and_logprobs_match_a_forward_pass(
    client: openai.OpenAI, tiny: Any
) -> None:
    body = {"return_token_ids": True}
    full = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=body,
    ).model_dump()
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        logprobs=True,
        extra_body=body,
    )
    chunks = [c.model_dump() for c in stream]
    assert chunks[0]["prompt_token_ids"] == full["prompt_token_ids"]
    streamed_ids = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []]
    streamed_text = "".join(ch["delta"]["content"] or "" for c in chunks for ch in c["choices"])
    assert streamed_ids == full["choices"][0]["token_ids"]
    assert streamed_text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    content = full["choices"][0]["logprobs"]["content"]
    logprobs = [e["logprob"] for e in content]
    assert all(math.isfinite(x) and x <= 0 for x in logprobs)
    expected = direct_logprobs(tiny, full["prompt_token_ids"], full["choices"][0]["token_ids"], 0)
    assert logprobs == pytest.approx(expected, abs=1e-3)
    assert all(len(e["top_logprobs"]) == 3 for e in content)
    assert all(e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-6 for e in content)


def test_sampled_logprobs_are_of_the_tempered_distribution_and_seeds_repeat(
    client: openai.OpenAI, tiny: Any
) -> None:
    kwargs: dict[str, Any] = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0.5,
        "seed": 11,
        "logprobs": True,
        "n": 2,
        "extra_body": {"return_token_ids": True},
    }
    a = client.chat.completions.create(**kwargs).model_dump()
    b = client.chat.completions.create(**kwargs).model_dump()
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
    assert len(a["choices"]) == 2
    for choice in a["choices"]:
        got = [e["logprob"] for e in choice["logprobs"]["content"]]
        assert got == pytest.approx(
            direct_logprobs(tiny, a["prompt_token_ids"], choice["token_ids"], 0.5), abs=1e-3
        )


def test_completions_with_token_ids_logprobs_and_stop(client: openai.OpenAI, tiny: Any) -> None:
    prompt_ids = tiny.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    r = client.completions.create(
        model="tiny",
        prompt="The capital of France is",
        max_tokens=16,
        temperature=0,
        logprobs=2,
        extra_body={"return_token_ids": True},
    ).model_dump()
    choice = r["choices"][0]
    assert choice["prompt_token_ids"] == prompt_ids
    assert len(choice["logprobs"]["token_logprobs"]) == len(choice["token_ids"]) == 16
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(
        direct_logprobs(tiny, prompt_ids, choice["token_ids"], 0), abs=1e-3
    )
    text = choice["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = client.completions.create(
        model="tiny", prompt=prompt_ids, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_tools_render_through_the_template(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two numbers",
                "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "add 1 and 2"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    r = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=tools,
        max_tokens=4,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    prompt = r.model_dump()["prompt_token_ids"]
    plain = client.chat.completions.create(
        model="tiny",
        messages=messages[:1],
        max_tokens=1,
        temperature=0,
        extra_body={"return_token_ids": True},
    ).model_dump()["prompt_token_ids"]
    assert len(prompt) > len(plain) + 40  # the tool signatures and the call are in the prompt
    assert r.choices[0].finish_reason in {"length", "stop", "tool_calls"}


def test_models_and_health(engine: str) -> None:
    assert httpx.get(f"{engine}/health").status_code == 200
    models = httpx.get(f"{engine}/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 512


@pytest.mark.parametrize(
    ("path", "body", "status", "text"),
    [
        ("/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, 404, "does not exist"),
        ("/v1/chat/completions", b"{not json", 400, "malformed JSON"),
        ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": MESSAGES, "max_tokens": 600},
            400,
            "maximum context length is 512",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "x " * 600}, 400, "maximum context length is 512"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": MESSAGES, "temperature": -1},
            400,
            "temperature",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": [10**9]}, 400, "token ids"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": MESSAGES, "n": 16},
            400,
            "max_batch_size of 8",
        ),
        ("/v1/unload_lora_adapter", {"lora_name": "ghost"}, 404, "cannot be found"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/dir"}, 400, "outside"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_input_gets_openai_shaped_errors(
    engine: str, path: str, body: Any, status: int, text: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{engine}{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert text in error["message"]
    assert error["code"] == status and error["type"]


def make_adapter(tiny: Any, folder: Path, seed: int) -> Path:
    """A PEFT LoRA adapter for the tiny model with a clearly nonzero delta."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(tiny.model)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return folder


def test_lora_adapters_load_serve_and_unload(
    client: openai.OpenAI, engine: str, tiny: Any, tmp_path: Path
) -> None:
    path = make_adapter(tiny, tmp_path / "v1", seed=1)
    ask = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "extra_body": {"return_token_ids": True}}
    base_before = client.chat.completions.create(model="tiny", **ask).model_dump()["choices"][0]["token_ids"]
    r = httpx.post(f"{engine}/v1/load_lora_adapter", json={"lora_name": "policy-v1", "lora_path": str(path)})
    assert r.status_code == 200, r.text
    again = httpx.post(
        f"{engine}/v1/load_lora_adapter", json={"lora_name": "policy-v1", "lora_path": str(path)}
    )
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    ids = [m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]]
    assert ids == ["tiny", "policy-v1"]
    adapted = client.chat.completions.create(model="policy-v1", **ask).model_dump()["choices"][0]["token_ids"]
    base_after = client.chat.completions.create(model="tiny", **ask).model_dump()["choices"][0]["token_ids"]
    assert adapted != base_before
    assert base_after == base_before
    # The adapted outputs are those of the PEFT model itself.
    from peft import PeftModel

    reference = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(path))
    prompt = client.chat.completions.create(model="tiny", **{**ask, "max_tokens": 1}).model_dump()[
        "prompt_token_ids"
    ]
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out[0, len(prompt) :].tolist()[: len(adapted)] == adapted
    assert httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": "policy-v1"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="policy-v1", **ask)


def test_a_broken_adapter_is_refused_and_the_engine_keeps_serving(
    client: openai.OpenAI, engine: str, tmp_path: Path
) -> None:
    (tmp_path / "adapter_config.json").write_text('{"this is": "not peft"}')
    r = httpx.post(f"{engine}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)})
    assert r.status_code == 400
    empty = tmp_path / "empty"
    empty.mkdir()
    r = httpx.post(f"{engine}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(empty)})
    assert r.status_code == 400 and "not a PEFT adapter" in r.json()["error"]["message"]
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


async def test_a_new_version_loads_while_requests_are_in_flight(
    engine: str, tiny: Any, tmp_path: Path
) -> None:
    v1 = make_adapter(tiny, tmp_path / "v1", seed=1)
    v2 = make_adapter(tiny, tmp_path / "v2", seed=2)
    async with httpx.AsyncClient(base_url=engine, timeout=60) as http:
        assert (
            await http.post("/v1/load_lora_adapter", json={"lora_name": "p-v1", "lora_path": str(v1)})
        ).is_success
        ask = {
            "model": "p-v1",
            "messages": MESSAGES,
            "max_tokens": 60,
            "temperature": 0,
            "return_token_ids": True,
        }
        alone = (await http.post("/v1/chat/completions", json=ask)).json()["choices"][0]["token_ids"]
        client = openai.AsyncOpenAI(base_url=f"{engine}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            stream=True,
            **{k: v for k, v in ask.items() if k != "return_token_ids"},
            extra_body={"return_token_ids": True},
        )
        ids: list[int] = []
        swapped = False
        async for chunk in stream:
            ids += chunk.model_dump()["choices"][0].get("token_ids") or [] if chunk.choices else []
            if len(ids) >= 5 and not swapped:
                # Mid-stream: a new version arrives and the old name goes away.
                r2 = await http.post(
                    "/v1/load_lora_adapter", json={"lora_name": "p-v2", "lora_path": str(v2)}
                )
                r1 = await http.post("/v1/unload_lora_adapter", json={"lora_name": "p-v1"})
                assert r2.is_success and r1.is_success
                swapped = True
        assert swapped and ids == alone  # finished on the weights it started with
        v2_ids = (await http.post("/v1/chat/completions", json={**ask, "model": "p-v2"})).json()["choices"][0]
        assert v2_ids["token_ids"] != alone
        await http.post("/v1/unload_lora_adapter", json={"lora_name": "p-v2"})


async def running(engine: str) -> int:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{engine}/metrics")).text
    return int(
        next(
            line.split()[1]
            for line in text.splitlines()
            if line.startswith("lightloop_engine_requests_running")
        )
    )


async def test_concurrent_requests_all_complete(engine: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{engine}/v1", api_key="unused", max_retries=0)
    results = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": f"q{i}"}],
                max_tokens=20 + i,
                temperature=0,
            )
            for i in range(12)
        )
    )
    assert [r.usage.completion_tokens for r in results] == [20 + i for i in range(12)]


async def test_a_disconnect_mid_stream_frees_its_slot(engine: str) -> None:
    async def decode_steps(http: httpx.AsyncClient) -> int:
        return int(
            next(
                line.split()[1]
                for line in (await http.get("/metrics")).text.splitlines()
                if line.startswith("lightloop_engine_decode_steps_total")
            )
        )

    async with httpx.AsyncClient(base_url=engine, timeout=60) as http:
        before = await decode_steps(http)
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.aiter_lines()
            seen = 0
            async for line in lines:
                seen += line.startswith("data:")
                if seen >= 3:
                    break
            assert await running(engine) == 1
        # The client is gone; the engine must stop generating for it long before 400 tokens.
        deadline = time.monotonic() + 30
        while await running(engine) != 0:
            assert time.monotonic() < deadline, "the abandoned stream kept its slot"
            await asyncio.sleep(0.05)
        # Cancelled, not finished: far fewer decode steps than the 400 tokens asked for.
        steps = await decode_steps(http) - before
        assert 0 < steps < 300, steps


def test_adapters_load_only_from_under_the_lora_root_and_only_as_safetensors(
    engine: str, tiny: Any, tmp_path: Path
) -> None:
    def load(path: Path | str) -> httpx.Response:
        return httpx.post(
            f"{engine}/v1/load_lora_adapter", json={"lora_name": "probe", "lora_path": str(path)}
        )

    # Outside the root (the test engine's root is pytest's base temp folder): refused, and the
    # answer does not say whether the path exists.
    outside = Path(tempfile.mkdtemp(prefix="lightloop-outside-"))
    try:
        make_adapter(tiny, outside / "v1", seed=3)
        for path in (outside / "v1", "/etc", "/no/such/dir/../../etc"):
            r = load(path)
            assert r.status_code == 400 and "outside the engine's --lora-root" in r.text, r.text
        # A link inside the root that leads out of it is outside too.
        (tmp_path / "link").symlink_to(outside / "v1")
        r = load(tmp_path / "link")
        assert r.status_code == 400 and "outside the engine's --lora-root" in r.json()["error"]["message"]
    finally:
        shutil.rmtree(outside)
    # A pickled adapter (adapter_model.bin) is never read.
    pickled = make_adapter(tiny, tmp_path / "pickled", seed=4)
    weights = safetensors.torch.load_file(str(pickled / "adapter_model.safetensors"))
    torch.save(weights, pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    r = load(pickled)
    assert r.status_code == 400 and "only safetensors" in r.json()["error"]["message"]
    assert "probe" not in {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}


def test_an_engine_with_an_api_key_and_no_runtime_lora(tmp_path: Path, engine_home: Path, tiny: Any) -> None:
    """vLLM's behaviour: --api-key guards every /v1 route (401 without it), /health stays open;
    without --allow-runtime-lora-updating no one can load or unload an adapter."""
    port = free_port()
    env = {**clean_env(), "LIGHTLOOP_HOME": str(engine_home)}
    key = "engine-" + "k" * 32
    adapter = make_adapter(tiny, tmp_path / "root" / "v1", seed=5)
    args = ["engine", "--model", "tiny", "--port", str(port), "--max-model-len", "256", "--api-key", key]
    with open(tmp_path / "engine.log", "wb") as log:
        proc = subprocess.Popen(
            [LIGHTLOOP, *args, "--lora-root", str(tmp_path / "root")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)  # /health needs no key
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        keyed = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        assert keyed.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=2
            )
        auth = {"authorization": f"Bearer {key}"}
        loaded = httpx.post(
            f"{base}/v1/load_lora_adapter",
            json={"lora_name": "p-v1", "lora_path": str(adapter)},
            headers=auth,
        )
        assert loaded.status_code == 403 and "--allow-runtime-lora-updating" in loaded.text
        unloaded = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "p-v1"}, headers=auth)
        assert unloaded.status_code == 403
        assert httpx.get(f"{base}/metrics").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
