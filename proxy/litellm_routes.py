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
from urllib.parse import parse_qs

import orjson
from litellm.proxy._types import LiteLLMRoutes

# Open without a key, as in LiteLLM: container probes.
OPEN = frozenset({"/health/liveliness", "/health/liveness", "/health/readiness"})

# Calls to a model, and the list of models: what an agent key may ask LiteLLM for. Written
# without the `/v1` prefix; only the spellings LiteLLM itself lists as OpenAI routes count (a
# path such as `/openai/v1/chat/completions` would fall through to its pass-through to OpenAI,
# with the operator's own provider key).
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
    "/models/{model}",
    "/utils/token_counter",
)

_ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens")

# A model named in the path rather than the body; as in LiteLLM (`{model:path}`) it may hold "/".
_MODEL_IN_PATH = re.compile(
    r"^(?:/v1)?/(?:engines|openai/deployments)/(?P<model>.+?)/(?:chat/completions|completions|embeddings)$"
)


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    parts = []
    for pattern in patterns:
        pattern = pattern.split("?", 1)[0]  # `/realtime?{model}`: the query is not the path
        regex = re.escape(pattern)
        regex = re.sub(r"\\\{\w+:path\\\}", r".+", regex)
        regex = regex.replace(r"\{model\}", r".+")  # LiteLLM's {model:path}
        regex = re.sub(r"\\\{\w+\\\}", r"[^/]+", regex)
        regex = regex.replace(r"/\*", r"(?:/.*)?")
        parts.append(regex)
    return re.compile("^(?:" + "|".join(parts) + ")$")


_LISTED = frozenset(LiteLLMRoutes.openai_routes.value) | frozenset(_ANTHROPIC)
_MODEL_ROUTES = ("/models/{model}", "/v1/models/{model}")  # GET one model (the SDK's retrieve)
_SERVED = _compile([*_LISTED, *_MODEL_ROUTES])
_AGENT_RE = _compile(
    [
        form
        for p in _AGENT
        for form in (p, f"/v1{p}", f"/openai/v1{p}")
        if form in _LISTED or form in _MODEL_ROUTES
    ]
)


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


_MULTIPART_MODEL = re.compile(rb'name="model"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]*)\r\n')


def model_of(body: bytes, content_type: bytes | None) -> str | None:
    """The model a request body names, read as LiteLLM reads it: a form (multipart, as audio
    transcriptions send it, or URL-encoded), else JSON whatever the content type claims."""
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    if media == b"multipart/form-data":
        found = _MULTIPART_MODEL.search(body)
        return found.group(1).decode("utf-8", "replace") if found else None
    if media == b"application/x-www-form-urlencoded":
        values = parse_qs(body.decode("latin-1")).get("model")
        return values[0] if values else None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # not JSON: LiteLLM answers it
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None
