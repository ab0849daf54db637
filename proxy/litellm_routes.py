"""Which of LiteLLM's routes the agent port passes on, and which key each takes.

LiteLLM's app also carries its admin UI and management API (keys, users, teams, models, spend,
config). Those are off unless `proxy.litellm_admin` is set: an agent port has no use for them.
The routes that stay are LiteLLM's own list of OpenAI routes, Anthropic's `/v1/messages` and the
liveness probes. Of those, calling a model (or listing them) takes an agent key; the rest
(files, batches, threads, vector stores, stored responses) reads what other agents made, so it
takes an admin key, as does everything behind `litellm_admin`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from litellm.proxy._types import LiteLLMRoutes

# Open without a key, as in LiteLLM: container probes.
OPEN = frozenset({"/health/liveliness", "/health/liveness", "/health/readiness"})

# Calls to a model, and the list of models: what an agent key may ask LiteLLM for. Written
# without the `/v1` or `/openai/v1` prefix, which LiteLLM accepts on each.
_AGENT = (
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/engines/{model}/chat/completions",
    "/engines/{model}/completions",
    "/engines/{model}/embeddings",
    "/openai/deployments/{model}/chat/completions",
    "/openai/deployments/{model}/completions",
    "/openai/deployments/{model}/embeddings",
    "/responses",
    "/responses/input_tokens",
    "/messages",
    "/messages/count_tokens",
    "/moderations",
    "/rerank",
    "/v2/rerank",
    "/images/generations",
    "/images/edits",
    "/audio/speech",
    "/audio/transcriptions",
    "/ocr",
    "/models",
    "/utils/token_counter",
)

# A model named in the path rather than the body.
_MODEL_IN_PATH = re.compile(r"^(?:/v1)?/(?:engines|openai/deployments)/(?P<model>[^/]+)/")


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    parts = []
    for pattern in patterns:
        pattern = pattern.split("?", 1)[0]  # `/realtime?{model}`: the query is not the path
        regex = re.escape(pattern)
        regex = re.sub(r"\\\{\w+:path\\\}", r".+", regex)
        regex = re.sub(r"\\\{\w+\\\}", r"[^/]+", regex)
        regex = regex.replace(r"/\*", r"(?:/.*)?")
        parts.append(regex)
    return re.compile("^(?:" + "|".join(parts) + ")$")


_SERVED = _compile([*LiteLLMRoutes.openai_routes.value, *(p for p in _AGENT), *(f"/v1{p}" for p in _AGENT)])
_AGENT_RE = _compile([*_AGENT, *(f"/v1{p}" for p in _AGENT), *(f"/openai/v1{p}" for p in _AGENT)])


def scope_of(path: str, admin_routes: bool) -> str | None:
    """ "open", "agent" or "admin" for a path LiteLLM answers on the agent port; None when it is
    not served there (the admin UI and management routes without `litellm_admin`)."""
    if path in OPEN:
        return "open"
    if _AGENT_RE.match(path):
        return "agent"
    if admin_routes or _SERVED.match(path):
        return "admin"
    return None


def model_in_path(path: str) -> str | None:
    found = _MODEL_IN_PATH.match(path)
    return None if found is None else found["model"]
