"""`lightloop proxy` as a real process in front of `lightloop engine --model tiny` (and a
vLLM-shaped stub for fault injection), recording into a real Postgres; driven with the
`openai` SDK and plain HTTP, checked with SQL."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from lightloop.store import load_tasks, set_live, stage_version
from lightloop.store.database import dsn
from tests.e2e.conftest import Proxy, eventually, start_proxy
from tests.support.stub_engine import Action, StubEngine, free_port, running_stub

HI = [{"role": "user", "content": "Say hi."}]


async def _connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn(url))
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    return conn


def sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await _connect(url)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def db_call(url: str, fn: Any) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(dsn(url))
        try:
            return await fn(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    with running_stub() as s:
        yield s


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, engine: str, stub: StubEngine, module_db: str
) -> Iterator[Proxy]:
    config = {
        "policy": [
            {"name": "policy", "base_model": "tiny", "upstreams": [engine]},
            {
                "name": "stub",
                "base_model": "stub-base",
                "upstreams": [stub.url + "/v1"],
                "agents": {"planner": {}, "coder": {}},
            },
            {"name": "dead", "base_model": "x", "upstreams": [f"http://127.0.0.1:{free_port()}"]},
        ],
        "model_list": [
            {
                "model_name": "other",
                "litellm_params": {"model": "openai/tiny", "api_base": f"{engine}/v1", "api_key": "none"},
            }
        ],
    }
    p = start_proxy(tmp_path_factory.mktemp("proxy-home"), module_db, config)
    yield p
    p.stop()


@pytest.fixture
def client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)


def finish(proxy: Proxy, rollout: str, **body: Any) -> httpx.Response:
    """Finishing a rollout also waits for its calls to be written: the tests' sync point."""
    return httpx.post(
        f"{proxy.url}/v1/rollouts/{rollout}/finish",
        json=body or {"status": "succeeded"},
        headers=proxy.headers,
    )


def calls(url: str, rollout: str) -> list[asyncpg.Record]:
    return sql(url, "SELECT * FROM llm_calls WHERE rollout_id = $1 ORDER BY seq, choice_index", rollout)


# -- the policy lane ---------------------------------------------------------------------------


def test_path_form_non_streamed_records_the_engines_token_ids(proxy: Proxy, module_db: str) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/rollout/path-1/v1", api_key=proxy.key, max_retries=0)
    first = client.chat.completions.create(model="policy", messages=HI, max_tokens=6, temperature=0.7)
    second = client.chat.completions.create(model="policy", messages=HI, max_tokens=4)
    assert finish(proxy, "path-1").status_code == 200
    rows = calls(module_db, "path-1")
    assert [r["seq"] for r in rows] == [0, 1]
    for row, completion in zip(rows, (first, second), strict=True):
        extra = completion.model_extra or {}
        choice_extra = completion.choices[0].model_extra or {}
        assert row["prompt_token_ids"] == extra["prompt_token_ids"]
        assert row["completion_token_ids"] == choice_extra["token_ids"]
        assert row["completion_logprobs"] == pytest.approx(
            [e.logprob for e in completion.choices[0].logprobs.content], abs=1e-5
        )
        assert row["response_id"] == completion.id
        assert row["policy_version"] == 0
        assert row["model"] == "policy"
        assert row["finish_reason"] == completion.choices[0].finish_reason
        assert row["request"]["messages"] == HI
        assert "token_ids" not in json.dumps(row["response"])  # kept in the arrays, not twice
    span = sql(module_db, "SELECT * FROM spans WHERE span_id = $1", rows[0]["span_id"])[0]
    assert span["name"] == "chat policy"
    assert span["attributes"]["gen_ai.operation.name"] == "chat"
    assert span["attributes"]["gen_ai.request.model"] == "policy"
    assert span["attributes"]["gen_ai.response.id"] == first.id
    assert span["attributes"]["gen_ai.usage.output_tokens"] == len(rows[0]["completion_token_ids"])
    assert span["attributes"]["lightloop.rollout.id"] == "path-1"
    assert span["attributes"]["lightloop.policy.version"] == 0
    assert span["input_tokens"] == len(rows[0]["prompt_token_ids"])
    rollout = sql(module_db, "SELECT * FROM rollouts WHERE id = 'path-1'")[0]
    assert rollout["status"] == "succeeded" and rollout["metadata"]["attribution"] == "path"


async def test_async_stream_with_headers_matches_the_chunks(proxy: Proxy, module_db: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)
    headers = {
        "X-Lightloop-Rollout": "hdr-1",
        "X-Lightloop-Group": "g-1",
        "X-Lightloop-Agent": "solver",
        "X-Lightloop-Task": "t-7",
    }
    stream = await client.chat.completions.create(
        model="policy", messages=HI, max_tokens=7, stream=True, extra_headers=headers
    )
    ids: list[int] = []
    prompt_ids = None
    text = ""
    async for chunk in stream:
        extra = chunk.model_extra or {}
        prompt_ids = prompt_ids or extra.get("prompt_token_ids")
        for choice in chunk.choices:
            ids += (choice.model_extra or {}).get("token_ids") or []
            text += choice.delta.content or ""
    await client.close()
    assert (await asyncio.to_thread(finish, proxy, "hdr-1")).status_code == 200
    (row,) = await asyncio.to_thread(calls, module_db, "hdr-1")
    assert row["completion_token_ids"] == ids and len(ids) > 0
    assert row["prompt_token_ids"] == prompt_ids
    assert len(row["completion_logprobs"]) == len(ids)
    assert row["response"]["choices"][0]["message"]["content"] == text
    assert row["agent"] == "solver"
    rollout = (
        await asyncio.to_thread(
            sql, module_db, "SELECT group_id, task_id, agent FROM rollouts WHERE id = 'hdr-1'"
        )
    )[0]
    assert tuple(rollout) == ("g-1", "t-7", "solver")


