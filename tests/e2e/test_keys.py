"""Scoped keys and the routes they open: `lightloop keys` as a real command, a real proxy process
(stub engine behind the policy lane and behind a LiteLLM model), every route of the table tried
with no key, a revoked key, an agent key and an admin key; LiteLLM's management routes off;
policy models only through the policy lane."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lightloop.proxy.routing import TABLE, Route
from tests.conftest import LIGHTLOOP
from tests.e2e.conftest import Proxy, clean_env, eventually, start_proxy
from tests.e2e.test_proxy import sql
from tests.support.stub_engine import StubEngine, running_stub

HI = [{"role": "user", "content": "Say hi."}]


def keys_cli(home: Path, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**clean_env(), "LIGHTLOOP_HOME": str(home), "LIGHTLOOP_DATABASE_URL": db}
    return subprocess.run(
        [LIGHTLOOP, "keys", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def make_key(home: Path, db: str, scope: str, name: str) -> str:
    made = keys_cli(home, db, "create", "--scope", scope, "--name", name)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sk-ll-"), made.stdout  # the key alone on stdout
    return lines[0]


@pytest.fixture(scope="module")
def stub() -> Iterator[StubEngine]:
    with running_stub() as s:
        yield s


def config(stub: StubEngine) -> dict[str, Any]:
    return {
        "policy": [{"name": "policy", "base_model": "stub-base", "upstreams": [stub.url + "/v1"]}],
        "model_list": [
            {
                "model_name": "other",
                "litellm_params": {"model": "openai/stub-base", "api_base": f"{stub.url}/v1", "api_key": "x"},
            }
        ],
    }


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, stub: StubEngine, module_db: str) -> Iterator[Proxy]:
    p = start_proxy(
        tmp_path_factory.mktemp("keys-home"),
        module_db,
        config(stub),
        extra_env={"LIGHTLOOP_PROXY__KEY_CACHE_S": "0.5"},
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def keys(proxy: Proxy, module_db: str) -> dict[str, str]:
    made = {scope: make_key(proxy.home, module_db, scope, f"{scope}-1") for scope in ("agent", "admin")}
    revoked = make_key(proxy.home, module_db, "admin", "gone")
    assert keys_cli(proxy.home, module_db, "revoke", "gone").returncode == 0
    return {**made, "revoked": revoked}


def _fill(path: str) -> str:
    return (
        path.replace("{id}", "r-keys")
        .replace("{name}", "no-such-dataset")
        .replace("{model}", "policy")
        .replace("{file}", "app.js")
    )


# Every route of lightloop's table, and a sample of LiteLLM's on the same port.
LITELLM_ROUTES = [
    Route("GET", "/v1/models", "litellm"),
    Route("POST", "/v1/embeddings", "litellm"),
    Route("GET", "/v1/files", "litellm", scope="admin"),
]
ROUTES = {f"{r.method} {r.path}": r for r in (*TABLE, *LITELLM_ROUTES)}


def call(proxy: Proxy, route: Route, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    body = {"model": "other", "messages": HI, "max_tokens": 2} if route.method == "POST" else None
    return httpx.request(route.method, proxy.url + _fill(route.path), json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("name", list(ROUTES))
def test_every_route_with_no_key_a_revoked_key_an_agent_key_and_an_admin_key(
    proxy: Proxy, keys: dict[str, str], name: str
) -> None:
    route = ROUTES[name]
    if route.scope == "public":  # the dashboard's sign-in form and files: no key asked
        assert call(proxy, route, None).status_code not in (401, 403), name
        return
    for key in (None, keys["revoked"], "sk-ll-never-issued"):
        answer = call(proxy, route, key)
        if route.ui:  # a page: to the sign-in form, not a JSON 401
            assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login?next="), (
                name,
                key,
                answer.text,
            )
            continue
        assert answer.status_code == 401, (name, key, answer.text)
        assert answer.json()["error"]["type"] == "authentication_error"
    agent = call(proxy, route, keys["agent"])
    if route.scope == "admin":
        assert agent.status_code == 403, (name, agent.text)
        assert "admin key" in (agent.text if route.ui else agent.json()["error"]["message"])
    else:
        assert agent.status_code not in (401, 403), (name, agent.text)
    for admin in (keys["admin"], proxy.key):  # the master key is an admin key
        answer = call(proxy, route, admin)
        assert answer.status_code not in (401, 403), (name, answer.text)


def test_an_agent_key_calls_models_on_both_lanes_and_reports(
    proxy: Proxy, keys: dict[str, str], module_db: str
) -> None:
    auth = {"authorization": f"Bearer {keys['agent']}"}
    for model in ("policy", "other"):
        answer = httpx.post(
            f"{proxy.url}/rollout/agent-key-{model}/v1/chat/completions",
            json={"model": model, "messages": HI, "max_tokens": 2},
            headers=auth,
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
    reward = httpx.post(
        f"{proxy.url}/v1/rewards", json={"rollout_id": "agent-key-policy", "value": 1.0}, headers=auth
    )
    assert reward.status_code == 200, reward.text
    assert httpx.get(f"{proxy.url}/metrics", headers=auth).status_code == 403
    listed = keys_cli(proxy.home, module_db, "list")
    assert listed.returncode == 0
    agent_row = next(line for line in listed.stdout.splitlines() if " agent-1 " in line)
    cells = [c.strip() for c in agent_row.strip("|").split("|")]
    assert cells[2] == "agent" and cells[4], agent_row  # last used is filled in
    for key in keys.values():
        assert key not in listed.stdout
    stored = sql(module_db, "SELECT key_hash FROM api_keys")
    assert all(len(r["key_hash"]) == 64 and not r["key_hash"].startswith("sk-") for r in stored)


def test_a_revoked_key_stops_working_in_the_running_proxy(proxy: Proxy, module_db: str) -> None:
    key = make_key(proxy.home, module_db, "agent", "short-lived")
    auth = {"authorization": f"Bearer {key}"}
    assert httpx.get(f"{proxy.url}/health", headers=auth).status_code == 200  # works at once
    revoked = keys_cli(proxy.home, module_db, "revoke", "short-lived")
    assert revoked.returncode == 0 and "revoked agent key 'short-lived'" in revoked.stdout
    # Within the proxy's key cache (0.5 s here).
    eventually(
        lambda: httpx.get(f"{proxy.url}/health", headers=auth).status_code == 401 or None,
        timeout_s=10,
        what="the revoked key refused",
    )


def test_the_keys_command_refuses_bad_input(proxy: Proxy, module_db: str) -> None:
    home = proxy.home
    unknown = keys_cli(home, module_db, "revoke", "no-such-key")
    assert unknown.returncode == 1 and "no key has the id or name 'no-such-key'" in unknown.stderr
    make_key(home, module_db, "agent", "twice")
    again = keys_cli(home, module_db, "create", "--scope", "agent", "--name", "twice")
    assert again.returncode == 1 and "exists already" in again.stderr and "sk-ll-" not in again.stdout
    bad_scope = keys_cli(home, module_db, "create", "--scope", "root")
    assert bad_scope.returncode == 2 and "'root' is not one of" in bad_scope.stderr
    for reserved in ("123", "key-7"):  # ids and the names of unnamed keys
        refused = keys_cli(home, module_db, "create", "--scope", "agent", "--name", reserved)
        assert refused.returncode == 2 and "reserved" in refused.stderr
    unnamed = keys_cli(home, module_db, "create", "--scope", "agent")
    assert unnamed.returncode == 0 and "key 'key-" in unnamed.stderr


def test_litellm_management_routes_and_admin_ui_are_off(proxy: Proxy) -> None:
    for method, path in (
        ("POST", "/key/generate"),
        # LiteLLM's admin UI lives under /ui, where lightloop's dashboard is (README, Dashboard).
        ("GET", "/ui/_next/static/app.js"),
        ("POST", "/user/new"),
        ("GET", "/spend/logs"),
    ):
        answer = httpx.request(method, proxy.url + path, headers=proxy.headers, json={})
        assert answer.status_code == 404, (path, answer.text)
        assert "litellm_admin" in answer.json()["error"]["message"]
    # The probes stay open without a key.
    assert httpx.get(f"{proxy.url}/health/liveliness").status_code == 200


def test_litellm_admin_routes_are_served_to_admin_keys_when_asked(
    tmp_path: Path, stub: StubEngine, module_db: str, keys: dict[str, str]
) -> None:
    p = start_proxy(tmp_path, module_db, config(stub), extra_env={"LIGHTLOOP_PROXY__LITELLM_ADMIN": "true"})
    try:
        agent = httpx.get(f"{p.url}/key/list", headers={"authorization": f"Bearer {keys['agent']}"})
        assert agent.status_code == 403
        admin = httpx.get(f"{p.url}/key/list", headers=p.headers)
        assert admin.status_code != 404 and "litellm_admin" not in admin.text  # LiteLLM answered
    finally:
        p.stop()


def test_a_policy_model_is_served_only_by_the_policy_lane(
    proxy: Proxy, stub: StubEngine, module_db: str
) -> None:
    for path, body in (
        ("/v1/responses", {"model": "policy", "input": "hi"}),
        ("/responses", {"model": "policy", "input": "hi"}),
        ("/v1/embeddings", {"model": "policy", "input": "hi"}),
        ("/openai/deployments/policy/embeddings", {"input": "hi"}),
        ("/rollout/r-resp/v1/responses", {"model": "policy", "input": "hi"}),
        ("/v1/messages", {"model": "policy", "max_tokens": 4, "messages": HI}),
    ):
        answer = httpx.post(proxy.url + path, json=body, headers=proxy.headers)
        assert answer.status_code == 400, (path, answer.text)
        # LiteLLM reads JSON whatever the content type claims: so does the check.
        for content_type in ("text/plain", "Application/JSON", None):
            headers = {**proxy.headers, **({"content-type": content_type} if content_type else {})}
            other = httpx.post(proxy.url + path, content=json.dumps(body), headers=headers)
            assert other.status_code == 400, (path, content_type, other.text)
        message = answer.json()["error"]["message"]
        assert "POST /v1/chat/completions" in message and "policy" in message, message
    # The forms with the model in the path are the policy lane's: the engine's token ids recorded.
    before = len(stub.requests)
    for path, body in (
        ("/openai/deployments/policy/chat/completions?api-version=2024-06-01", {"messages": HI}),
        ("/engines/policy/completions", {"prompt": "Hi"}),
    ):
        answer = httpx.post(
            proxy.url + path,
            json={**body, "max_tokens": 2},
            headers={**proxy.headers, "x-lightloop-rollout": "r-path-model"},
        )
        assert answer.status_code == 200, (path, answer.text)
    assert [r["return_token_ids"] for r in stub.requests[before:]] == [True, True]
    httpx.post(f"{proxy.url}/v1/rollouts/r-path-model/finish", json={}, headers=proxy.headers)
    rows = sql(module_db, "SELECT model, prompt_token_ids FROM llm_calls WHERE rollout_id = 'r-path-model'")
    assert len(rows) == 2 and all(r["model"] == "policy" and r["prompt_token_ids"] for r in rows)
    # Another model named in the path still goes to LiteLLM.
    other = httpx.post(
        f"{proxy.url}/openai/deployments/other/chat/completions", json={"messages": HI}, headers=proxy.headers
    )
    assert other.status_code == 200, other.text


def test_dashboard_sessions_are_for_admin_keys_reads_only_and_end_with_the_key(
    proxy: Proxy, keys: dict[str, str], module_db: str
) -> None:
    def sign_in(key: str) -> httpx.Response:
        return httpx.post(f"{proxy.url}/ui/session", data={"key": key, "next": "/ui/training"})

    agent = sign_in(keys["agent"])
    assert agent.status_code == 403 and "agent key" in agent.text and "set-cookie" not in agent.headers
    assert sign_in("").status_code == 400
    key = make_key(proxy.home, module_db, "admin", "ui-admin")
    admin = sign_in(key)
    assert admin.status_code == 303 and admin.headers["location"] == "/ui/training"
    cookie = admin.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and key not in cookie
    session = {"cookie": cookie.split(";")[0]}
    assert httpx.get(f"{proxy.url}/v1/stats/steps", headers=session).status_code == 200
    assert httpx.get(f"{proxy.url}/ui", headers=session).status_code == 200
    # A session opens reads only: nothing that writes takes it in place of a key.
    reward = httpx.post(f"{proxy.url}/v1/rewards", json={"rollout_id": "r", "value": 1}, headers=session)
    assert reward.status_code == 401
    # Elsewhere than the dashboard: not a path outside /ui.
    assert sign_in(key).status_code == 303
    assert (
        httpx.post(f"{proxy.url}/ui/session", data={"key": key, "next": "//evil.example/ui"}).headers[
            "location"
        ]
        == "/ui"
    )
    # A forged or tampered cookie is no session.
    forged = {"cookie": session["cookie"][:-4] + "0000"}
    assert httpx.get(f"{proxy.url}/v1/stats/steps", headers=forged).status_code == 401
    # Revoking the key ends its sessions (within the key cache, 0.5 s here).
    assert keys_cli(proxy.home, module_db, "revoke", "ui-admin").returncode == 0
    eventually(
        lambda: httpx.get(f"{proxy.url}/v1/stats/steps", headers=session).status_code == 401 or None,
        timeout_s=10,
        what="the revoked key's session refused",
    )
    assert httpx.get(f"{proxy.url}/ui", headers=session).headers["location"].startswith("/ui/login")
