"""The local backend with VERL's algorithms moves a real (tiny) model toward a reward.

The task: reward 1 when the first sampled token is one particular token. The tiny random model's
next-token distribution is nearly flat, so the agent samples at temperature 0.1, where that token
holds about a third of the mass; the trainer must use the same temperature for its logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightloop.models import load_model
from lightloop.trainer.algorithms import Scored, drop_flat_groups, rollout_advantages
from lightloop.trainer.local import LocalBackend, LocalConfig
from lightloop.trainer.rebuild import Sample

PROMPT = [1, 9690, 198, 2683, 359, 253]
TEMPERATURE = 0.1


def next_token_logprobs(backend: LocalBackend, adapter: str | None = None) -> torch.Tensor:
    backend.use(adapter)
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([PROMPT])).logits[0, -1].float()
    return torch.log_softmax(logits / TEMPERATURE, dim=-1)


def sampled_group(
    backend: LocalBackend,
    target: int,
    group: str,
    n: int,
    generator: torch.Generator,
    adapter: str | None = None,
    avoid: bool = False,
) -> tuple[list[Sample], list[Scored]]:
    """A group of one-token tries, reward 1 for the target token (for any other with `avoid`)."""
    logprobs = next_token_logprobs(backend, adapter)
    samples, scored = [], []
    for k in range(n):
        token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
        rid = f"{group}-{k}"
        samples.append(
            Sample(rid, [*PROMPT, token], len(PROMPT), [1], [float(logprobs[token])], temperature=TEMPERATURE)
        )
        scored.append(Scored(rid, group, 1.0 if (token == target) != avoid else 0.0))
    return samples, scored


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_plus_plus"])
def test_a_few_steps_raise_the_reward(tmp_path: Path, algorithm: str) -> None:
    loaded = load_model("tiny", tmp_path / "models")
    backend = LocalBackend(
        loaded.model, loaded.tokenizer, LocalConfig(learning_rate=2e-3, lora_rank=4, seed=7)
    )
    generator = torch.Generator().manual_seed(7)
    target = int(next_token_logprobs(backend).argmax())
    before = float(next_token_logprobs(backend)[target].exp())
    kl = []
    for step in range(4):
        samples, scored = [], []
        for g in range(4):
            s, sc = sampled_group(backend, target, f"s{step}g{g}", 8, generator)
            samples += s
            scored += sc
        kept, _ = drop_flat_groups(scored)
        advantages = rollout_advantages(kept, algorithm)
        train = [s for s in samples if s.rollout_id in advantages]
        metrics = backend.step(train, [advantages[s.rollout_id] for s in train])
        assert metrics["tokens"] == len(train)
        # Samples come from the model being trained: serving and training agree.
        assert metrics["serve_train_logprob_gap"] < 1e-3
        # Both backends report the same metrics; on-policy samples get IS weights of 1.
        assert {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "grad_norm"} <= metrics.keys(), metrics
        assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-2)
        kl.append(metrics["kl_to_base"])
    # The policy moves away from the base model as it learns, and the KL says so.
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4 and kl == sorted(kl), kl
    after = float(next_token_logprobs(backend)[target].exp())
    assert after > before + 0.1, (before, after)


def test_saved_adapters_load_back_identically(tmp_path: Path) -> None:
    loaded = load_model("tiny", tmp_path / "models")
    backend = LocalBackend(loaded.model, loaded.tokenizer, LocalConfig(learning_rate=1e-2, lora_rank=4))
    samples = [
        Sample("a", [*PROMPT, 2], len(PROMPT), [1], [-10.0]),
        Sample("b", [*PROMPT, 3], len(PROMPT), [1], [-10.0]),
    ]
    backend.step(samples, [1.0, -1.0])
    backend.save_adapter(tmp_path / "v1")
    trained = next_token_logprobs(backend)
    fresh = LocalBackend(
        load_model("tiny", tmp_path / "models").model, loaded.tokenizer, LocalConfig(lora_rank=4)
    )
    assert not torch.allclose(next_token_logprobs(fresh), trained)
    fresh.load_adapter(tmp_path / "v1")
    assert torch.allclose(next_token_logprobs(fresh), trained, atol=1e-5)
    assert (tmp_path / "v1" / "adapter_config.json").is_file()


def test_two_adapters_on_one_base_model_learn_their_own_targets(tmp_path: Path) -> None:
    """The policy's adapter and an agent's, one base model, opposite rewards: the policy's is
    rewarded for the most likely first token, the planner's for any other. Each learns its own,
    and neither moves toward the other's (each has its own weights and optimiser)."""
    loaded = load_model("tiny", tmp_path / "models")
    backend = LocalBackend(
        loaded.model,
        loaded.tokenizer,
        LocalConfig(learning_rate=2e-3, lora_rank=4, seed=7),
        adapters=["policy-planner"],
    )
    generator = torch.Generator().manual_seed(7)
    base = next_token_logprobs(backend).exp()
    first = int(base.argmax())
    wants = {None: False, "policy-planner": True}  # adapter -> avoid the token
    for step in range(4):
        for adapter, avoid in wants.items():
            samples, scored = [], []
            for g in range(4):
                s, sc = sampled_group(backend, first, f"{adapter}{step}g{g}", 8, generator, adapter, avoid)
                samples += s
                scored += sc
            advantages = rollout_advantages(drop_flat_groups(scored)[0], "grpo")
            train = [s for s in samples if s.rollout_id in advantages]
            if not train:
                continue  # every group flat: this adapter has learnt its part already
            metrics = backend.step(train, [advantages[s.rollout_id] for s in train], adapter=adapter)
            assert metrics["serve_train_logprob_gap"] < 1e-3  # sampled under the adapter trained
    policy, planner = next_token_logprobs(backend).exp(), next_token_logprobs(backend, "policy-planner").exp()
    # Each moved its own way: the policy's toward the token, the planner's away from it.
    assert policy[first] > base[first] + 0.1, (base[first], policy[first])
    # Neither moved toward the other's target.
    assert planner[first] < base[first] - 0.1, (base[first], planner[first])
    # Each saves and loads back on its own.
    backend.save_adapter(tmp_path / "planner", adapter="policy-planner")
    backend.save_adapter(tmp_path / "policy")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "planner").iterdir()
    }
    fresh = LocalBackend(
        load_model("tiny", tmp_path / "models").model,
        loaded.tokenizer,
        LocalConfig(lora_rank=4),
        adapters=["x"],
    )
    fresh.load_adapter(tmp_path / "planner", adapter="x")
    fresh.load_adapter(tmp_path / "policy")
    assert torch.allclose(next_token_logprobs(fresh, "x").exp(), planner, atol=1e-5)
    assert torch.allclose(next_token_logprobs(fresh).exp(), policy, atol=1e-5)
    with pytest.raises(KeyError):
        fresh.step([Sample("z", [*PROMPT, 2], len(PROMPT), [1], [-1.0])], [1.0], adapter="nobody")