def test_n_2_gives_one_row_per_choice(client: openai.OpenAI, proxy: Proxy, module_db: str) -> None:
    completion = client.chat.completions.create(
        model="policy",
        messages=HI,
        max_tokens=5,
        n=2,
        temperature=1.0,
        extra_headers={"X-Lightloop-Rollout": "n2"},
    )
    finish(proxy, "n2")
    rows = calls(module_db, "n2")
    assert [r["choice_index"] for r in rows] == [0, 1]
    assert rows[0]["span_id"] == rows[1]["span_id"]
    for row, choice in zip(rows, completion.choices, strict=True):
        assert row["completion_token_ids"] == (choice.model_extra or {})["token_ids"]


def test_text_completions_are_recorded_too(proxy: Proxy, module_db: str) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/rollout/cmpl-1/v1", api_key=proxy.key, max_retries=0)
    completion = client.completions.create(model="policy", prompt="Once upon a time", max_tokens=5)
    finish(proxy, "cmpl-1")
    (row,) = calls(module_db, "cmpl-1")
    assert row["completion_token_ids"] == (completion.choices[0].model_extra or {})["token_ids"]
    assert row["prompt_token_ids"] == (completion.choices[0].model_extra or {})["prompt_token_ids"]
    assert len(row["completion_logprobs"]) == len(row["completion_token_ids"])


def test_inferred_sessions_follow_the_conversation(
    client: openai.OpenAI, proxy: Proxy, module_db: str
) -> None:
    question = [{"role": "user", "content": "Plan a trip, step one?"}]
    first = client.chat.completions.create(model="policy", messages=question, max_tokens=4)
    reply = {"role": "assistant", "content": first.choices[0].message.content}
    follow_up = [*question, reply, {"role": "user", "content": "And step two?"}]
    second = client.chat.completions.create(model="policy", messages=follow_up, max_tokens=4)
    third = client.chat.completions.create(
        model="policy",
        messages=[
            *follow_up,
            second.choices[0].message.model_dump(exclude_none=True),
            {"role": "user", "content": "3?"},
        ],
        max_tokens=3,
    )
    other = client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "Unrelated."}], max_tokens=3
    )
    rows = eventually(
        lambda: (
            sql(
                module_db,
                "SELECT rollout_id, seq, response_id FROM llm_calls WHERE response_id = ANY($1::text[])",
                [first.id, second.id, third.id, other.id],
            )
            if len(
                sql(
                    module_db,
                    "SELECT 1 FROM llm_calls WHERE response_id = ANY($1::text[])",
                    [first.id, second.id, third.id, other.id],
                )
            )
            == 4
            else None
        ),
        what="four calls written",
    )
    by_id = {r["response_id"]: r for r in rows}
    assert by_id[first.id]["rollout_id"] == by_id[second.id]["rollout_id"] == by_id[third.id]["rollout_id"]
    assert [by_id[i]["seq"] for i in (first.id, second.id, third.id)] == [0, 1, 2]
    assert by_id[other.id]["rollout_id"] != by_id[first.id]["rollout_id"]
    assert sql(module_db, "SELECT metadata FROM rollouts WHERE id = $1", by_id[first.id]["rollout_id"])[0][
        "metadata"
    ] == {"attribution": "session"}


