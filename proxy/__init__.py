"""lightloop.proxy: the tracing proxy (LiteLLM proxy app, attribution, capture, rewards, OTLP).

So far: rollout attribution from paths and headers; the app itself is built in its own issue."""

from lightloop.proxy.attribution import Attribution, resolve, split_path
from lightloop.proxy.errors import BadRequest, ProxyError

__all__ = ["Attribution", "BadRequest", "ProxyError", "resolve", "split_path"]
