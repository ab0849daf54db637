"""`/v1/stats/...` on a real proxy process over a real Postgres: each route's figures against the
same figures computed here with plain SQL, filters that do not parse named in the 400, and every
route closed to agent keys."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.conftest import Proxy, start_proxy, stub_policy
from tests.e2e.test_proxy import sql
from tests.support.stub_engine import StubEngine

NOW = datetime.now(UTC)
SINCE = NOW - timedelta(minutes=10, seconds=30)
DEAD_ENGINE = "http://127.0.0.1:1"
VERSION = "coalesce((SELECT min(policy_version) FROM llm_calls WHERE rollout_id = id), policy_version)"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, stub: StubEngine, module_db: str) -> Iterator[Proxy]:
    seed(module_db)
    config = stub_policy(stub)
    config["policy"][0]["upstreams"].append(DEAD_ENGINE)  # an engine that is down: the overview says so
    p = start_proxy(tmp_path_factory.mktemp("stats-home"), module_db, config)
    yield p
    p.stop()


def seed(db: str) -> None:
    """Two datasets' rollouts over three versions, calls, an agent span, rewards, steps."""
    sql(db, "INSERT INTO datasets (name, policy) VALUES ('math', 'policy'), ('code', 'policy')")
    sql(
        db,
        """INSERT INTO tasks (dataset, split, id, input) VALUES
           ('math', 'train', 't1', '{"q": "1+1"}'), ('math', 'val', 't1', '{"q": "2+2"}')""",
    )
    sql(db, "INSERT INTO training_steps "
        "(step, policy, loss, reward_mean, reward_std, n_tokens, metrics, finished_at) "
        "OVERRIDING SYSTEM VALUE VALUES "
        "(1, 'policy', 0.5, 0.25, 0.1, 100, '{\"grad_norm\": 1.5}', now()), "
        "(2, 'policy', 0.4, 0.5, 0.2, 120, '{\"grad_norm\": 1.2}', now())")  # fmt: skip
    sql(
        db,
        """INSERT INTO policy_versions (policy, version, base_model, status, live_at) VALUES
           ('policy', 1, 'stub-base', 'retired', now() - interval '1 hour'),
           ('policy', 2, 'stub-base', 'live', now())""",
    )
    rows = []
    for i in range(30):
        dataset = ("math", "code", None)[i % 3]
        mode = "val" if i % 5 == 0 else "train"
        status = ("succeeded", "failed", "running", "queued")[i % 4]
        reward = None if status in ("running", "queued") else round((i % 7) / 6, 3)
        rows.append(
            (f"r{i:02d}", dataset, mode, status, reward, i % 3, f"agent-{i % 2}", NOW - timedelta(minutes=i))
        )
    sql(
        db,
        """INSERT INTO rollouts
               (id, dataset, mode, status, reward, policy_version, agent, created_at, task_id)
           SELECT id, dataset, mode, status, reward, version, agent, created_at, 't1'
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::int[],
                       $7::text[], $8::timestamptz[])
                AS x (id, dataset, mode, status, reward, version, agent, created_at)""",
        *[list(col) for col in zip(*rows, strict=True)],
    )
    # r12 had its calls served by version 2 (the call's version wins over the hand-out's).
    trace = "ab" * 16
    for seq, span_id in enumerate(("c0", "c1")):
        sql(
            db,
            """INSERT INTO spans (span_id, trace_id, name, start_time) VALUES ($1, $2, 'chat policy', $3)""",
            span_id,
            trace,
            NOW - timedelta(seconds=10 - seq),
        )
        sql(
            db,
            """INSERT INTO llm_calls (span_id, rollout_id, seq, model, policy_version, request, response,
                                      prompt_token_ids, completion_token_ids, finish_reason, created_at)
               VALUES ($1, 'r12', $2, 'policy', 2, $3, $4, '{1,2,3}', '{4,5}', 'stop', $5)""",
            span_id,
            seq,
            {"messages": [{"role": "user", "content": f"question {seq}"}]},
            {"choices": [{"message": {"role": "assistant", "content": f"answer {seq}"}}]},
            NOW - timedelta(seconds=10 - seq),
        )
    # The agent's own span: no rollout id, tied by the trace it shares with the proxy's spans.
    sql(
        db,
        "INSERT INTO spans (span_id, trace_id, name, start_time) "
        "VALUES ('agent-span', $1, 'tool.search', $2)",
        trace,
        NOW - timedelta(seconds=11),
    )
    sql(db, "INSERT INTO rewards (rollout_id, span_id, name, value) VALUES ('r12', 'c1', 'reward', 0.5)")
    # r07: two turns for the trainer's view, the second's prompt extending the first's whole
    # sequence with a tool result (older than the overview's activity window).
    turns = (([1, 2, 3], [4, 5], [-0.1, -0.2]), ([1, 2, 3, 4, 5, 6], [7], [-0.3]))
    for seq, (prompt, completion, logprobs) in enumerate(turns):
        sql(
            db,
            """INSERT INTO llm_calls (span_id, rollout_id, seq, model, policy_version, request,
                                      prompt_token_ids, completion_token_ids, completion_logprobs,
                                      created_at)
               VALUES ($1, 'r07', $2, 'policy', 1, '{}', $3, $4, $5, now() - interval '2 hours')""",
            f"tv{seq}",
            seq,
            prompt,
            completion,
            logprobs,
        )