def test_tool_calls_streamed_and_not_and_the_session_continues(
    proxy: Proxy, stub: StubEngine, module_db: str
) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Look it up."}]
    stub.script.append(Action(tool_call=True))
    first = client.chat.completions.create(model="stub", messages=messages, tools=tools, max_tokens=3)
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    stub.script.append(Action(tool_call=True))
    stream = client.chat.completions.create(
        model="stub", messages=messages, tools=tools, max_tokens=3, stream=True
    )
    chunks = list(stream)
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    rows = eventually(
        lambda: (
            (
                r := sql(
                    module_db,
                    "SELECT * FROM llm_calls WHERE response_id = ANY($1::text[]) ORDER BY seq",
                    [first.id, chunks[0].id],
                )
            )
            and len(r) == 2
            and r
        ),
        what="both tool calls written",
    )
    assert rows[0]["rollout_id"] == rows[1]["rollout_id"]
    assert rows[0]["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    streamed = rows[1]["response"]["choices"][0]["message"]["tool_calls"][0]
    assert streamed["function"] == {"name": "lookup", "arguments": '{"q":1}'}
    assert rows[1]["finish_reason"] == "tool_calls"
    # The engine was asked for token ids and logprobs, under the served model name.
    assert stub.requests[-1]["return_token_ids"] is True and stub.requests[-1]["logprobs"] is True
    assert stub.requests[-1]["model"] == "stub-base"


def test_the_live_policy_version_is_served_and_recorded(
    proxy: Proxy, stub: StubEngine, module_db: str
) -> None:
    async def publish(conn: asyncpg.Connection) -> None:
        version = await stage_version(conn, "stub", base_model="stub-base", uri="file:///tmp/v1")
        await set_live(conn, "stub", version.version)

    db_call(module_db, publish)
    eventually(
        lambda: httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()["policies"]["stub"] == 1,
        what="the proxy to learn version 1",
    )
    client = openai.OpenAI(base_url=f"{proxy.url}/rollout/ver-1/v1", api_key=proxy.key, max_retries=0)
    completion = client.chat.completions.create(model="stub", messages=HI, max_tokens=2)
    assert stub.requests[-1]["model"] == "stub-v1"
    finish(proxy, "ver-1")
    (row,) = calls(module_db, "ver-1")
    assert row["policy_version"] == 1 and row["response_id"] == completion.id


def _unknown_agent_calls(proxy: Proxy) -> float:
    text = httpx.get(f"{proxy.url}/metrics", headers=proxy.headers).text
    line = next(
        (
            x
            for x in text.splitlines()
            if x.startswith('lightloop_proxy_unknown_agent_calls_total{policy="stub"}')
        ),
        None,
    )
    return float(line.split()[-1]) if line else 0.0


def test_an_agent_with_an_adapter_of_its_own_is_served_by_it_and_others_share_the_policy_s(
    proxy: Proxy, stub: StubEngine, module_db: str
) -> None:
    """`stub` lists agents planner and coder. planner's adapter has a live version; coder's none
    yet, so the policy's adapter serves it; an agent not listed gets the policy's adapter and is
    counted. By header or by the `policy/agent` alias; each row records its agent, the adapter
    that served it and that adapter's version."""

    async def publish(conn: asyncpg.Connection) -> None:
        version = await stage_version(conn, "stub-planner", base_model="stub-base", uri="file:///tmp/p1")
        await set_live(conn, "stub-planner", version.version)

    db_call(module_db, publish)
    health = lambda: httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()["policies"]  # noqa: E731
    eventually(lambda: health()["stub-planner"] == 1, what="the proxy to learn stub-planner v1")
    shared = health()["stub"]
    shared_name = "stub-base" if shared == 0 else f"stub-v{shared}"
    unknown_before = _unknown_agent_calls(proxy)
    client = openai.OpenAI(base_url=f"{proxy.url}/rollout/agents-1/v1", api_key=proxy.key, max_retries=0)
    asks = [
        ("stub", {"X-Lightloop-Agent": "planner"}, "stub-planner-v1"),
        ("stub/coder", {}, shared_name),
        ("stub", {"X-Lightloop-Agent": "tester"}, shared_name),
        ("stub/tester", {}, shared_name),
        ("stub/planner", {"X-Lightloop-Agent": "planner"}, "stub-planner-v1"),  # both, agreeing
    ]
    for model, headers, served in asks:
        answer = client.chat.completions.create(model=model, messages=HI, max_tokens=2, extra_headers=headers)
        assert stub.requests[-1]["model"] == served, model
        assert answer.model == served  # what the agent gets back names the adapter too
    assert finish(proxy, "agents-1").status_code == 200
    rows = [(r["agent"], r["adapter"], r["policy_version"], r["model"]) for r in calls(module_db, "agents-1")]
    assert rows == [
        ("planner", "stub-planner", 1, "stub"),
        ("coder", "stub", shared, "stub"),
        ("tester", "stub", shared, "stub"),
        ("tester", "stub", shared, "stub"),
        ("planner", "stub-planner", 1, "stub"),
    ]
    assert _unknown_agent_calls(proxy) == unknown_before + 2
    # An alias and a header naming different agents, and an alias whose agent cannot be one: 400.
    for body, headers in (
        ({"model": "stub/planner"}, {"X-Lightloop-Agent": "coder"}),
        ({"model": "stub/bad agent"}, {}),
        ({"model": "stub/v2"}, {}),
    ):
        refused = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={**body, "messages": HI},
            headers={**proxy.headers, **headers},
        )
        assert refused.status_code == 400, (body, refused.text)
    # An alias of a model that is not a policy is LiteLLM's business (here: unknown, a 4xx).
    bad = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": "nopolicy/planner", "messages": HI},
        headers=proxy.headers,
    )
    assert 400 <= bad.status_code < 500


