"""The demo's base model sampled in-process (transformers `generate`), as the demo's training
tries are: what bench/demo_baseline.py and the demo's mechanism test measure, without a stack."""

from __future__ import annotations

from typing import Any

import torch

from lightloop.demo_tasks import DemoTask
from lightloop.engine.chat import encode, render_chat

__all__ = ["earlier_messages", "sample_replies"]


def earlier_messages(task: DemoTask) -> list[dict[str, str]]:
    """The demo agent's messages before issue 12: system prompt and question, no worked example."""
    return [{"role": "system", "content": task.system}, {"role": "user", "content": task.question}]


def sample_replies(
    loaded: Any, messages: list[dict[str, str]], tries: int, temperature: float, max_tokens: int
) -> list[str]:
    """`tries` sampled replies to one chat (plain temperature sampling: no top-k, no top-p;
    temperature 0: the greedy reply, as the demo's held-out tasks are answered)."""
    tok = loaded.tokenizer
    ids = torch.tensor([encode(tok, render_chat(tok, messages, None))])  # [1, P]
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False}
    )
    with torch.no_grad():
        out = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **sampling,
            max_new_tokens=max_tokens,
            num_return_sequences=tries,
            pad_token_id=tok.eos_token_id,
        )  # [tries, P + answer]
    return [tok.decode(seq[ids.shape[1] :], skip_special_tokens=True) for seq in out]
