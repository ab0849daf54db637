"""Running the proxy: LiteLLM's config derived from lightloop.yaml, the master key, and uvicorn
with one or more worker processes."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from lightloop.errors import ConfigError
from lightloop.proxy.app import ProxyApp
from lightloop.proxy.auth import load_or_create_master_key
from lightloop.proxy.errors import ProxyError
from lightloop.settings import Settings

log = logging.getLogger(__name__)

# Handed to worker processes, which uvicorn starts afresh: the path of a file (mode 0600) with
# their settings, database URL and master key. Secrets never go into the environment, where
# every child process and /proc/PID/environ would see them.
WORKER_FILE_ENV = "LIGHTLOOP_PROXY_WORKER_FILE"


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
    policies = {p.name for p in settings.policy}
    for model in models:
        name = str(model.get("model_name", "")) if isinstance(model, dict) else ""
        # The policy lane takes a policy's name, and `policy/agent` as that agent's alias, before
        # LiteLLM sees the call: such a LiteLLM model would never be reached.
        # As the lane reads an alias (a policy's own name may hold a slash): policy/agent.
        if name in policies or name.rpartition("/")[0] in policies:
            raise ConfigError(
                f"model_list: {name!r} is a policy model's name or reads as its agent alias "
                f"(`policy/agent`); the policy lane would serve it, never LiteLLM: rename it"
            )
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
    """Everything a worker process needs, in two files only this user can read: LiteLLM's config
    (with the master key in `general_settings`, so LiteLLM needs no LITELLM_MASTER_KEY) and
    lightloop's worker file. The environment holds only their paths. Both are removed when this
    process exits."""
    key, created = master_key(settings)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    # Per process: two proxies under one home (other ports) must not overwrite each other's.
    config_path = settings.run_dir / f"litellm-config-{os.getpid()}.yaml"
    config = litellm_config(settings)
    config["general_settings"] = {**(config.get("general_settings") or {}), "master_key": key}
    write_private(config_path, yaml.safe_dump(config, sort_keys=False))
    worker_path = settings.run_dir / f"proxy-worker-{os.getpid()}.json"
    payload = {"settings": _settings_data(settings), "database_url": database_url, "master_key": key}
    write_private(worker_path, json.dumps(payload, default=_secret))
    atexit.register(_remove, config_path, worker_path)
    os.environ["CONFIG_FILE_PATH"] = str(config_path.resolve())
    # LiteLLM fetches a model cost map from the network at import unless told not to.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ[WORKER_FILE_ENV] = str(worker_path.resolve())
    return key, created


def write_private(path: Path, text: str) -> None:
    """Write `path` readable by this user only (0600 from creation, not chmod'ed afterwards)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def create_app() -> ProxyApp:
    """uvicorn's app factory, run in each worker process after `prepare` in the parent."""
    worker = json.loads(Path(os.environ[WORKER_FILE_ENV]).read_text())
    settings = Settings.model_validate(worker["settings"])
    from litellm.proxy.proxy_server import app as litellm_app

    return ProxyApp(
        settings,
        worker["database_url"],
        worker["master_key"],
        litellm_app,
        claim_spool_dir(settings.spool_dir / "proxy"),
    )


def serve(settings: Settings, database_url: str) -> None:
    import uvicorn

    prepare(settings, database_url)
    tls = settings.proxy
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
        ssl_certfile=None if tls.ssl_certfile is None else str(tls.ssl_certfile),
        ssl_keyfile=None if tls.ssl_keyfile is None else str(tls.ssl_keyfile),
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


def _settings_data(settings: Settings) -> dict[str, Any]:
    # model_dump_json would mask secrets ("**********"); workers need the real values.
    data: dict[str, Any] = settings.model_dump()
    return data


def _secret(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)