def get(proxy: Proxy, path: str, **params: Any) -> Any:
    answer = httpx.get(f"{proxy.url}{path}", params=params, headers=proxy.headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_rewards_by_version_are_the_views_figures(proxy: Proxy, module_db: str) -> None:
    expected = sql(
        module_db,
        """SELECT r.dataset, v AS version,
                  avg(r.reward) FILTER (WHERE r.mode = 'train') AS train,
                  avg(r.reward) FILTER (WHERE r.mode = 'val') AS val, count(*) AS n
           FROM rollouts r,
                LATERAL (SELECT coalesce((SELECT min(policy_version) FROM llm_calls WHERE rollout_id = r.id),
                                         r.policy_version, 0) AS v) x
           WHERE r.status IN ('succeeded', 'failed') AND r.reward IS NOT NULL
           GROUP BY r.dataset, v""",
    )
    got = get(proxy, "/v1/stats/rewards")["data"]
    assert len(got) == len(expected)
    by_key = {(g["dataset"], g["version"]): g for g in got}
    for e in expected:
        g = by_key[(e["dataset"], e["version"])]
        assert g["train_reward"] == pytest.approx(e["train"]) and g["val_reward"] == pytest.approx(e["val"])
        assert g["train_rollouts"] + g["val_rollouts"] == e["n"]
        assert g["policy"] == ("policy" if e["dataset"] else None)


def test_the_overview_shows_versions_activity_queue_writer_and_engines(
    proxy: Proxy, module_db: str, stub: StubEngine
) -> None:
    overview = get(proxy, "/v1/stats/overview", minutes=45)
    assert [(v["policy"], v["version"]) for v in overview["live_versions"]] == [("policy", 2)]
    activity = overview["activity"]
    assert len(activity) == 45
    created = sql(
        module_db,
        """SELECT count(*) AS n FROM rollouts
           WHERE created_at >= date_trunc('minute', now()) - interval '44 minutes'""",
    )[0]["n"]
    assert sum(a["rollouts"] for a in activity) == created
    assert sum(a["calls"] for a in activity) == 2
    queue = {(q["dataset"], q["mode"]): (q["queued"], q["running"]) for q in overview["queue"]}
    for row in sql(
        module_db,
        """SELECT dataset, mode, count(*) FILTER (WHERE status = 'queued') AS queued,
                  count(*) FILTER (WHERE status = 'running') AS running
           FROM rollouts WHERE dataset IS NOT NULL GROUP BY 1, 2""",
    ):
        assert queue[(row["dataset"], row["mode"])] == (row["queued"], row["running"])
    assert set(overview["writer"]) >= {"queue_rows", "spool_bytes", "dropped", "rejected", "degraded"}
    engines = {e["url"]: e for e in overview["engines"]}
    assert engines[stub.url]["healthy"] is True and engines[stub.url]["policy"] == "policy"
    assert engines[DEAD_ENGINE]["healthy"] is False and engines[DEAD_ENGINE]["models"] == []
    assert "Connect" in engines[DEAD_ENGINE]["error"], engines[DEAD_ENGINE]


def test_steps_come_oldest_first_with_their_metrics(proxy: Proxy) -> None:
    steps = get(proxy, "/v1/stats/steps")["data"]
    assert [(s["step"], s["loss"], s["metrics"]["grad_norm"]) for s in steps] == [
        (1, 0.5, 1.5),
        (2, 0.4, 1.2),
    ]
    assert [s["step"] for s in get(proxy, "/v1/stats/steps", limit=1)["data"]] == [2]


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({}, "true"),
        ({"dataset": "math", "mode": "train"}, "dataset = 'math' AND mode = 'train'"),
        ({"status": "succeeded", "reward_min": "0.3"}, "status = 'succeeded' AND reward >= 0.3"),
        ({"reward_max": "0.5", "agent": "agent-1"}, "reward <= 0.5 AND agent = 'agent-1'"),
        ({"version": "2"}, f"{VERSION} = 2"),
        ({"since": SINCE.isoformat()}, "created_at >= $1"),
    ],
)  # fmt: skip
def test_rollouts_filtered_and_paged_newest_first(
    proxy: Proxy, module_db: str, params: dict[str, str], where: str
) -> None:
    args = [SINCE] if "$1" in where else []
    expected = [
        r["id"]
        for r in sql(module_db, f"SELECT id FROM rollouts WHERE {where} ORDER BY created_at DESC", *args)
    ]
    first = get(proxy, "/v1/stats/rollouts", page_size=4, **params)
    assert first["total"] == len(expected)
    ids = [r["id"] for r in first["data"]]
    page = 2
    while len(ids) < len(expected):
        ids += [r["id"] for r in get(proxy, "/v1/stats/rollouts", page_size=4, page=page, **params)["data"]]
        page += 1
    assert ids == expected


