"""Which claimed calls become training samples: staleness and agent selection (pure)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightloop.store import ClaimedRollout
from lightloop.trainer import select_samples


def call(
    version: int, agent: str = "solver", model: str = "policy", prompt: list[int] | None = None
) -> dict[str, Any]:
    return {
        "model": model,
        "agent": agent,
        "policy_version": version,
        "prompt_token_ids": prompt or [1, 2],
        "completion_token_ids": [3],
        "completion_logprobs": [-0.5],
        "request": {"temperature": 0.7},
    }


def rollout(rid: str, calls: list[dict[str, Any]]) -> ClaimedRollout:
    return ClaimedRollout(rid, None, None, None, "succeeded", 1.0, {}, None, calls)


def test_rollouts_served_by_too_old_a_version_are_dropped_and_counted() -> None:
    rollouts = [rollout("fresh", [call(3)]), rollout("edge", [call(1)]), rollout("stale", [call(0), call(3)])]
    samples, metrics = select_samples(rollouts, policy="policy", live=3, max_staleness=2, agents=[])
    assert set(samples) == {"fresh", "edge"}
    assert metrics["stale_rollouts"] == 1
    assert samples["fresh"][0].temperature == 0.7


def test_only_selected_agents_are_trained_and_other_models_are_ignored() -> None:
    planner = call(1, agent="planner", prompt=[1])
    solver = call(1, agent="solver", prompt=[1, 3, 9])
    other_model = {**call(1), "model": "gpt-4o", "prompt_token_ids": None, "completion_token_ids": None}
    samples, metrics = select_samples(
        [rollout("r", [planner, solver, other_model])],
        policy="policy",
        live=1,
        max_staleness=2,
        agents=["solver"],
    )
    (sample,) = samples["r"]
    assert sample.loss_mask == [0, 0, 1]  # the planner's token is context, the solver's is trained
    assert metrics["merges"] == 1 and metrics["skipped_no_token_ids"] == 0
    # Nothing selected in a rollout: no sample at all.
    none, _ = select_samples(
        [rollout("p", [planner])], policy="policy", live=1, max_staleness=2, agents=["solver"]
    )
    assert none == {}


async def test_the_heartbeat_stops_when_a_step_runs_past_max_step_s(tmp_path: Path) -> None:
    import asyncio
    import time

    from lightloop.settings import TrainerSettings
    from lightloop.trainer.loop import Trainer

    beat = tmp_path / "run" / "trainer.heartbeat"
    trainer = Trainer(
        TrainerSettings(max_step_s=60), "policy", "postgresql://unused", None, None, heartbeat=beat
    )  # type: ignore[arg-type]

    async def one_beat() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(trainer._beat(stop))
        await asyncio.sleep(0)  # a scheduling point: the task runs its first round
        stop.set()
        await task

    trainer._step_started = time.monotonic() - 30  # a step, still within bounds
    await one_beat()
    assert beat.is_file()
    os.utime(beat, (0, 0))
    trainer._step_started = time.monotonic() - 61  # hung
    await one_beat()
    assert beat.stat().st_mtime == 0
    trainer._step_started = None  # between steps
    await one_beat()
    assert beat.stat().st_mtime > 0


def test_calls_an_agent_s_own_adapter_served_are_context_for_the_policy_s_adapter() -> None:
    """Until agent adapters are trained (their versions are their own), the policy's adapter
    trains on the calls it served; a call served by `policy-planner` is context, and its version
    does not count against the policy's staleness."""
    shared = {**call(3, agent="coder", prompt=[1]), "adapter": "policy"}
    planner = {**call(0, agent="planner", prompt=[1, 3, 9]), "adapter": "policy-planner"}
    samples, metrics = select_samples(
        [rollout("r", [shared, planner])], policy="policy", live=3, max_staleness=0, agents=[]
    )
    ((sample),) = samples["r"]
    assert metrics["stale_rollouts"] == 0
    assert sample.loss_mask == [1, 0, 0]  # coder's completion trained; planner's turn context
    assert [span for _, _, span in sample.turns] == [None]
