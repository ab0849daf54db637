"""What made the opposites demo learn (issue 12), on the real base model: with the agent's worked
example the base model's training tries include exact one-word answers beside wrong ones, so
GRPO gives the exact answer a positive advantage; under the earlier agent (no example, 16 answer
tokens) no try is ever exact, and the advantage that would teach the form never appears."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lightloop.demo_probe import earlier_messages, sample_replies
from lightloop.demo_tasks import DemoTask, Opposite, reward, split
from lightloop.models import LoadedModel, load_model
from lightloop.trainer import Scored, drop_flat_groups, rollout_advantages

TASKS, TRIES = 8, 4  # one demo step's worth of groups

Messages = Callable[[DemoTask], list[dict[str, str]]]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model("smollm2", tmp_path_factory.mktemp("models"))


def advantages_of_exact_answers(
    loaded: LoadedModel, messages: Messages, temperature: float, max_tokens: int, kind: str = "opposites"
) -> tuple[list[float], list[str]]:
    """Sample one step's groups as the demo's training tries do; the GRPO advantage of every
    exact answer (rewards of 1) and every reply."""
    torch.manual_seed(0)
    train, _ = split(kind)
    scored, replies = [], []
    exact: set[str] = set()
    for i, task in enumerate(train[:TASKS]):
        for j, reply in enumerate(sample_replies(loaded, messages(task), TRIES, temperature, max_tokens)):
            replies.append(reply)
            rid = f"{i}.{j}"
            scored.append(Scored(rid, str(i), reward(task, reply)))
            if reward(task, reply) == 1.0:
                exact.add(rid)
    kept, _ = drop_flat_groups(scored)
    advantages = rollout_advantages(kept, "grpo")
    return [advantages.get(rid, 0.0) for rid in sorted(exact)], replies


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["opposite-choice", "opposites"])
def test_the_worked_example_gives_exact_answers_a_positive_advantage(smollm2: LoadedModel, kind: str) -> None:
    def demo_messages(task: DemoTask) -> list[dict[str, str]]:
        return task.messages()

    advantages, replies = advantages_of_exact_answers(
        smollm2, demo_messages, Opposite.train_temperature, Opposite.max_tokens, kind
    )
    assert sum(a > 0 for a in advantages) >= 2, replies


@pytest.mark.slow
def test_without_the_example_no_try_is_exact_so_the_form_is_never_reinforced(smollm2: LoadedModel) -> None:
    advantages, replies = advantages_of_exact_answers(smollm2, earlier_messages, 1.0, 16)
    assert advantages == [], replies
