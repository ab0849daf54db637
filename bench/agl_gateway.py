"""Agent Lightning v1's API gateway (`agentlightning==1.0.2`, the `agl-server` app) as a standalone
proxy in front of one OpenAI-compatible upstream, so the benchmark can compare it with ours.

Run it with the Agent Lightning venv's python (the package needs Python >= 3.12):

    python bench/agl_gateway.py --port P --upstream http://127.0.0.1:S/v1 --model stub

Why it is set up this way: v1 no longer uses LiteLLM; its gateway is a FastAPI app
(`agentlightning.server.app.create_app`) with an in-memory store, run by uvicorn exactly as
`agl-server` runs it (one worker, keep-alive 120 s). In training, verl registers each vLLM server
with `POST /api/models` and the trainer creates rollouts with `POST /api/rollouts`; the proxy
answers 404 for a rollout it does not know. This script does both in-process, through the same
route functions, before serving: the upstream as model `--model`, and one rollout `bench`.

Ready when `GET /healthz` answers 200 (no auth).
Chat calls: `POST /proxy/rollout/bench/attempt/0/mode/train/openai/v1/chat/completions`
(attempt id `0` is the controller's default; any attempt id is accepted). Mode `train` keeps the
training defaults of `server.yaml`: it forces temperature 1, `return_token_ids: true` and
`logprobs: true` onto each body. The key is empty, so no Authorization header is needed.
Streaming is refused by 1.0.2 itself: `"stream": true` answers 400 "Streaming responses are not
supported".

Logging is at WARNING (structlog and uvicorn, no access log), as throughput runs advise;
`agl-server`'s defaults would print a structlog debug line per request. SIGTERM stops uvicorn.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from importlib.resources import files
from typing import Any

import structlog
import uvicorn
from agentlightning.schemas import DEFAULT_ATTEMPT_ID, Model, RolloutCreate
from agentlightning.server.app import create_app
from agentlightning.server.routes.models import register_models
from agentlightning.server.routes.rollouts import enqueue_rollouts
from omegaconf import OmegaConf

ROLLOUT_ID = "bench"
HEALTH_PATH = "/healthz"
CHAT_PATH = f"/proxy/rollout/{ROLLOUT_ID}/attempt/{DEFAULT_ATTEMPT_ID}/mode/train/openai/v1/chat/completions"


def server_config(port: int, model: str) -> dict[str, Any]:
    """The package's own `server.yaml` defaults, with the bench's port and model name."""
    base = OmegaConf.load(str(files("agentlightning.config").joinpath("server.yaml")))
    override = OmegaConf.create({"host": "127.0.0.1", "port": port, "default_proxy": {"model_name": model}})
    config: dict[str, Any] = OmegaConf.to_container(OmegaConf.merge(base, override), resolve=True)  # type: ignore[assignment]
    return config


async def register(model: str, upstream: str) -> None:
    """What verl and the trainer do over HTTP before agents call: a model server and a rollout."""
    await register_models([Model(model=model, endpoint=upstream)])
    await enqueue_rollouts([RolloutCreate(input={"data_id": ROLLOUT_ID}, rollout_id=ROLLOUT_ID)])


def main() -> None:
    parser = argparse.ArgumentParser(description="Agent Lightning 1.0.2 gateway for the benchmark")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="stub")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    config = server_config(args.port, args.model)
    asyncio.run(register(args.model, args.upstream.rstrip("/")))
    uvicorn.run(
        create_app(config),
        host=str(config["host"]),
        port=int(config["port"]),
        workers=1,
        timeout_keep_alive=120,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
