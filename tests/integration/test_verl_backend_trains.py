"""The `verl` backend runs VERL's own actor worker (FSDP2 over gloo, on the CPU) and moves the
tiny model toward a reward, like the local backend; the adapter it exports is the adapter it
trained, and a new backend resumes from it.

The agent samples from the published adapter, as engines do: each step exports it and a plain
transformers + peft model serves the next group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightloop.models import load_model, model_folder
from lightloop.settings import TrainerSettings
from lightloop.trainer.algorithms import Scored, drop_flat_groups, rollout_advantages
from lightloop.trainer.errors import TrainerError
from lightloop.trainer.rebuild import Sample
from lightloop.trainer.verl_backend import VerlBackend, to_dataproto
from lightloop.trainer.verl_backend import _log_probs as worker_log_probs

PROMPT = [1, 9690, 198, 2683, 359, 253]
TEMPERATURE = 0.1


def served_logprobs(cache: Path, adapter: Path | None) -> torch.Tensor:
    """The next-token distribution an engine serving `adapter` samples from: [V]."""
    from peft import PeftModel

    model = load_model("tiny", cache).model
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT])).logits[0, -1].float()
    return torch.log_softmax(logits / TEMPERATURE, dim=-1)


def settings(**overrides: Any) -> TrainerSettings:
    values: dict[str, Any] = {"learning_rate": 2e-3, "lora_rank": 4, "seed": 7, **overrides}
    return TrainerSettings(backend="verl", **values)


def test_a_few_verl_steps_raise_the_reward(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    backend = VerlBackend(settings(), model_folder("tiny", cache))
    generator = torch.Generator().manual_seed(7)
    logprobs = served_logprobs(cache, None)
    target = int(logprobs.argmax())
    before = float(logprobs[target].exp())
    for step in range(4):
        samples, scored = [], []
        for g in range(4):
            for k in range(8):
                token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
                rid = f"s{step}g{g}-{k}"
                samples.append(
                    Sample(
                        rid,
                        [*PROMPT, token],
                        len(PROMPT),
                        [1],
                        [float(logprobs[token])],
                        temperature=TEMPERATURE,
                    )
                )
                scored.append(Scored(rid, f"s{step}g{g}", 1.0 if token == target else 0.0))
        kept, _ = drop_flat_groups(scored)
        advantages = rollout_advantages(kept, "grpo")
        train = [s for s in samples if s.rollout_id in advantages]
        metrics = backend.step(train, [advantages[s.rollout_id] for s in train])
        assert metrics["tokens"] == len(train)
        # The samples came from the adapter VERL exported: serving and training agree.
        assert metrics["serve_train_logprob_gap"] < 1e-3, metrics
        # Both backends report the same metrics; on-policy samples get IS weights of 1.
        assert {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "grad_norm"} <= metrics.keys(), metrics
        assert metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-2)
        backend.save_adapter(tmp_path / f"v{step + 1}")
        logprobs = served_logprobs(cache, tmp_path / f"v{step + 1}")
    after = float(logprobs[target].exp())
    assert after > before + 0.1, (before, after)

    # A new backend resumes from the exported adapter: the same logprobs, at another temperature
    # per sample too.
    probe = [
        Sample("a", [*PROMPT, 5, 6, 7], len(PROMPT), [1, 1, 1], [0.0] * 3, temperature=1.0),
        Sample("b", [*PROMPT, target], len(PROMPT), [1], [0.0], temperature=TEMPERATURE),
    ]
    trained = worker_log_probs(backend.workers(), to_dataproto(probe, [0.0, 0.0], pad_id=0))
    resumed = VerlBackend(settings(), model_folder("tiny", cache))
    resumed.load_adapter(tmp_path / "v4")
    again = worker_log_probs(resumed.workers(), to_dataproto(probe, [0.0, 0.0], pad_id=0))
    assert torch.allclose(trained, again, atol=1e-5), (trained, again)
    assert float(trained[1, 0].exp()) == pytest.approx(after, abs=1e-4)
    with pytest.raises(TrainerError, match="before its first step"):
        resumed.load_adapter(tmp_path / "v1")


def test_a_ray_group_of_two_workers_takes_the_same_step_as_one_worker(tmp_path: Path) -> None:
    """`verl.gpus_per_node: 2` runs VERL's worker group on Ray (here two CPU processes, FSDP2
    over gloo): the batch is split, padded to a multiple of the workers with samples that carry
    no loss, and the step and the adapter gathered from the shards equal one worker's. An agent's
    adapter is a second worker group colocated on the same resources (one VERL actor per
    adapter), trained apart: the opposite advantages give it the opposite first update."""
    import ray

    cache = tmp_path / "models"
    generator = torch.Generator().manual_seed(3)
    batch = [
        Sample(
            f"r{i}",
            torch.randint(5, 1000, (6 + i,), generator=generator).tolist(),
            4,
            [1] * (2 + i),
            [-3.0] * (2 + i),
            temperature=0.7,
        )
        for i in range(5)  # odd: the group pads it to 6
    ]
    advantages = [1.0, -1.0, 0.5, -0.5, 1.0]
    single = VerlBackend(settings(learning_rate=1e-2), model_folder("tiny", cache))
    single.save_adapter(tmp_path / "start")  # the same starting adapter for both
    # Two colocated groups reserve two CPUs per worker (VERL's bundles); Ray's CPUs are logical,
    # and this machine may have two.
    ray.init(num_cpus=4, include_dashboard=False)
    group = VerlBackend(
        settings(learning_rate=1e-2, verl={"gpus_per_node": 2}),
        model_folder("tiny", cache),
        adapters=["policy-planner"],
    )
    group.load_adapter(tmp_path / "start")
    group.load_adapter(tmp_path / "start", adapter="policy-planner")
    try:
        one, two = single.step(batch, advantages), group.step(batch, advantages)
        assert two["tokens"] == one["tokens"] == sum(len(s.loss_mask) for s in batch)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-8)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        planner = group.step(batch, [-a for a in advantages], adapter="policy-planner")
        assert planner["loss"] == pytest.approx(-one["loss"], rel=1e-4, abs=1e-8)
        single.save_adapter(tmp_path / "single")
        group.save_adapter(tmp_path / "group")
        group.save_adapter(tmp_path / "planner", adapter="policy-planner")
    finally:
        ray.shutdown()
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "single" / "adapter_model.safetensors"),
        load_file(tmp_path / "group" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained
    # The planner's adapter took its own step from the same start: lora_B moved the other way
    # (Adam's first step is the gradient's sign), lora_A (no gradient yet) stayed.
    c = load_file(tmp_path / "planner" / "adapter_model.safetensors")
    assert c.keys() == a.keys()
    assert all(torch.allclose(c[k], -a[k] if "lora_B" in k else a[k], atol=1e-5) for k in a)
