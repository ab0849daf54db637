"""The batcher in-process with the tiny model: sequences decoded together give exactly the tokens
they give alone, whatever their prompt lengths and arrival times."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from lightloop.engine.batcher import Batcher, Choice, Event, Finished, Token
from lightloop.engine.lora import LoraRuntime
from lightloop.engine.sampling import SamplingParams
from lightloop.models import load_model


@pytest.fixture(scope="module")
def batcher(tmp_path_factory: pytest.TempPathFactory) -> Any:
    loaded = load_model("tiny", tmp_path_factory.mktemp("models"))
    b = Batcher(loaded, LoraRuntime(loaded.model), max_batch_size=4)
    b.start()
    yield b
    b.stop()


def generate(batcher: Batcher, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    results: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):

        def emit(event: Event, i: int = i) -> None:
            if isinstance(event, Token):
                results[i].append(event.token_id)
            elif isinstance(event, Finished):
                done.release()

        params = SamplingParams(max_tokens=n, temperature=0.0)
        batcher.submit([Choice(prompt_ids=prompt, params=params, adapter=None, emit=emit)])
    for _ in prompts:
        assert done.acquire(timeout=120)
    return results


def test_batched_equals_alone(batcher: Batcher) -> None:
    # Six sequences on a batch of at most four: some wait, join mid-way and pad differently.
    prompts = [list(range(100, 100 + n)) for n in (3, 17, 8, 30, 5, 12)]
    lengths = [20, 5, 30, 12, 25, 9]
    together = generate(batcher, prompts, lengths)
    alone = [generate(batcher, [p], [n])[0] for p, n in zip(prompts, lengths, strict=True)]
    assert together == alone
    assert [len(t) for t in together] == lengths
