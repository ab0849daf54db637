"""`/v1/stats/...`: the JSON behind every figure of the dashboard, for scripts too (admin keys:
they read every agent's data). Query parameters are parsed here into typed values; one that does
not parse is a 400 whose `error.param` names it, so the dashboard can mark that filter."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

import asyncpg

from lightloop.proxy.attribution import check_id
from lightloop.proxy.errors import BadRequest, NotFound
from lightloop.proxy.http import Scope, Send, respond_json
from lightloop.proxy.lane import upstream_base
from lightloop.proxy.recorder import Recorder
from lightloop.proxy.routes import read_bounded
from lightloop.proxy.token_text import TokenText
from lightloop.proxy.upstream import Upstreams
from lightloop.settings import PolicyModelSettings
from lightloop.store import rollout_calls, rollout_training_rewards, stats

Pool = Callable[[], Awaitable[asyncpg.Pool]]

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_STEPS = 5_000
ACTIVITY_MINUTES = 60


class Query:
    """A request's query string, read one parameter at a time, each validated."""

    def __init__(self, scope: Scope) -> None:
        raw = scope.get("query_string", b"").decode("latin-1")
        try:
            self._values: dict[str, list[str]] = parse_qs(raw, max_num_fields=64)
        except ValueError as exc:
            raise BadRequest(f"the query string does not parse: {exc}") from None

    def text(self, name: str, choices: tuple[str, ...] | None = None) -> str | None:
        values = self._values.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise BadRequest(f"{name} is given {len(values)} times; give it once", param=name)
        value = values[0].strip()
        if not value:
            return None
        if any(ch < " " for ch in value):  # NUL and other control characters: no text has them
            raise BadRequest(f"{name} holds a control character", param=name)
        if choices is not None and value not in choices:
            raise BadRequest(f"{name} must be one of {', '.join(choices)}, not {value[:40]!r}", param=name)
        if len(value) > 200:
            raise BadRequest(f"{name} is longer than 200 characters", param=name)
        return value

    def integer(self, name: str, low: int, high: int) -> int | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            raise BadRequest(f"{name} must be a whole number, not {value[:40]!r}", param=name) from None
        if not low <= number <= high:
            raise BadRequest(f"{name} must be between {low} and {high}, not {number}", param=name)
        return number

    def number(self, name: str) -> float | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            number = float(value)
        except ValueError:
            raise BadRequest(f"{name} must be a number, not {value[:40]!r}", param=name) from None
        if not math.isfinite(number):
            raise BadRequest(f"{name} must be a finite number", param=name)
        return number

    def time(self, name: str) -> datetime | None:
        value = self.text(name)
        if value is None:
            return None
        try:
            when = datetime.fromisoformat(value.replace(" ", "T").replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(
                f"{name} must be an ISO 8601 time (2026-12-05T14:00:00Z), not {value[:40]!r}", param=name
            ) from None
        if when.tzinfo is None:
            raise BadRequest(f"{name} needs a time zone (Z or +01:00)", param=name)
        return when


def rollout_filter(q: Query) -> stats.RolloutFilter:
    where = stats.RolloutFilter(
        dataset=q.text("dataset"),
        mode=q.text("mode", stats.MODES),
        status=q.text("status", stats.STATUSES),
        version=q.integer("version", 0, 2**31 - 1),
        reward_min=q.number("reward_min"),
        reward_max=q.number("reward_max"),
        agent=q.text("agent"),
        since=q.time("since"),
        until=q.time("until"),
    )
    if where.reward_min is not None and where.reward_max is not None and where.reward_min > where.reward_max:
        raise BadRequest("reward_min is above reward_max", param="reward_min")
    return where


async def get_rollouts(scope: Scope, pool: Pool, send: Send) -> int:
    q = Query(scope)
    where = rollout_filter(q)
    size = q.integer("page_size", 1, MAX_PAGE_SIZE) or PAGE_SIZE
    page = q.integer("page", 1, 1_000_000) or 1

    async def read(conn: asyncpg.Connection) -> tuple[int, list[dict[str, Any]]]:
        return await stats.rollouts(conn, where, size, (page - 1) * size)

    total, rows = await read_bounded(pool, read)
    await respond_json(send, 200, {"total": total, "page": page, "page_size": size, "data": rows})
    return 200


async def get_rollout(rollout_id: str, pool: Pool, send: Send) -> int:
    check_id(rollout_id, "rollout id")

    async def read(conn: asyncpg.Connection) -> dict[str, Any] | None:
        return await stats.rollout(conn, rollout_id)

    found = await read_bounded(pool, read)
    if found is None:
        raise NotFound(f"rollout {rollout_id!r} does not exist")
    await respond_json(send, 200, found)
    return 200


async def get_steps(scope: Scope, pool: Pool, send: Send) -> int:
    q = Query(scope)
    policy = q.text("policy")
    limit = q.integer("limit", 1, MAX_STEPS) or MAX_STEPS

    async def read(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        return await stats.training_steps(conn, policy, limit)

    await respond_json(send, 200, {"data": await read_bounded(pool, read)})
    return 200


async def get_rewards(pool: Pool, send: Send) -> int:
    await respond_json(send, 200, {"data": await read_bounded(pool, stats.rewards_by_version)})
    return 200


async def get_overview(
    scope: Scope,
    pool: Pool,
    recorder: Recorder,
    upstreams: Upstreams,
    policies: list[PolicyModelSettings],
    send: Send,
) -> int:
    minutes = Query(scope).integer("minutes", 1, 24 * 60) or ACTIVITY_MINUTES

    async def read(conn: asyncpg.Connection) -> dict[str, Any]:
        return {
            "live_versions": await stats.live_versions(conn),
            "rewards": await stats.rewards_by_version(conn),
            "activity": await stats.activity(conn, minutes),
            "queue": await stats.queue_depth(conn),
        }

    data, engines = await asyncio.gather(read_bounded(pool, read), probe_engines(upstreams, policies))
    writer = recorder.writer
    data["writer"] = {
        "queue_rows": writer.queue_depth,
        "spool_bytes": writer.spool.pending_bytes(),
        "dropped": writer.stats.rows_dropped,
        "rejected": writer.stats.rows_rejected,
        "degraded": writer.degraded,
    }
    data["engines"] = engines
    await respond_json(send, 200, data)
    return 200


async def probe_engines(upstreams: Upstreams, policies: list[PolicyModelSettings]) -> list[dict[str, Any]]:
    probes = [
        (p.name, url, p.api_key.get_secret_value() if p.api_key else None)
        for p in policies
        for url in p.upstreams
    ]
    answers = await asyncio.gather(*(upstreams.probe(upstream_base(url), key) for _, url, key in probes))
    return [{"policy": name, **answer} for (name, _, _), answer in zip(probes, answers, strict=True)]


async def rollout_exists(rollout_id: str, pool: Pool) -> bool:
    check_id(rollout_id, "rollout id")

    async def read(conn: asyncpg.Connection) -> bool:
        return await stats.rollout_exists(conn, rollout_id)

    return bool(await read_bounded(pool, read))


async def get_samples(
    rollout_id: str,
    pool: Pool,
    policies: list[PolicyModelSettings],
    agents: list[str],
    token_text: TokenText,
    send: Send,
    credit: tuple[str, float] = ("rollout", 1.0),
    live: Callable[[str], int] = lambda _adapter: 0,
) -> int:
    """The trainer's view of a rollout: its calls as a claim hands them over, rebuilt into samples
    by the trainer's own code (the tokens trained on, and the context masked out), one entry per
    adapter (the policy's own and each agent's), with each trained turn's reward and return as
    turn credit computes them (`credit`: the trainer's CREDIT and GAMMA). `live`: an adapter's
    live version (an agent's adapter without one trains on the calls the policy's served)."""
    check_id(rollout_id, "rollout id")

    async def read(conn: asyncpg.Connection) -> tuple[bool, list[Any], Any]:
        exists = await stats.rollout_exists(conn, rollout_id)
        return exists, await rollout_calls(conn, rollout_id), await rollout_training_rewards(conn, rollout_id)

    exists, calls, (turn_rewards, own_reward, reward) = await read_bounded(pool, read)
    if not exists:
        raise NotFound(f"rollout {rollout_id!r} does not exist")
    # In a thread: the trainer package imports torch on first use (about a second), and a long
    # rollout's rebuild is CPU work; neither may stall the calls this process serves.
    loop = asyncio.get_running_loop()
    out, final = await loop.run_in_executor(
        _VIEWS,
        _rebuild_all,
        rollout_id,
        calls,
        policies,
        agents,
        token_text,
        (turn_rewards, own_reward, reward, credit[1]),
        {a.name: live(a.name) for p in policies for a in p.adapters()},
    )
    body = {
        "rollout_id": rollout_id,
        "credit": {
            "mode": credit[0],
            "gamma": credit[1],
            "final_reward": final,
            "turn_rewards": turn_rewards,
        },
        "policies": out,
    }
    await respond_json(send, 200, body)
    return 200


# The trainer's views rebuild (and, once per model, load a tokenizer) in threads of their own:
# a slow one must not take the default executor's threads, which the policy lane uses too.
_VIEWS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lightloop-trainer-view")


def _rebuild_all(
    rollout_id: str,
    calls: list[Any],
    policies: list[PolicyModelSettings],
    agents: list[str],
    token_text: TokenText,
    rewards: tuple[dict[str, float], float | None, float | None, float],
    lives: dict[str, int],
) -> tuple[list[dict[str, Any]], float]:
    """The samples of each adapter of each policy, and R as the trainer takes it
    (trainer/credit.py)."""
    from lightloop.trainer.credit import call_returns, final_reward
    from lightloop.trainer.rebuild import rebuild, trainable_for, turns_from_calls

    turn_rewards, own_reward, reward, gamma = rewards
    final = final_reward(own_reward, turn_rewards, reward)
    # Every call's return under turn credit (trainer/credit.py), shown beside its trained tokens.
    returns = call_returns([c["span_id"] for c in calls], turn_rewards, final, gamma)
    out = []
    for policy in policies:
        own = [c for c in calls if c["model"] == policy.name]
        if not own:
            continue
        listed = list(policy.agents)
        for adapter, agent in [(policy.name, None), *((policy.adapter_of(a), a) for a in listed)]:
            # As the trainer selects (trainer/loop.py): the calls each adapter owns, of
            # TRAINER__AGENTS; an adapter with nothing to train here is left out.
            trainable = trainable_for(
                adapter,
                agents,
                policy.name,
                agent=agent,
                others=listed,
                adopting=agent is not None and lives.get(adapter, 0) == 0,
            )
            samples, rebuilt = rebuild(rollout_id, turns_from_calls(own, trainable))
            if agent is not None and not samples:
                continue
            out.append(
                _adapter_view(adapter, agent, policy, samples, rebuilt, token_text, turn_rewards, returns)
            )
    return out, final


def _adapter_view(
    adapter: str,
    agent: str | None,
    policy: PolicyModelSettings,
    samples: list[Any],
    rebuilt: Any,
    token_text: TokenText,
    turn_rewards: dict[str, float],
    returns: dict[str, float],
) -> dict[str, Any]:
    """One adapter's samples as the trainer's view shows them ("policy": the adapter's name)."""
    return {
        "policy": adapter,
        "agent": agent,
        "stats": rebuilt.as_dict(),
        "samples": [
            {
                "prompt_len": s.prompt_len,
                "input_ids": s.input_ids,
                # Each id decoded alone; null where this machine has no tokenizer for it.
                "tokens": token_text.texts(policy.base_model, s.input_ids),
                "loss_mask": s.loss_mask,
                "logprobs": s.logprobs,
                "policy_versions": sorted(s.policy_versions),
                "turns": [
                    {
                        "start": start,
                        "end": end,
                        "span_id": span_id,
                        "reward": turn_rewards.get(span_id or "", 0.0),
                        "return": returns.get(span_id or "", 0.0),
                    }
                    for start, end, span_id in s.turns
                ],
            }
            for s in samples
        ],
    }
