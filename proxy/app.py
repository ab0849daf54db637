"""The proxy application: LiteLLM's proxy server app with lightloop in front of it, in one ASGI app.

lightloop answers its own routes and the chat/text completions of policy models (the policy
lane); everything else, including completions for every other model, goes on to LiteLLM's app
untouched (the LiteLLM lane), where a CustomLogger records it. Doing the dispatch as plain ASGI
keeps LiteLLM's middleware and FastAPI's routing off the policy lane's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import asyncpg
import orjson

from lightloop.proxy import agentops, routes, stats, ui
from lightloop.proxy.attribution import HEADER_ROLLOUT, Attribution, resolve
from lightloop.proxy.auth import request_key
from lightloop.proxy.errors import BadRequest, MethodNotAllowed, NotFound, ProxyError, Unauthorized
from lightloop.proxy.export import SpanExport
from lightloop.proxy.http import (
    ASGIApp,
    ClientGone,
    Message,
    Receive,
    Scope,
    Send,
    error_response,
    header,
    parse_json_object,
    read_body,
)
from lightloop.proxy.keys import Caller, Keys, require
from lightloop.proxy.lane import PolicyLane
from lightloop.proxy.litellm_lane import RecordingLogger, current_attribution
from lightloop.proxy.litellm_routes import model_in_path, model_of, scope_of
from lightloop.proxy.metrics import Metrics
from lightloop.proxy.prompts import PromptRegistry, prompt_text
from lightloop.proxy.queue import TaskQueue
from lightloop.proxy.recorder import Recorder
from lightloop.proxy.routing import TABLE, Route, match
from lightloop.proxy.session import read_session, session_cookie, session_secret
from lightloop.proxy.token_text import TokenText
from lightloop.proxy.upstream import Upstreams
from lightloop.proxy.versions import LiveVersions
from lightloop.settings import Settings
from lightloop.store import BatchWriter, create_pool

log = logging.getLogger(__name__)

# lightloop's own routes, as the README documents them (tests/unit/test_readme.py checks it).
ROUTES = tuple(route.documented for route in TABLE)


def _check_handlers() -> None:
    # Every route of the table has its handler: a typo fails at import, not on first request.
    missing = [r.name for r in TABLE if r.operation is None and not hasattr(ProxyApp, f"_serve_{r.name}")]
    assert not missing, missing


@dataclass(frozen=True)
class Request:
    params: dict[str, str]
    body: bytes
    attribution: Attribution
    scope: Scope


Handler = Callable[[Request, Send], Awaitable[int]]


class ProxyApp:
    def __init__(
        self, settings: Settings, database_url: str, master_key: str, litellm_app: ASGIApp, spool_dir: Path
    ) -> None:
        self.settings = settings
        self.database_url = database_url
        self.master_key = master_key.encode()
        self.litellm = litellm_app
        self.writer = BatchWriter(database_url, spool_dir, settings.writer)
        export = SpanExport(settings.proxy.otlp_endpoint) if settings.proxy.otlp_endpoint else None
        self.recorder = Recorder(
            self.writer,
            settings.proxy.session_memory,
            export,
            settings.proxy.record,
            settings.proxy.max_rollouts_in_flight,
            settings.proxy.rollout_idle_s,
        )
        self.versions = LiveVersions(
            settings.adapters(),  # the policies and their agents' adapters, each with versions
            database_url,
            settings.writer.retry_interval_s,
            keep=settings.trainer.keep_versions,
            reread_s=settings.proxy.versions_reread_s,
        )
        self.upstreams = Upstreams(settings.proxy.upstream_timeout_s, settings.proxy.upstream_retries)
        self._token_text = TokenText(settings.model_cache)
        self.prompts = PromptRegistry(
            database_url,
            self._db,
            settings.writer.retry_interval_s,
            reread_s=settings.proxy.versions_reread_s,
        )
        self.metrics = Metrics(self.writer)
        self.lane = PolicyLane(
            {p.name: p for p in settings.policy},
            self.versions,
            self.upstreams,
            self.recorder,
            unknown_agent=lambda policy: self.metrics.unknown_agents.labels(policy).inc(),
        )
        self.logger = RecordingLogger(self.recorder)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self.keys = Keys(self.master_key, self._db, settings.proxy.key_cache_s)
        self.session_secret = session_secret(self.master_key)
        self.queue = TaskQueue(
            settings.queue, settings.trainer, self.versions, self.recorder, self._db, self.prompts
        )

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.litellm(scope, receive, send)
            return
        path: str = scope["path"]
        started = time.perf_counter()
        status = 500
        route = "other"
        try:
            if path.startswith("/rollout/") or match(path) is not None:
                route, status = await self._handle(scope, receive, send)
            else:
                route = "litellm"
                await self._litellm_lane(scope, receive, send, path, None)
        except ProxyError as exc:
            status = exc.status
            found = match(path)
            if found is not None and found[0].ui:
                await ui.error_page(send, exc)
            else:
                await error_response(send, exc)
        except ClientGone:
            status = 499
        finally:
            if route != "litellm":
                self.metrics.observe(route, status, time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> tuple[str, int]:
        attribution, path = resolve(scope["path"], _lightloop_headers(scope))
        found = match(path)
        if found is None:
            # Any other OpenAI route under /rollout/{id}/v1 (models, embeddings, ...): LiteLLM's.
            await self._litellm_lane(scope, receive, send, path, attribution)
            return "litellm", 0
        route, params = found
        if attribution.source == "path" and not route.path_form:
            raise BadRequest(f"{route.path} is not served under /rollout/{{id}}; use it at the root")
        if scope["method"] != route.method:
            raise MethodNotAllowed(f"{route.path} takes {route.method}")
        caller = None
        if route.scope != "public":
            try:
                caller = await self._caller(scope)
            except Unauthorized:
                if route.ui:  # a page without a session: the sign-in form, then back here
                    return route.name, await ui.to_sign_in(send, scope)
                raise
            require(caller, route.scope, route.documented)
        if route.operation is not None:
            assert caller is not None
            return route.name, await self._completions(
                route, params, path, attribution, caller, scope, receive, send
            )
        body = b""
        if route.method == "POST":
            body = await read_body(scope, receive, self.settings.proxy.max_body_bytes)
        return route.name, await self._serve(route, params, body, attribution, scope, send)

    async def _serve(
        self,
        route: Route,
        params: dict[str, str],
        body: bytes,
        attribution: Attribution,
        scope: Scope,
        send: Send,
    ) -> int:
        handler: Handler = getattr(self, f"_serve_{route.name}")
        return await handler(Request(params, body, attribution, scope), send)

    # One handler per route of the table, `_serve_<route name>`.

    async def _serve_rewards(self, r: Request, send: Send) -> int:
        a = r.attribution
        return await routes.post_reward(r.body, a.rollout_id, a.attempt, self.recorder, self._db, send)

    async def _serve_finish(self, r: Request, send: Send) -> int:
        failed_reward = self.settings.queue.failed_reward
        return await routes.post_finish(r.body, r.params["id"], failed_reward, self.recorder, self._db, send)

    async def _serve_heartbeat(self, r: Request, send: Send) -> int:
        return await self.queue.heartbeat(r.params["id"], r.body, send)

    async def _serve_tasks_next(self, r: Request, send: Send) -> int:
        return await self.queue.next(r.scope, r.body, send)

    async def _serve_prompt(self, r: Request, send: Send) -> int:
        return await prompt_text(r.params["name"], r.attribution, self.prompts, self._db, send)

    async def _serve_datasets(self, r: Request, send: Send) -> int:
        return await self.queue.datasets(None, send)

    async def _serve_dataset(self, r: Request, send: Send) -> int:
        return await self.queue.datasets(r.params["name"], send)

    async def _serve_traces(self, r: Request, send: Send) -> int:
        content_type, encoding = header(r.scope, b"content-type"), header(r.scope, b"content-encoding")
        return await routes.post_traces(
            r.body, content_type, encoding, self.recorder, send, self.settings.proxy.max_body_bytes
        )

    async def _serve_stats_overview(self, r: Request, send: Send) -> int:
        return await stats.get_overview(
            r.scope, self._db, self.recorder, self.upstreams, self.settings.policy, send
        )

    async def _serve_stats_rewards(self, r: Request, send: Send) -> int:
        return await stats.get_rewards(self._db, send)

    async def _serve_stats_steps(self, r: Request, send: Send) -> int:
        return await stats.get_steps(r.scope, self._db, send)

    async def _serve_stats_rollouts(self, r: Request, send: Send) -> int:
        return await stats.get_rollouts(r.scope, self._db, send)

    async def _serve_stats_rollout(self, r: Request, send: Send) -> int:
        return await stats.get_rollout(r.params["id"], self._db, send)

    async def _serve_stats_samples(self, r: Request, send: Send) -> int:
        trainer = self.settings.trainer
        return await stats.get_samples(
            r.params["id"],
            self._db,
            self.settings.policy,
            trainer.agents,
            self._token_text,
            send,
            credit=(trainer.credit, trainer.gamma),
            live=self.versions.live,
        )

    async def _serve_ui_overview(self, r: Request, send: Send) -> int:
        return await ui.page(send, "overview")

    async def _serve_ui_training(self, r: Request, send: Send) -> int:
        return await ui.page(send, "training")

    async def _serve_ui_rollouts(self, r: Request, send: Send) -> int:
        return await ui.page(send, "rollouts")

    async def _serve_ui_rollout(self, r: Request, send: Send) -> int:
        rollout_id = r.params["id"]
        if not await stats.rollout_exists(rollout_id, self._db):
            raise NotFound(f"There is no rollout {rollout_id!r}.")
        return await ui.page(send, "rollout", rollout_id=rollout_id)

    async def _serve_ui_datasets(self, r: Request, send: Send) -> int:
        return await ui.page(send, "datasets")

    async def _serve_ui_login(self, r: Request, send: Send) -> int:
        return await ui.sign_in_form(r.scope, send)

    async def _serve_ui_session(self, r: Request, send: Send) -> int:
        return await ui.sign_in(r.scope, r.body, self.keys, self.master_key, self.session_secret, send)

    async def _serve_ui_logout(self, r: Request, send: Send) -> int:
        return await ui.sign_out(r.scope, send)

    async def _serve_ui_static(self, r: Request, send: Send) -> int:
        return await ui.static(r.params["file"], send)

    async def _serve_agentops_auth(self, r: Request, send: Send) -> int:
        return await agentops.auth_token(r.body, self.keys, send)

    async def _serve_agentops_logs(self, r: Request, send: Send) -> int:
        return await agentops.upload_logs(r.scope, r.body, self.recorder, send)

    async def _serve_metrics(self, r: Request, send: Send) -> int:
        return await routes.get_metrics(self.metrics, self._db, send)

    async def _serve_health(self, r: Request, send: Send) -> int:
        error = self.queue.reaper_error
        queue = {"reaper": "ok" if error is None else f"failing: {error}", **self.queue.reaped}
        return await routes.get_health(self.recorder, self.versions, queue, send)

    async def _caller(self, scope: Scope) -> Caller:
        key = request_key(scope)
        # The dashboard's session stands for a key on GET routes only (the pages and the reads):
        # with SameSite=Strict no other site sends it, and nothing it opens writes.
        cookie = session_cookie(scope) if key is None and scope.get("method") == "GET" else None
        if cookie is not None:
            key_digest = read_session(self.session_secret, cookie)
            caller = None if key_digest is None else await self.keys.identify_digest(key_digest)
            if caller is None:
                raise Unauthorized("the dashboard session has expired or its key was revoked: sign in again")
            return caller
        caller = await self.keys.identify(key)
        if caller is None:
            raise Unauthorized("the API key is not valid for this proxy")
        return caller

    async def _completions(
        self,
        route: Route,
        params: dict[str, str],
        path: str,
        attribution: Attribution,
        caller: Caller,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> int:
        operation = route.operation
        assert operation is not None
        raw = await read_body(scope, receive, self.settings.proxy.max_body_bytes)
        body = parse_json_object(raw)
        # Azure's deployments form names the model in the path only; the path wins.
        model = params.get("model") or body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model is required and must be a string")
        resolved = self.lane.resolve(model)
        if resolved is not None:
            model, alias_agent = resolved
            if alias_agent is not None:  # `policy/agent` names the agent, as the header does
                if attribution.agent not in (None, alias_agent):
                    raise BadRequest(
                        f"the model alias names agent {alias_agent!r} and X-Lightloop-Agent "
                        f"{attribution.agent!r}: name one, or the same in both"
                    )
                attribution = replace(attribution, agent=alias_agent)
        swapped = await self.prompts.swap(body, model, attribution.agent, attribution.rollout_id)
        if swapped is not None:
            # The served text, not the agent's, is what the model and the record see.
            raw = orjson.dumps(body)
            attribution = replace(attribution, prompt_name=swapped.name, prompt_version=swapped.version)
        if resolved is not None:
            if operation == "chat" and not isinstance(body.get("messages"), list):
                raise BadRequest("messages is required and must be a list")
            body["model"] = model
            v1 = "/v1/chat/completions" if operation == "chat" else "/v1/completions"
            return await self.lane.serve(
                operation, v1, body, raw, attribution, header(scope, b"traceparent"), receive, send
            )
        await self._to_litellm(_with_key(scope, self.master_key), receive, send, path, attribution, raw)
        return 0

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """LiteLLM's WebSocket routes (realtime): admin keys only, and never a policy model, which
        only the policy lane serves. A refusal closes the socket with 1008 (policy violation)."""
        path: str = scope["path"]
        try:
            if scope_of(path, self.settings.proxy.litellm_admin) is None:
                raise NotFound(f"{path} is not served on the agent port")
            caller = await self._caller(scope)
            require(caller, "admin", f"the WebSocket route {path}")
            query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
            if any(self.lane.resolve(m) is not None for m in query.get("model", [])):
                raise BadRequest("a policy model is served only by the policy lane, not over a WebSocket")
        except ProxyError as exc:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": str(exc)[:120]})
            return
        await self.litellm(_with_key(scope, self.master_key), receive, send)

    async def _litellm_lane(
        self, scope: Scope, receive: Receive, send: Send, path: str, attribution: Attribution | None
    ) -> None:
        """A route lightloop does not serve itself: LiteLLM's, behind lightloop's keys. A policy
        model asked for here would be answered by LiteLLM at version 0, untraced for training
        and uncapped, so it is refused, naming the routes that serve it."""
        needs = scope_of(path, self.settings.proxy.litellm_admin)
        if needs is None:
            raise NotFound(
                f"{path} is not served on the agent port: LiteLLM's admin UI and management routes "
                "are off (set proxy.litellm_admin to serve them, for admin keys)"
            )
        if needs != "open":
            caller = await self.keys.identify(request_key(scope))
            if caller is not None:  # else a key LiteLLM may know (a virtual key): its decision
                require(caller, needs, path)
                scope = _with_key(scope, self.master_key)
        body = None
        # The model calls (agent routes): LiteLLM reads a model from the body whatever the
        # content type says, so every body is looked at. Admin routes (files, batches) may carry
        # large uploads and name no model to serve.
        if scope["method"] == "POST" and needs == "agent" and self.lane.policies:
            model = model_in_path(path)
            if model is None:
                body = await read_body(scope, receive, self.settings.proxy.max_body_bytes)
                model = model_of(body, header(scope, b"content-type"))
            if model is not None and self.lane.resolve(model) is not None:
                raise BadRequest(
                    f"policy model {model!r} is served only by POST /v1/chat/completions and "
                    "POST /v1/completions (also without /v1, under /rollout/{id}/v1, and as "
                    "/engines/{model}/... or /openai/deployments/{model}/...), "
                    f"not by {scope['method']} {path}"
                )
        if attribution is None:
            await self.litellm(scope, _replaying(body, receive) if body is not None else receive, send)
            return
        await self._to_litellm(scope, receive, send, path, attribution, body)

    async def _to_litellm(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        attribution: Attribution,
        body: bytes | None,
    ) -> None:
        scope = dict(scope)
        if attribution.source == "path":
            scope["path"] = path
            scope["raw_path"] = path.encode()
            scope["headers"] = [
                *[(k, v) for k, v in scope["headers"] if k != HEADER_ROLLOUT.encode()],
                (HEADER_ROLLOUT.encode(), str(attribution.rollout_id).encode()),
            ]
        if body is not None:
            receive = _replaying(body, receive)
        token = current_attribution.set(attribution)
        try:
            await self.litellm(scope, receive, send)
        finally:
            current_attribution.reset(token)

    async def _db(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:  # concurrent first requests make one pool, not several
            return await self._create_pool()

    async def _create_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            # No reset query on release: the proxy's statements leave no session state (its
            # advisory locks are transaction-scoped), and asyncpg's default reset is one more
            # round trip for every queue hand-out, finish and reward.
            self._pool = await create_pool(self.database_url, min_size=0, max_size=8, reset=_no_reset)
        return self._pool

    # -- lifespan ------------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(self._running())
        except Exception as exc:
            log.exception("proxy failed to start")
            await send({"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await stack.aclose()
        await send({"type": "lifespan.shutdown.complete"})

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        router = getattr(self.litellm, "router", None)
        lifespan = getattr(router, "lifespan_context", None)
        async with contextlib.AsyncExitStack() as stack:
            if lifespan is not None:
                await stack.enter_async_context(lifespan(self.litellm))
            import litellm

            litellm.callbacks.append(self.logger)
            stack.callback(_remove, litellm.callbacks, self.logger)
            await self.writer.start()
            stack.push_async_callback(self.writer.close)
            await self.versions.start()
            stack.push_async_callback(self.versions.close)
            await self.prompts.start()
            stack.push_async_callback(self.prompts.close)
            await stack.enter_async_context(self.queue.running())
            stack.push_async_callback(self.upstreams.close)
            stack.push_async_callback(self._close_pool)
            if self.recorder.export is not None:
                stack.callback(self.recorder.export.close)
            # LiteLLM leaves a large heap of long-lived objects; without this every full
            # collection walks it again, and the per-call dicts trigger collections often.
            gc.collect()
            gc.freeze()
            yield

    async def _close_pool(self) -> None:
        if self._pool is not None:
            await self._pool.close()


async def _no_reset(_conn: asyncpg.Connection) -> None:
    return None


def _remove(items: list[Any], item: Any) -> None:
    with contextlib.suppress(ValueError):
        items.remove(item)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` for an app downstream, after the body was read here."""
    pending = [body]

    async def replay() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        return await receive()

    return replay


_KEY_HEADERS = (b"authorization", b"x-api-key", b"api-key")


def _with_key(scope: Scope, key: bytes) -> Scope:
    """`scope` with the master key as its only key: LiteLLM knows lightloop's keys only as the
    master key, and lightloop has checked the caller's already."""
    scope = dict(scope)
    headers = [(k, v) for k, v in scope["headers"] if k not in _KEY_HEADERS]
    scope["headers"] = [*headers, (b"authorization", b"Bearer " + key)]
    return scope


def _lightloop_headers(scope: Scope) -> dict[str, str]:
    return {
        k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k.startswith(b"x-lightloop-")
    }


_check_handlers()
