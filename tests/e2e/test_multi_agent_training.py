"""Agents with adapters of their own, trained together from the same rollouts: the proxy, the
real `lightloop engine --model tiny`, Postgres and the trainer (local backend) in-process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import re
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import torch

from lightloop.store.database import dsn
from tests.e2e.conftest import eventually, start_proxy
from tests.e2e.test_proxy import sql
from tests.e2e.test_trainer import trainer_for
from tests.support.stub_engine import running_stub

QUESTION = [{"role": "user", "content": "Task: say something."}]
# The tiny model's first token on QUESTION is "\n" with p about 0.5 at this temperature, so both
# agents can earn their rewards from the start.
TEMPERATURE = 0.065


def unload_agents(engine: str) -> None:
    """The engine is shared by the session's tests: adapters loaded here go, so that another
    test's `policy-planner-v1` is never taken for this one's."""
    for model in httpx.get(f"{engine}/v1/models").json()["data"]:
        if model["id"].startswith("policy-"):
            httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": model["id"]})


def first_token_distribution(engine: str, model: str) -> dict[str, float]:
    """p(first token) at the agents' temperature, from the engine's processed logprobs, for the
    20 most likely first tokens: exact, no sampling."""
    answer = httpx.post(
        f"{engine}/v1/chat/completions",
        json={
            "model": model,
            "messages": QUESTION,
            "max_tokens": 1,
            "temperature": TEMPERATURE,
            "logprobs": True,
            "top_logprobs": 20,
        },
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    top = answer.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    return {t["token"]: math.exp(t["logprob"]) for t in top}


def mixed_steps(engine: str) -> int:
    text = httpx.get(f"{engine}/metrics").text
    found = re.search(r"^lightloop_engine_mixed_adapter_steps_total (\d+)", text, re.M)
    assert found, text
    return int(found.group(1))


def play_round(proxy: Any, round_: int, mode: str, groups: int = 4, tries: int = 8) -> None:
    """Rollouts of two agents, a planner then a coder, on the same question, concurrently (so
    that the engine batches both agents' calls). Each call's reward depends on its own first
    token: the planner's is 1 for `mode`, the coder's 1 for anything else."""
    headers = {"authorization": f"Bearer {proxy.key}"}

    def rollout(g: int, k: int) -> None:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)
        rid = f"round{round_}-task{g}-try{k}"
        group = {
            "X-Lightloop-Rollout": rid,
            "X-Lightloop-Group": f"round{round_}-task{g}",
            "X-Lightloop-Group-Size": str(tries),
        }
        for agent, wants_mode in (("planner", True), ("coder", False)):
            answer = client.chat.completions.create(
                model="policy",
                messages=QUESTION,
                max_tokens=3,
                temperature=TEMPERATURE,
                logprobs=True,
                extra_headers={**group, "X-Lightloop-Agent": agent},
            )
            assert answer.model.startswith(f"policy-{agent}") or round_ == 0, answer.model
            assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content
            first = answer.choices[0].logprobs.content[0].token
            reward = 1.0 if (first == mode) == wants_mode else 0.0
            posted = httpx.post(
                f"{proxy.url}/v1/rewards",
                json={"rollout_id": rid, "response_id": answer.id, "value": reward},
                headers=headers,
            )
            assert posted.status_code == 200, posted.text
        done = httpx.post(
            f"{proxy.url}/v1/rollouts/{rid}/finish", json={"status": "succeeded"}, headers=headers
        )
        assert done.status_code == 200, done.text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(rollout, g, k) for g in range(groups) for k in range(tries)]:
            future.result()


def test_two_agents_adapters_learn_their_own_rewards_from_the_same_rollouts(
    tmp_path: Path, engine: str, engine_home: Path, db_url: str
) -> None:
    """A planner and a coder of one policy, each with its own adapter. The planner earns 1 for
    the question's most likely first token, the coder for any other; one trainer step after each
    round trains both adapters from the same groups (turn credit: each call its own reward) and
    publishes both. After a few steps each adapter has raised its own expected reward, the other
    agent's adapter moved the other way, and the engine ran both adapters in the same batches."""
    unload_agents(engine)
    policy = {
        "name": "policy",
        "base_model": "tiny",
        "upstreams": [engine],
        "agents": {"planner": {}, "coder": {}},
    }
    proxy = start_proxy(tmp_path / "home", db_url, {"policy": [policy]})
    trainer = trainer_for(
        db_url,
        engine_home,
        [engine],
        tmp_path / "checkpoints",
        agents=("planner", "coder"),
        learning_rate=2e-3,
        credit="turn",
        gamma=0.0,
    )
    loop = asyncio.new_event_loop()  # one for the trainer's steps: its engine clients live in it
    try:
        base = first_token_distribution(engine, "tiny")
        mode = max(base, key=lambda token: base[token])
        assert 0.2 < base[mode] < 0.8, base  # both agents can earn their reward from the start
        mixed_before = mixed_steps(engine)
        rounds = 3
        versions = {"policy": 0, "policy-planner": 0, "policy-coder": 0}
        for round_ in range(rounds):
            play_round(proxy, round_, mode)
            outcome = loop.run_until_complete(trainer.step_once())
            assert outcome is not None and outcome.step is not None and outcome.n_rollouts == 32
            # The policy's own adapter served no call here: it never changes. An agent's adapter
            # gets a version per step it trained (all its groups flat once it has learnt: none).
            assert outcome.versions["policy"] == 0
            assert all(outcome.versions[k] in (v, v + 1) for k, v in versions.items()), outcome.versions
            if round_ == 0:  # from the base model both agents' groups carry signal
                assert outcome.versions == {"policy": 0, "policy-planner": 1, "policy-coder": 1}
            versions = outcome.versions
            eventually(
                lambda v=versions: (  # type: ignore[misc]
                    (live := httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()["policies"])
                    and live.get("policy-planner") == v["policy-planner"]
                    and live.get("policy-coder") == v["policy-coder"]
                ),
                what="the proxy serving the new versions",
            )
        planner = first_token_distribution(engine, f"policy-planner-v{versions['policy-planner']}")
        coder = first_token_distribution(engine, f"policy-coder-v{versions['policy-coder']}")
        # Each adapter raised its own agent's expected reward, and the other agent's adapter did
        # not move toward it: the planner's toward the token, the coder's away from it.
        assert planner.get(mode, 0.0) > base[mode] + 0.1, (base[mode], planner.get(mode))
        assert coder.get(mode, 0.0) < base[mode] - 0.1, (base[mode], coder.get(mode))
        # The engine ran the two agents' adapters side by side in its batches.
        assert mixed_steps(engine) > mixed_before

        steps = sql(
            db_url, "SELECT step, policy_in, policy_out, n_tokens, metrics FROM training_steps ORDER BY step"
        )
        assert len(steps) == rounds
        first = steps[0]
        assert (first["policy_in"], first["policy_out"]) == (0, 0)  # the policy's adapter: no calls
        adapters = first["metrics"]["adapters"]
        assert set(adapters) == {"policy", "policy-planner", "policy-coder"}
        for name in ("policy-planner", "policy-coder"):
            figures = adapters[name]
            assert (figures["agent"], figures["version_in"], figures["version_out"]) == (name[7:], 0, 1)
            assert figures["samples"] > 0 and figures["tokens"] > 0 and math.isfinite(figures["loss"])
            assert 0.0 < figures["reward_mean"] < 1.0
        assert adapters["policy"]["samples"] == 0 and adapters["policy"]["version_out"] == 0
        assert first["n_tokens"] == adapters["policy-planner"]["tokens"] + adapters["policy-coder"]["tokens"]
        # Each published version knows the step that made it; the newest are live.
        by_step = {st["step"]: st["metrics"]["adapters"] for st in steps}
        rows = sql(db_url, "SELECT policy, version, status, training_step FROM policy_versions")
        assert {(v["policy"], v["version"]) for v in rows if v["status"] == "live"} == {
            ("policy-planner", versions["policy-planner"]),
            ("policy-coder", versions["policy-coder"]),
        }
        assert all(by_step[v["training_step"]][v["policy"]]["version_out"] == v["version"] for v in rows)
        # Every call was recorded with its agent and the adapter version that served it: in the
        # first round, before the agents had versions of their own, the policy's (the base model).
        calls = sql(
            db_url,
            "SELECT DISTINCT split_part(rollout_id, '-', 1) AS round, agent, adapter, policy_version "
            "FROM llm_calls",
        )
        assert {tuple(c) for c in calls if c["round"] == "round0"} == {
            ("round0", "planner", "policy", 0),
            ("round0", "coder", "policy", 0),
        }
        assert {tuple(c) for c in calls if c["round"] == "round1"} == {
            ("round1", "planner", "policy-planner", 1),
            ("round1", "coder", "policy-coder", 1),
        }
        # The dashboard's trainer view rebuilds a rollout per adapter as the trainer does: each
        # agent's adapter trains its own call, the other agent's is context; the policy's own
        # adapter trains nothing of it.
        view = httpx.get(
            f"{proxy.url}/v1/stats/rollouts/round1-task0-try0/samples",
            headers=proxy.headers,
            timeout=120,  # the first view loads the trainer's code and the tokenizer
        ).json()
        entries = {e["policy"]: e for e in view["policies"]}
        assert entries["policy"]["samples"] == []
        for name, agent in (("policy-planner", "planner"), ("policy-coder", "coder")):
            assert entries[name]["agent"] == agent
            ((sample),) = entries[name]["samples"]  # the same prompt twice: a split, one trained
            assert len(sample["turns"]) == 1 and sum(sample["loss_mask"]) > 0
    finally:
        loop.close()
        proxy.stop()
        unload_agents(engine)


# (agent, adapter that served it, its version, prompt ids)
TWO_ADAPTERS = (
    ("coder", "policy", None, [1, 9690, 198]),
    ("planner", "policy-planner", None, [1, 9690, 199]),
)


async def _seed_two_adapters(
    db_url: str, round_: int, calls: tuple[tuple[str, str, int | None, list[int]], ...] = TWO_ADAPTERS
) -> None:
    """Two groups of four rollouts, each with `calls` (by default one call the policy's adapter
    served and one the planner's); rewards vary within each group."""
    conn = await asyncpg.connect(dsn(db_url))
    try:
        for i in range(8):
            rid = f"round{round_}-r{i}"
            await conn.execute(
                "INSERT INTO rollouts (id, group_id, group_size, status, reward, finished_at) "
                "VALUES ($1, $2, 4, 'succeeded', $3, now())",
                rid,
                f"round{round_}-g{i % 2}",
                float(i % 4 >= 2),
            )
            for seq, (agent, adapter, version, prompt) in enumerate(calls):
                await conn.execute(
                    "INSERT INTO llm_calls (span_id, rollout_id, seq, model, agent, adapter, request, "
                    "policy_version, prompt_token_ids, completion_token_ids, completion_logprobs) "
                    "VALUES ($1, $2, $3, 'policy', $4, $5, '{}', $6, $7, $8, $9)",
                    f"{rid}-{seq}",
                    rid,
                    seq,
                    agent,
                    adapter,
                    version,
                    prompt,
                    [100 + i, 200 + i],
                    [-9.5, -9.8],
                )
    finally:
        await conn.close()


def test_publishing_several_adapters_is_all_or_nothing_across_engines(
    tmp_path: Path, engine: str, engine_home: Path, db_url: str
) -> None:
    """The policy's adapter and the planner's are published together to two engines. When the
    second engine refuses the next publish, neither new version goes live: both are failed with
    the engine's reason, unloaded where they had been loaded, and the versions that were live
    stay live on both engines."""
    unload_agents(engine)
    loop = asyncio.new_event_loop()  # one for the trainer's steps: its engine clients live in it
    try:
        with running_stub() as stub:
            trainer = trainer_for(
                db_url, engine_home, [engine, stub.url], tmp_path / "checkpoints", agents=("planner",)
            )
            asyncio.run(_seed_two_adapters(db_url, 0))
            first = loop.run_until_complete(trainer.step_once())
            assert first is not None and first.versions == {"policy": 1, "policy-planner": 1}
            assert {"policy-v1", "policy-planner-v1"} <= set(stub.adapters)

            asyncio.run(_seed_two_adapters(db_url, 1))
            stub.lora_status = 500  # the stub refuses every load from now on: policy-v2 first
            second = loop.run_until_complete(trainer.step_once())
            assert second is not None and second.versions == {"policy": 1, "policy-planner": 1}
            assert "refused adapter policy-v2" in second.metrics["publish_error"]
            loaded = {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}
            # Nothing of the failed publish is served anywhere; what was live still is.
            assert {"policy-v1", "policy-planner-v1"} <= loaded and not {
                "policy-v2",
                "policy-planner-v2",
            } & loaded
            assert set(stub.adapters) == {"policy-v1", "policy-planner-v1"}
        versions = {
            (v["policy"], v["version"]): (v["status"], v["reason"])
            for v in sql(db_url, "SELECT policy, version, status, reason FROM policy_versions")
        }
        assert versions[("policy", 1)][0] == versions[("policy-planner", 1)][0] == "live"
        for key in (("policy", 2), ("policy-planner", 2)):
            assert versions[key][0] == "failed" and "HTTP 500" in versions[key][1], versions
        step = sql(db_url, "SELECT policy_in, policy_out, metrics FROM training_steps ORDER BY step")[-1]
        assert (step["policy_in"], step["policy_out"]) == (1, 1)
        assert step["metrics"]["adapters"]["policy-planner"]["version_out"] == 1
    finally:
        loop.close()
        unload_agents(engine)


def test_a_refusal_of_the_last_adapter_unloads_the_ones_already_loaded(
    tmp_path: Path, engine: str, engine_home: Path, db_url: str
) -> None:
    """Each new version is loaded on every engine in turn (policy-v1 on both, then the planner's):
    when the second engine refuses the last one, every version loaded anywhere is unloaded."""
    unload_agents(engine)
    loop = asyncio.new_event_loop()  # one for the trainer's steps: its engine clients live in it
    try:
        with running_stub() as stub:
            trainer = trainer_for(
                db_url, engine_home, [engine, stub.url], tmp_path / "checkpoints", agents=("planner",)
            )
            asyncio.run(_seed_two_adapters(db_url, 0))
            refusing = stub.refuse_lora = "policy-planner-v1"
            outcome = loop.run_until_complete(trainer.step_once())
            assert outcome is not None and outcome.versions == {"policy": 0, "policy-planner": 0}
            assert f"refused adapter {refusing}" in outcome.metrics["publish_error"]
            assert stub.adapters == {}
        loaded = {m["id"] for m in httpx.get(f"{engine}/v1/models").json()["data"]}
        assert not {"policy-v1", "policy-planner-v1"} & loaded
        statuses = sql(db_url, "SELECT policy, status FROM policy_versions")
        assert {(v["policy"], v["status"]) for v in statuses} == {
            ("policy", "failed"),
            ("policy-planner", "failed"),
        }
    finally:
        loop.close()
        unload_agents(engine)


def test_an_agent_adapter_starts_as_the_policy_s_and_a_failed_publish_goes_out_with_the_next(
    tmp_path: Path, engine_home: Path, db_url: str
) -> None:
    """The policy has v1 when the planner gets an adapter of its own: the planner's calls the
    policy's v1 served are its first samples, its adapter a copy of v1. That step's publish is
    refused: nothing goes live, and v1 keeps the step that made it. The next step has no planner
    call, yet publishes the planner's trained weights beside the policy's v2: an update is never
    dropped or reset, and every publish is still all or nothing."""
    from safetensors.torch import load_file

    coder = ("coder", "policy", 1, [1, 9690, 198])
    loop = asyncio.new_event_loop()
    try:
        with running_stub() as stub:
            root = tmp_path / "checkpoints"
            trainer = trainer_for(db_url, engine_home, [stub.url], root, agents=("planner",))
            loop.run_until_complete(_seed_two_adapters(db_url, 0, (("coder", "policy", 0, [1, 9690, 198]),)))
            first = loop.run_until_complete(trainer.step_once())
            assert first is not None and first.versions == {"policy": 1, "policy-planner": 0}

            planner_on_policy = ("planner", "policy", 1, [1, 9690, 199])
            loop.run_until_complete(_seed_two_adapters(db_url, 1, (planner_on_policy, coder)))
            stub.refuse_lora = "policy-planner-v1"
            second = loop.run_until_complete(trainer.step_once())
            assert second is not None and second.versions == {"policy": 1, "policy-planner": 0}
            assert "refused adapter policy-planner-v1" in second.metrics["publish_error"]
            assert second.metrics["adapters"]["policy-planner"]["samples"] == 8  # adopted
            v1 = sql(
                db_url, "SELECT training_step FROM policy_versions WHERE policy = 'policy' AND version = 1"
            )
            assert v1[0][0] == first.step  # not the step that published nothing

            stub.refuse_lora = None
            loop.run_until_complete(_seed_two_adapters(db_url, 2, (coder,)))
            third = loop.run_until_complete(trainer.step_once())
            # Failed versions keep their numbers: policy v3 and planner v2 go live.
            assert third is not None and third.versions == {"policy": 3, "policy-planner": 2}
            assert third.metrics["adapters"]["policy-planner"]["samples"] == 0
            assert {"policy-v3", "policy-planner-v2"} <= set(stub.adapters)
        weights = {
            name: load_file(root / name / "adapter_model.safetensors")
            for name in ("policy/v1", "policy/v3", "policy-planner/v1", "policy-planner/v2")
        }
        lora_b = [k for k in weights["policy-planner/v2"] if "lora_B" in k]
        # The planner's live v2 is exactly what the refused v1 held (trained once, not reset,
        # not trained again), which is the policy's v1 plus the planner's own step.
        planner = weights["policy-planner/v2"]
        assert all(torch.equal(planner[k], weights["policy-planner/v1"][k]) for k in planner)
        for other in ("policy/v1", "policy/v3"):
            assert any(not torch.allclose(planner[k], weights[other][k]) for k in lora_b), other
        # A copy of the policy's v1 moved by one optimiser step (lr 1e-3: Adam moves each weight
        # by about that), not a fresh adapter (lora_A starts random, of magnitude about 0.1).
        lora_a = [k for k in planner if "lora_A" in k]
        drift = max(float((planner[k] - weights["policy/v1"][k]).abs().max()) for k in lora_a)
        assert drift < 0.01, drift
        statuses = sql(db_url, "SELECT policy, version, status FROM policy_versions ORDER BY policy, version")
        assert [tuple(r) for r in statuses] == [
            ("policy", 1, "retired"),
            ("policy", 2, "failed"),
            ("policy", 3, "live"),
            ("policy-planner", 1, "failed"),
            ("policy-planner", 2, "live"),
        ]
    finally:
        loop.close()
