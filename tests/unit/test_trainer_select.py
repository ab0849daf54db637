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
    from lightloop.trainer import Publisher
    from lightloop.trainer.loop import Trainer

    beat = tmp_path / "run" / "trainer.heartbeat"
    publisher = Publisher("policy", "tiny", tmp_path / "checkpoints", [], keep=2)
    trainer = Trainer(
        TrainerSettings(max_step_s=60), "policy", "postgresql://unused", None, publisher, heartbeat=beat
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
    """The policy's adapter trains on the calls it served; a call served by `policy-planner` is
    context, and its version (the planner adapter's own numbering) does not count against the
    policy's staleness."""
    shared = {**call(3, agent="coder", prompt=[1]), "adapter": "policy"}
    planner = {**call(0, agent="planner", prompt=[1, 3, 9]), "adapter": "policy-planner"}
    samples, metrics = select_samples(
        [rollout("r", [shared, planner])], policy="policy", live=3, max_staleness=0, agents=[]
    )
    ((sample),) = samples["r"]
    assert metrics["stale_rollouts"] == 0
    assert sample.loss_mask == [1, 0, 0]  # coder's completion trained; planner's turn context
    assert [span for _, _, span in sample.turns] == [None]


def test_an_agent_adapter_trains_on_its_own_calls_with_the_policy_s_as_context() -> None:
    """The same rollout, rebuilt for the planner's adapter: its call is trained, the policy's is
    context; only its own versions count for staleness; a row from before agent adapters (no
    adapter) is the policy's, never the planner's."""
    shared = {**call(0, agent="coder", prompt=[1]), "adapter": "policy"}
    planner = {**call(3, agent="planner", prompt=[1, 3, 9]), "adapter": "policy-planner"}
    old = {**call(0, agent="planner", prompt=[7]), "adapter": None}
    samples, metrics = select_samples(
        [rollout("r", [shared, planner, old])],
        policy="policy",
        adapter="policy-planner",
        agent="planner",
        live=3,
        max_staleness=0,
        agents=[],
    )
    assert metrics["stale_rollouts"] == 0
    ((sample),) = samples["r"]  # the old row splits off and has nothing to train: dropped
    assert sample.loss_mask == [0, 0, 1]
    # Its own staleness: planner v1 against live v3 with max_staleness 1 is stale.
    stale, metrics = select_samples(
        [rollout("r", [shared, {**planner, "policy_version": 1}])],
        policy="policy",
        adapter="policy-planner",
        agent="planner",
        live=3,
        max_staleness=1,
        agents=[],
    )
    assert stale == {} and metrics["stale_rollouts"] == 1
    # TRAINER__AGENTS leaves the planner out: its adapter trains on nothing.
    none, _ = select_samples(
        [rollout("r", [shared, planner])],
        policy="policy",
        adapter="policy-planner",
        agent="planner",
        live=3,
        max_staleness=0,
        agents=["coder"],
    )
    assert none == {}


def test_two_agents_sending_the_same_prompt_are_two_turns_not_a_retry() -> None:
    """A retried call (same prompt, same agent) keeps the last; the same prompt from another
    agent is another turn, which each agent's adapter sees."""
    planner = {**call(1, agent="planner", prompt=[1, 2]), "adapter": "policy-planner"}
    checker = {**call(1, agent="checker", prompt=[1, 2]), "adapter": "policy-checker"}
    for agent in ("planner", "checker"):
        samples, metrics = select_samples(
            [rollout("r", [planner, checker])],
            policy="policy",
            adapter=f"policy-{agent}",
            agent=agent,
            live=1,
            max_staleness=0,
            agents=[],
        )
        assert metrics["duplicates"] == 0 and len(samples["r"]) == 1, agent
    _, metrics = select_samples(
        [rollout("r", [planner, planner])],
        policy="policy",
        adapter="policy-planner",
        agent="planner",
        live=1,
        max_staleness=0,
        agents=[],
    )
    assert metrics["duplicates"] == 1


def test_an_agent_adapter_without_a_version_adopts_its_calls_the_policy_s_adapter_served() -> None:
    """Until the planner's adapter has a version of its own, the policy's adapter serves the
    planner (recorded as the policy's); the planner's adapter starts as a copy of it, so those
    calls are the planner's samples, stale or not by the policy's versions. The policy's own
    adapter never trains an agent with an adapter of its own."""
    planner = {**call(3, agent="planner", prompt=[1, 2]), "adapter": "policy"}
    coder = {**call(3, agent="coder", prompt=[1, 2, 3, 4]), "adapter": "policy"}
    rollouts = [rollout("r", [planner, coder])]
    common = {"policy": "policy", "max_staleness": 1, "agents": []}
    samples, _ = select_samples(
        rollouts, **common, live=0, adapter="policy-planner", agent="planner", adopted=3
    )
    (sample,) = samples["r"]
    assert sample.loss_mask == [1, 0, 0]  # its own token, then the coder's as context
    # Stale against the policy's live version 5, not against its own (none yet).
    _, metrics = select_samples(
        rollouts, **common, live=0, adapter="policy-planner", agent="planner", adopted=5
    )
    assert metrics["stale_rollouts"] == 1
    # With a version of its own, the policy-served calls are context: nothing to train here.
    none, _ = select_samples(rollouts, **common, live=1, adapter="policy-planner", agent="planner")
    assert none == {}
    # The policy's adapter trains the coder (no adapter of its own), not the planner.
    samples, _ = select_samples(rollouts, **common, live=3, others=["planner"])
    (sample,) = samples["r"]
    assert sample.loss_mask == [0, 0, 1]  # the planner's token and the glue are context


def test_each_adapter_s_reward_figure_is_what_its_own_turns_earned() -> None:
    """Per-adapter `reward_mean` inputs: with turn credit, the rewards of its own calls, R
    counting on the last call (turn credit puts it there); with rollout credit, the rollouts'."""
    from lightloop.settings import TrainerSettings
    from lightloop.trainer import plan_adapter

    def two_calls(rid: str, reward: float, turn: dict[str, float]) -> ClaimedRollout:
        planner = {
            **call(1, agent="planner", prompt=[1, 2]),
            "adapter": "policy-planner",
            "span_id": f"{rid}p",
        }
        coder = {**call(1, agent="coder", prompt=[5, 6]), "adapter": "policy", "span_id": f"{rid}c"}
        return ClaimedRollout(
            rid, "g", None, None, "succeeded", reward, {}, None, [planner, coder], turn, reward
        )

    finals_only = [two_calls("a", 1.0, {}), two_calls("b", 0.0, {})]
    common = {"policy": "policy", "version_in": 1, "others": ["planner"], "adopted": None}
    turn = TrainerSettings(credit="turn")
    planner = plan_adapter(finals_only, turn, name="policy-planner", agent="planner", **common)
    coder = plan_adapter(finals_only, turn, name="policy", agent=None, **common)
    # R sits on the coder's call, the last: both adapters train (the planner's return includes
    # R, gamma 1), but only the coder earned it.
    assert len(planner.samples) == 2 and planner.rewards == [0.0, 0.0]
    assert sorted(coder.rewards) == [0.0, 1.0] and all(isinstance(r, float) for r in coder.rewards)
    # Turn rewards for the planner's calls: its figure is its own, R stays the coder's.
    rewarded = [two_calls("a", 1.0, {"ap": 0.5}), two_calls("b", 0.0, {"bp": -0.5})]
    planner = plan_adapter(rewarded, turn, name="policy-planner", agent="planner", **common)
    assert sorted(planner.rewards) == [-0.5, 0.5]
    by_rollout = plan_adapter(rewarded, TrainerSettings(), name="policy-planner", agent="planner", **common)
    assert sorted(by_rollout.rewards) == [0.0, 1.0]