def test_a_held_out_rollout_is_served_the_version_its_round_measures(
    tmp_path: Path, stub: StubEngine, module_db: str
) -> None:
    """A val round made for v1 keeps being answered by v1 when v2 goes live meanwhile (its
    reward is v1's), until v1 is no longer among the versions the engines keep; a pinned
    version the engine no longer has (404) is answered by the live one and recorded as such."""
    proxy = start_proxy(
        tmp_path / "home",
        module_db,
        {"policy": [{"name": "pinned", "base_model": "pinned-base", "upstreams": [stub.url]}]},
        extra_env={"LIGHTLOOP_TRAINER__KEEP_VERSIONS": "2"},
    )

    def go_live(version: int) -> None:
        async def publish(conn: asyncpg.Connection) -> None:
            staged = await stage_version(
                conn, "pinned", base_model="pinned-base", uri=f"file:///tmp/p{version}"
            )
            await set_live(conn, "pinned", staged.version)

        db_call(module_db, publish)
        eventually(
            lambda: (
                httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()["policies"]["pinned"]
                == version
            ),
            what=f"the proxy to learn version {version}",
        )

    def ask(base_url: str) -> str:
        client = openai.OpenAI(base_url=base_url, api_key=proxy.key, max_retries=0)
        client.chat.completions.create(model="pinned", messages=HI, max_tokens=2)
        return str(stub.requests[-1]["model"])

    try:

        async def load(conn: asyncpg.Connection) -> None:
            for split in ("train", "val"):
                tasks = [{"id": f"{split}{i}", "q": i} for i in range(3)]
                await load_tasks(conn, "pins", split, tasks, group_size=1, policy="pinned")

        db_call(module_db, load)
        go_live(1)
        nxt = lambda: httpx.post(  # noqa: E731
            f"{proxy.url}/v1/tasks/next", json={"dataset": "pins", "split": "val"}, headers=proxy.headers
        ).json()
        first, second, third = nxt(), nxt(), nxt()
        assert {h["policy_version"] for h in (first, second, third)} == {1}
        assert ask(first["base_url"]) == "pinned-v1"
        go_live(2)
        # v2 is live; the round for v1 is still answered by v1, ordinary traffic by v2.
        assert ask(first["base_url"]) == "pinned-v1"
        assert ask(second["base_url"]) == "pinned-v1"
        assert ask(f"{proxy.url}/rollout/free-1/v1") == "pinned-v2"
        # The engine lost v1 before the proxy learnt of it: the live version answers instead.
        stub.script.append(Action(status=404))
        assert ask(third["base_url"]) == "pinned-v2"
        assert stub.requests[-2]["model"] == "pinned-v1"
        go_live(3)
        # Two versions kept (2 and 3): v1 is unloaded, so its round's last calls get v3.
        assert ask(second["base_url"]) == "pinned-v3"
        for handout in (first, second, third):
            finish(proxy, handout["rollout_id"])
        versions = [
            [r["policy_version"] for r in calls(module_db, h["rollout_id"])] for h in (first, second, third)
        ]
        assert versions == [[1, 1], [1, 3], [2]], versions
    finally:
        proxy.stop()


def test_rollouts_stick_to_one_replica(tmp_path: Path, module_db: str) -> None:
    with running_stub() as a, running_stub() as b:
        config = {"policy": [{"name": "p", "base_model": "m", "upstreams": [a.url, b.url]}]}
        proxy = start_proxy(tmp_path / "home", module_db, config)
        try:
            client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=proxy.key, max_retries=0)
            for rollout in [f"sticky-{i}" for i in range(8)]:
                before = (len(a.requests), len(b.requests))
                for _ in range(3):
                    client.chat.completions.create(
                        model="p", messages=HI, extra_headers={"X-Lightloop-Rollout": rollout}
                    )
                gained = (len(a.requests) - before[0], len(b.requests) - before[1])
                assert sorted(gained) == [0, 3], f"{rollout} was spread over replicas: {gained}"
            assert a.requests and b.requests, "every rollout went to the same replica"
        finally:
            proxy.stop()


# -- the LiteLLM lane --------------------------------------------------------------------------


def test_a_non_policy_model_goes_through_litellm_and_is_recorded(proxy: Proxy, module_db: str) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/rollout/lite-1/v1", api_key=proxy.key, max_retries=0)
    completion = client.chat.completions.create(model="other", messages=HI, max_tokens=4)
    streamed = list(client.chat.completions.create(model="other", messages=HI, max_tokens=4, stream=True))
    rows = eventually(
        lambda: (r := calls(module_db, "lite-1")) and len(r) == 2 and r, what="LiteLLM-lane calls"
    )
    assert rows[0]["response_id"] == completion.id
    assert rows[1]["response_id"] == streamed[0].id
    for row in rows:
        assert row["model"] == "other"
        assert row["prompt_token_ids"] is None and row["policy_version"] is None
        assert row["request"]["messages"] == HI
    span = sql(module_db, "SELECT * FROM spans WHERE span_id = $1", rows[0]["span_id"])[0]
    assert span["name"] == "chat other" and span["attributes"]["gen_ai.provider.name"] == "openai"


def test_models_lists_policy_and_litellm_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"policy", "stub", "other"} <= ids


# -- rewards, finish, OTLP ---------------------------------------------------------------------


