"""Running the proxy: LiteLLM's config derived from lightloop.yaml, the master key, and uvicorn
with one or more worker processes."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from lightloop.proxy.app import ProxyApp
from lightloop.proxy.auth import load_or_create_master_key
from lightloop.proxy.errors import ProxyError
from lightloop.settings import Settings

log = logging.getLogger(__name__)

# Handed to worker processes, which uvicorn starts afresh: they rebuild everything from these.
WORKER_SETTINGS_ENV = "LIGHTLOOP_PROXY_WORKER_SETTINGS"
WORKER_DATABASE_ENV = "LIGHTLOOP_PROXY_WORKER_DATABASE_URL"


def master_key(settings: Settings) -> tuple[str, bool]:
    """LITELLM_MASTER_KEY when set; otherwise the key kept under LIGHTLOOP_HOME (True: just made)."""
    if settings.master_key is not None and settings.master_key.get_secret_value():
        return settings.master_key.get_secret_value(), False
    return load_or_create_master_key(settings.home)


def litellm_config(settings: Settings) -> dict[str, Any]:
    """LiteLLM's config: lightloop.yaml without lightloop's own keys, plus each policy model,
    so that LiteLLM's other routes (/v1/models, /v1/embeddings, ...) know it too."""
    data: dict[str, Any] = {}
    if settings.config is not None:
        data = yaml.safe_load(settings.config.read_text()) or {}
    own = set(Settings.model_fields) | {"master_key"}
    config = {k: v for k, v in data.items() if k not in own}
    models = list(config.get("model_list") or [])
    for policy in settings.policy:
        models.append(
            {
                "model_name": policy.name,
                "litellm_params": {
                    "model": f"hosted_vllm/{policy.base_model}",
                    "api_base": policy.upstreams[0].rstrip("/").removesuffix("/v1") + "/v1",
                    **({"api_key": policy.api_key.get_secret_value()} if policy.api_key else {}),
                },
            }
        )
    config["model_list"] = models
    return config


def prepare(settings: Settings, database_url: str) -> tuple[str, bool]:
    """Everything a worker process needs, written where it looks: LiteLLM reads its config path
    and master key from the environment; lightloop's workers read their settings from it."""
    key, created = master_key(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    config_path = settings.run_dir / "litellm-config.yaml"
    config_path.write_text(yaml.safe_dump(litellm_config(settings), sort_keys=False))
    os.environ["CONFIG_FILE_PATH"] = str(config_path.resolve())
    os.environ["LITELLM_MASTER_KEY"] = key
    # LiteLLM fetches a model cost map from the network at import unless told not to.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ[WORKER_SETTINGS_ENV] = _settings_json(settings)
    os.environ[WORKER_DATABASE_ENV] = database_url
    return key, created


def create_app() -> ProxyApp:
    """uvicorn's app factory, run in each worker process after `prepare` in the parent."""
    settings = Settings.model_validate_json(os.environ[WORKER_SETTINGS_ENV])
    from litellm.proxy.proxy_server import app as litellm_app

    return ProxyApp(
        settings,
        os.environ[WORKER_DATABASE_ENV],
        os.environ["LITELLM_MASTER_KEY"],
        litellm_app,
        claim_spool_dir(settings.spool_dir / "proxy"),
    )


def serve(settings: Settings, database_url: str) -> None:
    import uvicorn

    prepare(settings, database_url)
    uvicorn.run(
        "lightloop.proxy.server:create_app",
        factory=True,
        host=settings.proxy.host,
        port=settings.proxy.port,
        workers=settings.proxy.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


def claim_spool_dir(base: Path, slots: int = 256) -> Path:
    """A spool folder no other live proxy process uses: worker slot 0, 1, ... held by an flock
    for the life of the process. A restarted proxy takes the same slots back and replays what
    they hold."""
    base.mkdir(parents=True, exist_ok=True)
    for slot in range(slots):
        folder = base / f"worker-{slot}"
        folder.mkdir(exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_locks.append(fd)  # released when the process exits
        return folder
    raise ProxyError(f"more than {slots} proxy processes share {base}")


_held_locks: list[int] = []


def _settings_json(settings: Settings) -> str:
    # model_dump_json would mask secrets ("**********"); workers need the real values.
    return json.dumps(
        settings.model_dump(),
        default=lambda o: o.get_secret_value() if isinstance(o, SecretStr) else str(o),
    )
