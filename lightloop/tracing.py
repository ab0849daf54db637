"""Tracing for agents that want it without choosing a library: `lightloop.tracing.init(proxy,
key)` sends the agent's OpenTelemetry spans to the proxy (`/v1/traces`, into `spans`), turns on
the official GenAI instrumentation of the `openai` SDK (a span per call), and puts the W3C trace
context on the SDK's HTTP requests, so the proxy's span of each call is a child of the agent's
and the agent's spans join the call's rollout by their shared trace (README, "Proxy").

Needs the `tracing` extra: `pip install 'lightloop[tracing]'`."""

from __future__ import annotations

import contextlib
from typing import Any

from lightloop.errors import LightloopError

__all__ = ["init", "untraced"]


def untraced() -> contextlib.AbstractContextManager[Any]:
    """A block whose HTTP requests make no spans: lightloop's own control calls (the runner's
    polls and heartbeats, rewards and finishes) in a process `init` instrumented."""
    try:
        from opentelemetry.instrumentation.utils import suppress_http_instrumentation
    except ImportError:  # no tracing extra: nothing instruments HTTP
        return contextlib.nullcontext()
    return suppress_http_instrumentation()


def init(
    proxy: str,
    key: str,
    *,
    service_name: str = "agent",
    rollout_id: str | None = None,
    batch: bool = True,
) -> Any:
    """Trace this process into lightloop; returns the SDK's TracerProvider (call `shutdown()` on
    it to flush before exiting). `proxy` is the proxy's base URL (`http://127.0.0.1:4000`, with or
    without `/v1`); `key` an agent key. `rollout_id` names the rollout on every span (a resource
    attribute), for agents whose calls name it otherwise than by trace. `batch=False` exports
    each span as it ends (tests, short scripts)."""
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise LightloopError(
            f"tracing needs the 'tracing' extra ({exc.name} is missing): pip install 'lightloop[tracing]'"
        ) from None

    base = proxy.rstrip("/").removesuffix("/v1")
    attributes: dict[str, str] = {"service.name": service_name}
    if rollout_id is not None:
        attributes["lightloop.rollout.id"] = rollout_id
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers={"authorization": f"Bearer {key}"})
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    # The global provider too, so the agent's own `trace.get_tracer(...)` spans go the same way
    # (OpenTelemetry keeps the first one set: an agent that set its own keeps it).
    trace.set_tracer_provider(provider)
    OpenAIInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    return provider