def test_rewards_by_rollout_and_by_response_id(client: openai.OpenAI, proxy: Proxy, module_db: str) -> None:
    completion = client.chat.completions.create(
        model="stub", messages=HI, extra_headers={"X-Lightloop-Rollout": "rw-1"}
    )
    # Right after the call: the reward waits for the call's rows instead of answering 404.
    by_response = httpx.post(
        f"{proxy.url}/v1/rewards",
        json={"response_id": completion.id, "value": 0.5, "name": "format"},
        headers=proxy.headers,
    )
    assert by_response.status_code == 200, by_response.text
    assert by_response.json()["rollout_id"] == "rw-1" and by_response.json()["span_id"]
    by_rollout = httpx.post(
        f"{proxy.url}/v1/rewards", json={"rollout_id": "rw-1", "value": 1}, headers=proxy.headers
    )
    assert by_rollout.status_code == 200
    rows = sql(module_db, "SELECT name, value, span_id FROM rewards WHERE rollout_id = 'rw-1' ORDER BY id")
    assert [(r["name"], r["value"]) for r in rows] == [("format", 0.5), ("reward", 1.0)]
    assert sql(module_db, "SELECT reward FROM rollouts WHERE id = 'rw-1'")[0]["reward"] == 1.0
    # The path form works for rewards too.
    path_reward = httpx.post(f"{proxy.url}/rollout/rw-1/v1/rewards", json={"value": 2}, headers=proxy.headers)
    assert path_reward.status_code == 200 and path_reward.json()["rollout_id"] == "rw-1"


def test_a_reward_for_a_call_lands_on_that_call_and_only_in_its_own_rollout(
    client: openai.OpenAI, proxy: Proxy, module_db: str
) -> None:
    """Turn rewards: by response id or span id, also in the path form (which names the
    rollout); a call of another rollout is a 409, and nothing is written."""
    first = client.chat.completions.create(
        model="stub", messages=HI, extra_headers={"X-Lightloop-Rollout": "turn-1"}
    )
    other = client.chat.completions.create(
        model="stub", messages=HI, extra_headers={"X-Lightloop-Rollout": "turn-2"}
    )
    in_path = httpx.post(
        f"{proxy.url}/rollout/turn-1/v1/rewards",
        json={"response_id": first.id, "value": 0.5},
        headers=proxy.headers,
    )
    assert in_path.status_code == 200, in_path.text
    span = in_path.json()["span_id"]
    assert (
        span == sql(module_db, "SELECT span_id FROM llm_calls WHERE response_id = $1", first.id)[0]["span_id"]
    )
    by_span = httpx.post(
        f"{proxy.url}/v1/rewards", json={"span_id": span, "value": 0.25}, headers=proxy.headers
    )
    assert by_span.status_code == 200 and by_span.json()["rollout_id"] == "turn-1"
    wrong = [
        (f"{proxy.url}/rollout/turn-1/v1/rewards", {"response_id": other.id, "value": 1}, {}),
        (f"{proxy.url}/v1/rewards", {"rollout_id": "turn-1", "response_id": other.id, "value": 1}, {}),
        (f"{proxy.url}/v1/rewards", {"span_id": span, "value": 1}, {"x-lightloop-rollout": "turn-2"}),
    ]
    for url, body, extra in wrong:
        answer = httpx.post(url, json=body, headers={**proxy.headers, **extra})
        assert answer.status_code == 409, (body, answer.text)
        assert "belongs to rollout" in answer.json()["error"]["message"]
    rows = sql(
        module_db, "SELECT rollout_id, span_id, value FROM rewards WHERE rollout_id LIKE 'turn-%' ORDER BY id"
    )
    assert [(r["rollout_id"], r["span_id"], r["value"]) for r in rows] == [
        ("turn-1", span, 0.5),
        ("turn-1", span, 0.25),
    ]


def test_finish_sets_status_and_reward_once(client: openai.OpenAI, proxy: Proxy, module_db: str) -> None:
    client.chat.completions.create(model="stub", messages=HI, extra_headers={"X-Lightloop-Rollout": "fin-1"})
    done = finish(proxy, "fin-1", status="failed", reward=-1)
    assert done.status_code == 200 and done.json()["changed"] is True
    row = sql(module_db, "SELECT status, reward, finished_at FROM rollouts WHERE id = 'fin-1'")[0]
    assert row["status"] == "failed" and row["reward"] == -1 and row["finished_at"] is not None
    again = finish(proxy, "fin-1", status="failed")
    assert again.status_code == 200 and again.json()["changed"] is False
    conflict = finish(proxy, "fin-1", status="succeeded")
    assert conflict.status_code == 409 and "already finished" in conflict.json()["error"]["message"]


def test_otlp_spans_from_the_sdk_join_the_proxys_trace(
    client: openai.OpenAI, proxy: Proxy, module_db: str
) -> None:
    from opentelemetry import propagate, trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "my-agent"}))
    exporter = OTLPSpanExporter(endpoint=f"{proxy.url}/v1/traces", headers=proxy.headers)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("agent")
    with tracer.start_as_current_span("agent.step", attributes={"lightloop.rollout.id": "otel-1"}) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        client.chat.completions.create(
            model="stub", messages=HI, extra_headers={**carrier, "X-Lightloop-Rollout": "otel-1"}
        )
        trace_id = format(span.get_span_context().trace_id, "032x")
        agent_span_id = format(span.get_span_context().span_id, "016x")
    provider.shutdown()
    finish(proxy, "otel-1")
    rows = eventually(
        lambda: (
            (r := sql(module_db, "SELECT * FROM spans WHERE trace_id = $1 ORDER BY start_time", trace_id))
            and len(r) == 2
            and r
        ),
        what="both spans",
    )
    agent, llm = rows
    assert agent["span_id"] == agent_span_id and agent["name"] == "agent.step"
    assert agent["resource"]["service.name"] == "my-agent" and agent["rollout_id"] == "otel-1"
    assert llm["parent_span_id"] == agent_span_id and llm["name"] == "chat stub"
    assert trace.get_current_span() is not None


