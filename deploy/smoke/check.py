"""The compose smoke's checks, run on the host against the stack deploy/smoke.sh started: each
prints what it checked, and the first that fails exits 1 naming the service to blame.

Environment (set by smoke.sh): SMOKE_PROJECT, SMOKE_COMPOSE (the compose command), SMOKE_ENV_FILE,
and from the env file PROXY_PORT, POSTGRES_PORT, POSTGRES_PASSWORD, LITELLM_MASTER_KEY."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg
import httpx
import openai

T = TypeVar("T")
PROJECT = os.environ["SMOKE_PROJECT"]
COMPOSE = [
    *shlex.split(os.environ["SMOKE_COMPOSE"]),
    "--project-name",
    PROJECT,
    "--env-file",
    os.environ["SMOKE_ENV_FILE"],
    "-f",
    "deploy/compose.yaml",
]
PROXY = f"http://127.0.0.1:{os.environ['PROXY_PORT']}"
KEY = os.environ["LITELLM_MASTER_KEY"]
DSN = f"postgresql://lightloop:{os.environ['POSTGRES_PASSWORD']}@127.0.0.1:{os.environ['POSTGRES_PORT']}/lightloop"
HEADERS = {"authorization": f"Bearer {KEY}"}
SERVICES = ("postgres", "engine", "proxy", "trainer")


class Failed(Exception):
    def __init__(self, service: str, what: str) -> None:
        super().__init__(what)
        self.service = service


def ok(what: str) -> None:
    print(f"smoke: ok: {what}", flush=True)


def compose(*args: str, timeout: float = 600) -> str:
    done = subprocess.run([*COMPOSE, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise Failed(
            args[-1] if args else "compose", f"compose {' '.join(args)}: {done.stderr.strip()[-2000:]}"
        )
    return done.stdout


def until(check: Callable[[], T | None], timeout_s: float, service: str, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except (httpx.HTTPError, OSError, asyncpg.PostgresError, openai.APIError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise Failed(service, f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(1)  # polling a stack of containers, with a deadline


def container_state(service: str) -> dict[str, Any]:
    ids = compose("ps", "-a", "-q", service).split()
    if not ids:
        return {}
    inspected = subprocess.run(
        ["docker", "inspect", ids[0]], capture_output=True, text=True, check=True, timeout=60
    )
    state: dict[str, Any] = json.loads(inspected.stdout)[0]["State"]
    return state


def wait_healthy(timeout_s: float = 900) -> None:
    def migrated() -> bool:
        state = container_state("migrate")
        if state.get("Status") == "exited" and state.get("ExitCode") != 0:
            raise Failed("migrate", f"migrate exited with {state.get('ExitCode')}")
        return state.get("Status") == "exited"

    until(migrated, timeout_s, "migrate", "migrate to complete")
    ok("migrate completed (lightloop db upgrade)")
    for service in SERVICES:
        until(
            lambda s=service: container_state(s).get("Health", {}).get("Status") == "healthy",
            timeout_s,
            service,
            f"{service} to be healthy",
        )
        ok(f"{service} is healthy (its compose healthcheck)")


def sql(query: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(DSN)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def call(rollout: str, group: str | None = None) -> str:
    headers = {"x-lightloop-group": group, "x-lightloop-group-size": "4"} if group else {}
    client = openai.OpenAI(
        base_url=f"{PROXY}/rollout/{rollout}/v1",
        api_key=KEY,
        max_retries=2,
        default_headers=headers,
        timeout=60,
    )
    answer = client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )
    return answer.id


def finish(rollout: str, reward: float) -> None:
    answer = httpx.post(
        f"{PROXY}/v1/rollouts/{rollout}/finish",
        json={"status": "succeeded", "reward": reward},
        headers=HEADERS,
    )
    if answer.status_code != 200:
        raise Failed("proxy", f"finish {rollout}: {answer.status_code} {answer.text[:300]}")


def runs_as_10001() -> None:
    for service in ("engine", "proxy", "trainer"):
        uid = compose("exec", "-T", service, "id", "-u").strip()
        if uid != "10001":
            raise Failed(service, f"runs as uid {uid}, not the image's non-root user 10001")
    ok("engine, proxy and trainer run as the image's user 10001")


def main() -> None:
    wait_healthy()
    runs_as_10001()
    # A call through the published port, recorded with the engine's token ids.
    response_id = call("smoke-1")
    finish("smoke-1", 1.0)
    rows = sql(
        "SELECT prompt_token_ids, completion_token_ids FROM llm_calls WHERE response_id = $1", response_id
    )
    if not rows or not rows[0]["prompt_token_ids"] or not rows[0]["completion_token_ids"]:
        raise Failed("proxy", f"the call {response_id} is not in llm_calls with token ids")
    ok("an openai SDK call through the published proxy port is in llm_calls with token ids")
    reward = httpx.post(
        f"{PROXY}/v1/rewards", json={"response_id": response_id, "value": 0.5}, headers=HEADERS
    )
    if reward.status_code != 200:
        raise Failed("proxy", f"reward: {reward.status_code} {reward.text[:300]}")
    if not sql("SELECT 1 FROM rewards WHERE rollout_id = 'smoke-1' AND value = 0.5"):
        raise Failed("proxy", "the reward is not in the rewards table")
    ok("a reward by response id is recorded")
    # Enough rewarded groups for a step (rewards differ within each group: none is flat).
    for g in range(8):
        for i in range(4):
            rollout = f"smoke-g{g}-{i}"
            call(rollout, group=f"smoke-g{g}")
            finish(rollout, float(i % 2))
    step = until(
        lambda: sql("SELECT step, policy_out FROM training_steps ORDER BY step LIMIT 1"),
        900,
        "trainer",
        "a training step",
    )[0]
    ok(f"the trainer recorded step {step['step']}, version {step['policy_out']}")

    def served_new_version() -> int | None:
        response = call("smoke-after")
        finish("smoke-after", 1.0)  # the sync point: the call's row is written
        rows = sql("SELECT policy_version FROM llm_calls WHERE response_id = $1", response)
        version = rows[0]["policy_version"] if rows else None
        # The trainer may have gone on meanwhile: a newer version is as good.
        return version if version is not None and version >= step["policy_out"] else None

    version = until(served_new_version, 120, "engine", "a call served by the trained version")
    ok(f"the engine serves the trained version (v{version}) through the proxy")
    # A restart of the proxy loses no call: with Postgres stopped, calls are served and spooled,
    # and the spool, on the lightloop-home volume, outlives the restart.
    compose("stop", "postgres")
    before = [call(f"smoke-restart-{i}") for i in range(5)]
    # Recreated, not just restarted: only what is on a volume outlives a new container.
    compose("up", "-d", "--no-build", "--no-deps", "--force-recreate", "proxy")
    until(
        lambda: container_state("proxy").get("Health", {}).get("Status") == "healthy",
        300,
        "proxy",
        "proxy back",
    )
    compose("start", "postgres")
    found = until(
        lambda: (
            len(r := sql("SELECT response_id FROM llm_calls WHERE response_id = ANY($1)", before)) == 5 and r
        ),
        120,
        "proxy",
        "the calls made while Postgres was stopped, replayed after the proxy's restart",
    )
    ok(f"a new proxy container lost no call: {len(found)} of 5 made with Postgres stopped were replayed")
    count = sql("SELECT count(*) FROM llm_calls")[0][0]
    compose("down")
    compose("up", "-d", "--no-build")
    wait_healthy()
    if sql("SELECT count(*) FROM llm_calls")[0][0] < count:
        raise Failed("postgres", "down then up lost rows: the data volume did not keep them")
    ok(f"down then up kept the data ({count} calls)")
    compose("down", "-v")
    left = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    containers = compose("ps", "-a", "-q").split()
    if left or containers:
        raise Failed("compose", f"down -v left volumes {left} and containers {containers}")
    ok("down -v left no container and no volume")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # every failure ends with the services' logs
        service = exc.service if isinstance(exc, Failed) else "all"
        print(f"smoke: FAILED ({service}): {type(exc).__name__}: {exc}", file=sys.stderr)
        if service == "all":
            logs = subprocess.run(
                [*COMPOSE, "logs", "--no-color", "--tail", "20"], capture_output=True, text=True, check=False
            )
            print(logs.stdout[-8000:], file=sys.stderr)
        elif service in (*SERVICES, "migrate"):
            logs = subprocess.run(
                [*COMPOSE, "logs", "--no-color", "--tail", "40", exc.service],
                capture_output=True,
                text=True,
                check=False,
            )
            print(logs.stdout[-6000:] + logs.stderr[-2000:], file=sys.stderr)
        sys.exit(1)