def test_one_rollout_with_its_calls_spans_rewards_and_task(proxy: Proxy) -> None:
    r = get(proxy, "/v1/stats/rollouts/r12")
    assert (r["id"], r["version"], r["status"]) == ("r12", 2, "succeeded")
    assert r["task"] == {"q": "1+1"}  # the train split's input, as r12 is a train rollout
    assert [c["span_id"] for c in r["calls"]] == ["c0", "c1"]
    assert r["calls"][1]["request"]["messages"][0]["content"] == "question 1"
    assert (r["calls"][0]["prompt_tokens"], r["calls"][0]["completion_tokens"]) == (3, 2)
    assert [s["span_id"] for s in r["spans"]] == ["agent-span", "c0", "c1"]
    assert [(w["span_id"], w["value"]) for w in r["rewards"]] == [("c1", 0.5)]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"reward_min": "high"}, "reward_min"),
        ({"reward_max": "nan"}, "reward_max"),
        ({"version": "v2"}, "version"),
        ({"status": "done"}, "status"),
        ({"mode": "test"}, "mode"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-12-05T10:00:00"}, "until"),  # no time zone
        ({"page": "0"}, "page"),
        ({"page_size": "100000"}, "page_size"),
        ({"reward_min": "1", "reward_max": "0"}, "reward_min"),
    ],
)
def test_a_filter_that_does_not_parse_is_a_400_naming_it(
    proxy: Proxy, params: dict[str, str], param: str
) -> None:
    answer = httpx.get(f"{proxy.url}/v1/stats/rollouts", params=params, headers=proxy.headers)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_unknown_and_malformed_rollout_ids(proxy: Proxy) -> None:
    assert httpx.get(f"{proxy.url}/v1/stats/rollouts/nope", headers=proxy.headers).status_code == 404
    assert httpx.get(f"{proxy.url}/v1/stats/rollouts/a%20b", headers=proxy.headers).status_code == 400