def test_agent_spans_that_name_no_rollout_join_it_by_their_trace(
    client: openai.OpenAI, proxy: Proxy, module_db: str
) -> None:
    # An agent traced with the OpenTelemetry SDK alone: no lightloop attribute on its spans,
    # only the W3C trace context its calls carry.
    from opentelemetry import propagate
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{proxy.url}/v1/traces", headers=proxy.headers))
    )
    tracer = provider.get_tracer("agent")
    with tracer.start_as_current_span("agent.run") as run:
        # Ends, and is exported, before the proxy has seen the trace: named at the finish.
        with tracer.start_as_current_span("agent.plan"):
            pass
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        client.chat.completions.create(
            model="stub", messages=HI, extra_headers={**carrier, "X-Lightloop-Rollout": "trace-join-1"}
        )
        trace_id = format(run.get_span_context().trace_id, "032x")
    provider.shutdown()
    before = eventually(
        lambda: (
            (r := sql(module_db, "SELECT name, rollout_id FROM spans WHERE trace_id = $1", trace_id))
            and len(r) == 3
            and {x["name"]: x["rollout_id"] for x in r}
        ),
        what="the three spans",
    )
    # agent.run was exported after the call: named at ingest, from the trace the proxy saw.
    assert before == {"agent.plan": None, "agent.run": "trace-join-1", "chat stub": "trace-join-1"}
    assert finish(proxy, "trace-join-1").status_code == 200
    rows = eventually(
        lambda: (
            (r := sql(module_db, "SELECT name FROM spans WHERE rollout_id = 'trace-join-1' ORDER BY name"))
            and len(r) == 3
            and r
        ),
        what="the rollout's whole trace by rollout_id",
    )
    assert [r["name"] for r in rows] == ["agent.plan", "agent.run", "chat stub"]
    assert {
        r["trace_id"] for r in sql(module_db, "SELECT trace_id FROM spans WHERE rollout_id = 'trace-join-1'")
    } == {trace_id}


def test_a_trace_that_spans_two_rollouts_names_neither(
    client: openai.OpenAI, proxy: Proxy, module_db: str
) -> None:
    trace_id, parent = "7" * 32, "8" * 16
    for rollout in ("shared-a", "shared-b"):
        client.chat.completions.create(
            model="stub",
            messages=HI,
            extra_headers={"traceparent": f"00-{trace_id}-{parent}-01", "X-Lightloop-Rollout": rollout},
        )
    root = {
        "traceId": trace_id,
        "spanId": parent,
        "name": "agent.batch",
        "startTimeUnixNano": "1700000000000000000",
    }
    body = {"resourceSpans": [{"scopeSpans": [{"spans": [root]}]}]}
    assert httpx.post(f"{proxy.url}/v1/traces", json=body, headers=proxy.headers).status_code == 200
    for rollout in ("shared-a", "shared-b"):
        assert finish(proxy, rollout).status_code == 200
    rows = eventually(
        lambda: sql(module_db, "SELECT rollout_id FROM spans WHERE span_id = $1", parent),
        what="the root span",
    )
    assert rows[0]["rollout_id"] is None


def test_otlp_json_gzip_and_bad_bodies(proxy: Proxy, module_db: str) -> None:
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "name": "tool.search",
        "kind": 1,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000001000000000",
        "attributes": [
            {"key": "lightloop.rollout.id", "value": {"stringValue": "json-1"}},
            {"key": "n", "value": {"intValue": "3"}},
        ],
        "status": {"code": 2, "message": "boom"},
    }
    body = gzip.compress(
        json.dumps({"resourceSpans": [{"scopeSpans": [{"scope": {"name": "s"}, "spans": [span]}]}]}).encode()
    )
    headers = {**proxy.headers, "content-type": "application/json", "content-encoding": "gzip"}
    answer = httpx.post(f"{proxy.url}/v1/traces", content=body, headers=headers)
    assert answer.status_code == 200 and answer.json() == {}
    row = eventually(
        lambda: sql(module_db, "SELECT * FROM spans WHERE span_id = 'eee19b7ec3c1b174'"), what="the JSON span"
    )[0]
    assert (
        row["rollout_id"] == "json-1"
        and row["attributes"]["n"] == 3
        and row["status_code"] == "ERROR"
        and row["kind"] == "INTERNAL"
    )
    for content, ctype, encoding in (
        (b"not protobuf", "application/x-protobuf", None),
        (b"{", "application/json", None),
        (b"plain", "text/plain", None),
        (b"not gzip", "application/json", "gzip"),
        (
            json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{**span, "spanId": "zz"}]}]}]}).encode(),
            "application/json",
            None,
        ),
    ):
        h = {**proxy.headers, "content-type": ctype, **({"content-encoding": encoding} if encoding else {})}
        bad = httpx.post(f"{proxy.url}/v1/traces", content=content, headers=h)
        assert bad.status_code == 400, (content, bad.text)
        assert bad.json()["error"]["type"] == "invalid_request_error"
    # A gzip bomb: 50 KB that expand past the 10 MB body limit is a 413, and the proxy lives on.
    h = {**proxy.headers, "content-type": "application/json", "content-encoding": "gzip"}
    bomb = httpx.post(f"{proxy.url}/v1/traces", content=gzip.compress(b"\0" * 50_000_000), headers=h)
    assert bomb.status_code == 413, bomb.text
    assert httpx.get(f"{proxy.url}/health", headers=proxy.headers).status_code == 200


