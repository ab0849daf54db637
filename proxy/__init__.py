"""lightloop.proxy: the tracing proxy. LiteLLM's proxy server app with lightloop in front:
a lean policy lane (token ids, logprobs, live policy version), rollout attribution, rewards,
OTLP ingest, and a recorder that hands every call to the store's batch writer."""

import os

# LiteLLM fetches a model cost map from the network at import unless told not to; the proxy
# must start offline. Set before anything below imports LiteLLM.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from lightloop.proxy.app import ProxyApp
from lightloop.proxy.attribution import Attribution, resolve, split_path
from lightloop.proxy.errors import BadRequest, ProxyError
from lightloop.proxy.server import create_app, litellm_config, master_key, prepare, serve

__all__ = [
    "Attribution",
    "BadRequest",
    "ProxyApp",
    "ProxyError",
    "create_app",
    "litellm_config",
    "master_key",
    "prepare",
    "resolve",
    "serve",
    "split_path",
]