def test_prometheus_gets_the_training_figures_and_grafana_asks_only_for_real_metrics(
    proxy: Proxy, module_db: str
) -> None:
    answer = httpx.get(f"{proxy.url}/metrics", headers=proxy.headers)
    assert answer.status_code == 200
    text = answer.text
    (newest,) = sql(module_db, "SELECT step, loss FROM training_steps ORDER BY step DESC LIMIT 1")
    assert f'lightloop_training_step{{policy="policy"}} {float(newest["step"])}' in text
    assert f'lightloop_training_loss{{policy="policy"}} {newest["loss"]}' in text
    assert 'lightloop_training_metric{name="grad_norm",policy="policy"} 1.2' in text
    assert 'lightloop_policy_live_version{policy="policy"} 2.0' in text
    assert "lightloop_stats_up 1.0" in text
    for row in sql(
        module_db,
        """SELECT dataset, mode, count(*) FILTER (WHERE status = 'queued') AS queued
           FROM rollouts WHERE dataset IS NOT NULL GROUP BY 1, 2""",
    ):
        line = f'lightloop_queue_rollouts{{dataset="{row["dataset"]}",mode="{row["mode"]}",state="queued"}}'
        assert f"{line} {float(row['queued'])}" in text
    exported = set(re.findall(r"^(lightloop_[a-z_]+)", text, flags=re.MULTILINE))
    dashboard = json.loads((REPO / "deploy/observability/grafana/dashboards/lightloop.json").read_text())
    asked = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"lightloop_[a-z_]+", target["expr"])
    }
    assert asked and asked <= exported, asked - exported


def test_the_trainers_view_is_the_rollouts_stored_tokens(proxy: Proxy, module_db: str) -> None:
    """Two turns, the second's prompt extending the first's whole sequence with a tool result:
    one sample, the completions trained, the tool result masked, each logprob where it was."""
    stored = sql(
        module_db,
        "SELECT prompt_token_ids p, completion_token_ids c, completion_logprobs l FROM llm_calls "
        "WHERE rollout_id = 'r07' ORDER BY seq",
    )
    first, second = stored
    spans = [
        r["span_id"]
        for r in sql(module_db, "SELECT span_id FROM llm_calls WHERE rollout_id = 'r07' ORDER BY seq")
    ]
    # A turn reward for the first call and the rollout's own reward: the returns below are exact.
    sql(
        module_db,
        "INSERT INTO rewards (rollout_id, span_id, value) VALUES ('r07', $1, 0.5), ('r07', NULL, 2)",
        spans[0],
    )
    try:
        view = get(proxy, "/v1/stats/rollouts/r07/samples")
    finally:
        sql(module_db, "DELETE FROM rewards WHERE rollout_id = 'r07' AND value IN (0.5, 2)")
    ((policy),) = view["policies"]
    assert policy["policy"] == "policy" and policy["stats"]["calls"] == 2
    ((sample),) = policy["samples"]
    assert sample["input_ids"] == second["p"] + second["c"]
    assert sample["prompt_len"] == len(first["p"])
    tool_result = len(second["p"]) - len(first["p"]) - len(first["c"])
    assert sample["loss_mask"] == [1] * len(first["c"]) + [0] * tool_result + [1] * len(second["c"])
    trained = [lp for lp, m in zip(sample["logprobs"], sample["loss_mask"], strict=True) if m]
    assert trained == pytest.approx(first["l"] + second["l"])
    assert sample["policy_versions"] == [1]
    assert sample["tokens"] is None  # `stub-base` has no tokenizer on this machine: ids only
    # Each trained turn with its range, reward and return (turn credit's, gamma 1 by default).
    n1, n2 = len(first["c"]), len(second["c"])
    turns = sample["turns"]
    assert [(t["start"], t["end"]) for t in turns] == [(0, n1), (n1 + tool_result, n1 + tool_result + n2)]
    assert view["credit"] == {
        "mode": "rollout",
        "gamma": 1.0,
        "final_reward": 2.0,
        "turn_rewards": {spans[0]: 0.5},
    }
    assert [(t["span_id"], t["reward"], t["return"]) for t in turns] == [
        (spans[0], 0.5, 2.5),
        (spans[1], 0.0, 2.0),
    ]
    assert httpx.get(f"{proxy.url}/v1/stats/rollouts/nope/samples", headers=proxy.headers).status_code == 404