# -- bad input and faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "route",
    [
        "/v1/chat/completions",
        "/v1/rewards",
        "/v1/traces",
        "/metrics",
        "/health",
        "/rollout/x/v1/chat/completions",
    ],
)
def test_missing_or_wrong_key_is_401(proxy: Proxy, route: str) -> None:
    method = httpx.get if route in ("/metrics", "/health") else httpx.post
    for headers in ({}, {"authorization": "Bearer sk-wrong"}):
        answer = method(f"{proxy.url}{route}", headers=headers)  # type: ignore[operator]
        assert answer.status_code == 401, route
        assert answer.json()["error"]["type"] == "authentication_error"


def test_malformed_and_oversized_requests(proxy: Proxy) -> None:
    url = f"{proxy.url}/v1/chat/completions"
    for content in (b"{not json", b"[1, 2]", b'{"messages": []}', b'{"model": "policy", "messages": "hi"}'):
        answer = httpx.post(
            url, content=content, headers={**proxy.headers, "content-type": "application/json"}
        )
        assert answer.status_code == 400, content
        assert answer.json()["error"]["type"] == "invalid_request_error"
    big = (
        b'{"model": "policy", "messages": [{"role": "user", "content": "'
        + b"x" * (11 * 1024 * 1024)
        + b'"}]}'
    )
    answer = httpx.post(url, content=big, headers={**proxy.headers, "content-type": "application/json"})
    assert answer.status_code == 413 and "limit" in answer.json()["error"]["message"]
    bad_rollout = httpx.post(
        f"{proxy.url}/rollout/bad%20id/v1/chat/completions",
        json={"model": "policy", "messages": HI},
        headers=proxy.headers,
    )
    assert bad_rollout.status_code == 400


def test_reward_errors(proxy: Proxy) -> None:
    url = f"{proxy.url}/v1/rewards"
    cases = [
        ({"rollout_id": "no-such-rollout", "value": 1}, 404),
        ({"response_id": "chatcmpl-unknown", "value": 1}, 404),
        ({"rollout_id": "rw-x", "value": "high"}, 422),
        ({"rollout_id": "rw-x", "value": True}, 422),
        ({"rollout_id": "rw-x", "value": 1e400}, 422),
        ({"value": 1}, 400),
        ({"response_id": "b", "span_id": "c", "value": 1}, 400),
        ({"span_id": "no-such-span", "value": 1}, 404),
        ({"rollout_id": "a"}, 400),
    ]
    for body, status in cases:
        answer = httpx.post(
            url,
            content=json.dumps(body).replace("Infinity", "1e400"),
            headers={**proxy.headers, "content-type": "application/json"},
        )
        assert answer.status_code == status, (body, answer.text)
        assert "error" in answer.json()
    nan = httpx.post(url, content=b'{"rollout_id": "a", "value": NaN}', headers=proxy.headers)
    assert nan.status_code == 422
    assert httpx.post(url, content=b"{oops", headers=proxy.headers).status_code == 400
    assert (
        httpx.post(
            f"{proxy.url}/v1/rollouts/nope/finish", json={"status": "succeeded"}, headers=proxy.headers
        ).status_code
        == 404
    )
    assert (
        httpx.post(
            f"{proxy.url}/v1/rollouts/x/finish", json={"status": "maybe"}, headers=proxy.headers
        ).status_code
        == 400
    )


def test_engine_down_is_502_and_recorded_as_failed(proxy: Proxy, module_db: str) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/rollout/down-1/v1", api_key=proxy.key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="dead", messages=HI)
    assert caught.value.status_code == 502
    finish(proxy, "down-1", status="failed")
    (row,) = calls(module_db, "down-1")
    assert row["finish_reason"] == "error" and row["completion_token_ids"] is None
    span = sql(module_db, "SELECT status_code, attributes FROM spans WHERE span_id = $1", row["span_id"])[0]
    assert span["status_code"] == "ERROR" and span["attributes"]["error.type"] == "upstream_error"


def test_5xx_is_retried_before_any_byte_and_then_passed_on(
    proxy: Proxy, stub: StubEngine, module_db: str
) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/rollout/retry-1/v1", api_key=proxy.key, max_retries=0)
    stub.script.extend([Action(status=500), Action(status=503)])
    seen = len(stub.requests)
    completion = client.chat.completions.create(model="stub", messages=HI)
    assert len(stub.requests) - seen == 3 and completion.choices[0].message.content
    # Every try fails with 500: the proxy answers its own 503 (not the engine's status passed on).
    stub.script.extend([Action(status=500)] * 3)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="stub", messages=HI)
    assert caught.value.status_code == 503
    assert caught.value.body["type"] == "upstream_unavailable", caught.value.body  # type: ignore[index]
    finish(proxy, "retry-1")
    rows = calls(module_db, "retry-1")
    assert [r["finish_reason"] for r in rows] == ["length", "error"]


