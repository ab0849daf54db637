"""Postgres going away under the proxy: traffic is still served, calls are spooled on disk, and
once Postgres is back (even after the proxy itself restarted) every call is in the database
exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai

from lightloop.store import EmbeddedPostgres, upgrade
from tests.e2e.conftest import eventually, start_proxy
from tests.e2e.test_proxy import HI, sql
from tests.support.stub_engine import running_stub


async def _calls(base_url: str, key: str, n: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    try:
        results = await asyncio.gather(
            *[client.chat.completions.create(model="p", messages=HI) for _ in range(n)]
        )
    finally:
        await client.close()
    return [r.id for r in results]


def test_postgres_down_during_a_burst_then_back_loses_nothing(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    url = pg.ensure_running()
    asyncio.run(upgrade(url))
    home = tmp_path / "home"
    with running_stub() as stub:
        config = {"policy": [{"name": "p", "base_model": "m", "upstreams": [stub.url]}]}
        proxy = start_proxy(home, url, config)
        base = f"{proxy.url}/rollout/outage-1/v1"
        try:
            ids = asyncio.run(_calls(base, proxy.key, 10))
            eventually(lambda: len(sql(url, "SELECT 1 FROM llm_calls")) == 10, what="the first calls")
            pg.stop()
            # Postgres is down: agents are still served...
            ids += asyncio.run(_calls(base, proxy.key, 30))
            # ...and what needs an answer from Postgres says so instead of losing the reward.
            reward = httpx.post(
                f"{proxy.url}/v1/rewards", json={"rollout_id": "outage-1", "value": 1}, headers=proxy.headers
            )
            assert reward.status_code == 503 and reward.json()["error"]["type"] == "database_unavailable"
            health = httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()
            assert health["status"] == "degraded"
            assert eventually(
                lambda: (
                    httpx.get(f"{proxy.url}/health", headers=proxy.headers).json()["writer"]["spool_bytes"]
                    > 0
                ),
                what="rows spooled",
            )
        finally:
            # The proxy restarts while Postgres is still down: its spool must survive that.
            proxy.stop()
        assert any((home / "spool" / "proxy").rglob("[0-9]*.jsonl")), "nothing was spooled on disk"
        pg.ensure_running()
        proxy = start_proxy(home, url, config)
        try:
            ids += asyncio.run(_calls(f"{proxy.url}/rollout/outage-1/v1", proxy.key, 10))
            rows = eventually(
                lambda: (
                    (
                        r := sql(
                            url, "SELECT response_id, span_id FROM llm_calls WHERE rollout_id = 'outage-1'"
                        )
                    )
                    and len(r) >= 50
                    and r
                ),
                what="every call after the outage",
            )
            assert sorted(r["response_id"] for r in rows) == sorted(ids)
            assert len({r["span_id"] for r in rows}) == 50
            assert len(sql(url, "SELECT 1 FROM spans WHERE rollout_id = 'outage-1'")) == 50
        finally:
            proxy.stop()
            pg.stop()
