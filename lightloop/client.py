"""A small helper for agents: a rollout id, the base URL that attributes calls to it, and the
reward posted when the agent's block ends.

    from lightloop.client import rollout

    with rollout("http://127.0.0.1:4000", key, group="task-17") as r:
        client = openai.OpenAI(base_url=r.base_url, api_key=key, default_headers=r.headers)
        answer = client.chat.completions.create(model="policy", messages=[...])
        r.reward = 1.0 if answer.choices[0].message.content == "42" else 0.0

Leaving the block finishes the rollout (`succeeded`, or `failed` when the block raised) with the
reward set. No reward set: finished without one (a trainer only claims rewarded rollouts)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx

from lightloop.errors import LightloopError
from lightloop.tracing import untraced

__all__ = ["Rollout", "RolloutError", "rollout"]


class RolloutError(LightloopError):
    """The proxy refused the rollout's finish or reward."""


@dataclass
class Rollout:
    id: str
    proxy: str
    key: str
    group: str | None = None
    reward: float | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        """OPENAI_BASE_URL for this rollout's calls: the path form of attribution."""
        return f"{self.proxy}/rollout/{quote(self.id, safe='')}/v1"

    def post_reward(self, value: float, name: str = "reward") -> None:
        self._post("/v1/rewards", {"rollout_id": self.id, "value": value, "name": name})

    def finish(self, status: str = "succeeded") -> None:
        body: dict[str, object] = {"status": status}
        if self.reward is not None:
            body["reward"] = self.reward
        self._post(f"/v1/rollouts/{quote(self.id, safe='')}/finish", body)

    def _post(self, path: str, body: dict[str, object]) -> None:
        try:
            with untraced():  # lightloop's control call, no part of the agent's trace
                answer = httpx.post(
                    self.proxy + path, json=body, headers={"authorization": f"Bearer {self.key}"}, timeout=60
                )
        except httpx.HTTPError as exc:
            raise RolloutError(f"cannot reach the proxy at {self.proxy}: {exc}") from None
        if answer.status_code != 200:
            raise RolloutError(f"{path}: HTTP {answer.status_code}: {answer.text[:300]}")


@contextmanager
def rollout(
    proxy: str,
    key: str,
    *,
    rollout_id: str | None = None,
    group: str | None = None,
    group_size: int | None = None,
) -> Iterator[Rollout]:
    """A rollout for the block; its calls go through `.base_url`. A rollout that is not new (same
    id) simply continues. The group makes rollouts of the same task comparable (GRPO); its size,
    when known, lets the trainer take it as soon as its last rollout ends (else it waits for the
    group to settle, LIGHTLOOP_TRAINER__GROUP_SETTLE_S)."""
    r = Rollout(
        rollout_id or f"rollout-{uuid.uuid4().hex}", proxy.rstrip("/").removesuffix("/v1"), key, group
    )
    if group is not None:
        r.headers["X-Lightloop-Group"] = group
    if group_size is not None:
        r.headers["X-Lightloop-Group-Size"] = str(group_size)
    try:
        yield r
    except BaseException:
        # The block's own error matters more than a failed report of it.
        with suppress(RolloutError):
            r.finish("failed")
        raise
    r.finish("succeeded")