def test_client_disconnect_cancels_the_engine_and_records_abort(
    proxy: Proxy, stub: StubEngine, module_db: str
) -> None:
    stub.disconnected.clear()
    stub.script.append(Action(hold=True))
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            f"{proxy.url}/rollout/abort-1/v1/chat/completions",
            json={"model": "stub", "messages": HI, "stream": True},
            headers=proxy.headers,
        ) as response,
    ):
        lines = response.iter_lines()
        # The first token's chunk (the chunk before it already says "prompt_token_ids"): what
        # the agent saw before hanging up is what must be recorded.
        while '"token_ids": [1000]' not in next(lines):
            pass
    # Leaving the block closed the connection mid-stream; the proxy must cut the engine's.
    assert stub.disconnected.wait(30), "the engine's request was not cancelled"
    row = eventually(lambda: calls(module_db, "abort-1"), what="the aborted call")[0]
    assert row["finish_reason"] == "abort"
    assert row["completion_token_ids"] == [1000]


def test_metrics_and_health(proxy: Proxy, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="stub", messages=HI)
    text = httpx.get(f"{proxy.url}/metrics", headers=proxy.headers).text
    assert 'lightloop_proxy_requests_total{route="completions",status="200"}' in text
    assert "lightloop_proxy_request_seconds_bucket" in text
    for name in (
        "lightloop_writer_queue_rows",
        "lightloop_writer_spool_bytes",
        'lightloop_writer_rows_total{outcome="dropped"}',
    ):
        assert name in text
    health = httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()
    assert health["status"] == "ok" and health["database"] == "up"


def test_concurrent_calls_are_all_recorded_once(proxy: Proxy, module_db: str) -> None:
    async def burst() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=f"{proxy.url}/rollout/burst-1/v1", api_key=proxy.key, max_retries=0
        )
        results = await asyncio.gather(
            *[client.chat.completions.create(model="stub", messages=HI) for _ in range(50)]
        )
        await client.close()
        return [r.id for r in results]

    ids = asyncio.run(burst())
    finish(proxy, "burst-1")
    rows = calls(module_db, "burst-1")
    assert sorted(r["response_id"] for r in rows) == sorted(ids)
    assert sorted(r["seq"] for r in rows) == list(range(50))


def test_the_client_helper_attributes_calls_and_posts_the_reward(proxy: Proxy, module_db: str) -> None:
    from lightloop.client import RolloutError, rollout

    with rollout(proxy.url + "/v1", proxy.key, group="helper-task", group_size=3) as r:
        client = openai.OpenAI(
            base_url=r.base_url, api_key=proxy.key, default_headers=r.headers, max_retries=0
        )
        client.chat.completions.create(model="stub", messages=HI)
        client.chat.completions.create(model="stub", messages=HI)
        r.reward = 0.75
    row = sql(module_db, "SELECT group_id, group_size, status, reward FROM rollouts WHERE id = $1", r.id)[0]
    assert tuple(row) == ("helper-task", 3, "succeeded", 0.75)
    assert len(calls(module_db, r.id)) == 2

    def failing_agent() -> str:
        with rollout(proxy.url, proxy.key) as failing:
            openai.OpenAI(
                base_url=failing.base_url, api_key=proxy.key, max_retries=0
            ).chat.completions.create(model="stub", messages=HI)
            raise ZeroDivisionError(failing.id)

    with pytest.raises(ZeroDivisionError) as raised:
        failing_agent()
    failing_id = str(raised.value)
    assert sql(module_db, "SELECT status FROM rollouts WHERE id = $1", failing_id)[0][0] == "failed"
    with pytest.raises(RolloutError, match="404"), rollout(proxy.url, proxy.key):
        pass  # no call made: there is no rollout to finish


@pytest.mark.parametrize("model", ["policy", "stub"])
def test_a_streamed_call_is_recorded_exactly_as_its_non_streamed_twin(
    client: openai.OpenAI, proxy: Proxy, module_db: str, model: str
) -> None:
    """The same greedy call, once streamed and once not (the real CPU engine, and the stub whose
    chunks carry logprobs): the rows the trainer reads are the same, value for value."""
    messages = [{"role": "user", "content": "Count: one, two,"}]
    rows = {}
    for stream in (False, True):
        rollout = f"twin-{model}-{stream}"
        answer = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            seed=7,
            stream=stream,
            extra_headers={"x-lightloop-rollout": rollout},
        )
        if stream:
            list(answer)  # type: ignore[arg-type]
        assert finish(proxy, rollout).status_code == 200
        (rows[stream],) = calls(module_db, rollout)
    plain, streamed = rows[False], rows[True]
    assert len(plain["completion_token_ids"]) == 8
    for column in ("prompt_token_ids", "completion_token_ids", "completion_logprobs", "finish_reason"):
        assert streamed[column] == plain[column], column
    assert streamed["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == 8
    assert streamed["request"]["messages"] == plain["request"]["messages"] == messages
    plain_message = plain["response"]["choices"][0]["message"]
    streamed_message = streamed["response"]["choices"][0]["message"]
    assert streamed_message["content"] == plain_message["content"]
