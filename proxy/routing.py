"""lightloop's routes on the proxy, in one table: it drives dispatch, the metrics' route labels,
and the README test (every route documented). A path no route matches goes to LiteLLM."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as documented: `/v1/rollouts/{id}/finish`
    name: str  # the metrics label, and the ProxyApp handler `_serve_<name>`
    # Also answered under the path form `/rollout/{id}/v1/...` (its rollout applies).
    path_form: bool = False
    # Other spellings clients use for the same route (OpenAI's SDKs without `/v1`).
    aliases: tuple[str, ...] = ()
    operation: str | None = None  # completions: chat or text_completion
    # Who may call it: any valid key ("agent"), only an admin key (the master key is one), or
    # anyone ("public": the dashboard's sign-in form and its static files).
    scope: str = "agent"
    # A dashboard page: errors are pages, and no session redirects to the sign-in form.
    ui: bool = False
    pattern: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # A model name may hold "/" (`Qwen/Qwen3-8B`), as LiteLLM's `{model:path}` allows.
        regex = re.escape(self.path).replace(r"\{model\}", r"(?P<model>.+?)")
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", regex)
        object.__setattr__(self, "pattern", re.compile(f"^{regex}$"))

    @property
    def documented(self) -> str:
        return f"{self.method} {self.path}"


TABLE: tuple[Route, ...] = (
    Route("POST", "/v1/chat/completions", "completions", True, ("/chat/completions",), operation="chat"),
    Route("POST", "/v1/completions", "completions", True, ("/completions",), operation="text_completion"),
    # The model in the path (Azure's deployments form sends none in the body): LiteLLM's
    # spellings of the same two operations, so a policy model asked for this way is served by
    # the policy lane too, with token ids, its live version and the cap.
    Route("POST", "/engines/{model}/chat/completions", "completions", operation="chat"),
    Route("POST", "/engines/{model}/completions", "completions", operation="text_completion"),
    Route("POST", "/openai/deployments/{model}/chat/completions", "completions", operation="chat"),
    Route("POST", "/openai/deployments/{model}/completions", "completions", operation="text_completion"),
    Route("POST", "/v1/rewards", "rewards", path_form=True),
    Route("POST", "/v1/rollouts/{id}/finish", "finish"),
    Route("POST", "/v1/rollouts/{id}/heartbeat", "heartbeat"),
    Route("POST", "/v1/tasks/next", "tasks_next"),
    Route("GET", "/v1/datasets", "datasets"),
    Route("GET", "/v1/datasets/{name}", "dataset"),
    # The text of a registered prompt meant for the caller's rollout (path form) or the live one.
    Route("GET", "/v1/prompts/{name}", "prompt", path_form=True),
    Route("POST", "/v1/traces", "traces"),
    # AgentOps' API, as its SDK calls it (proxy/agentops.py): the token trade takes the key in
    # its body, so the route itself asks none.
    Route("POST", "/v3/auth/token", "agentops_auth", scope="public"),
    Route("POST", "/v4/logs/upload/", "agentops_logs"),
    # The dashboard's figures, as JSON (proxy/stats.py): admin keys, since they read every
    # agent's data.
    Route("GET", "/v1/stats/overview", "stats_overview", scope="admin"),
    Route("GET", "/v1/stats/rewards", "stats_rewards", scope="admin"),
    Route("GET", "/v1/stats/steps", "stats_steps", scope="admin"),
    Route("GET", "/v1/stats/rollouts", "stats_rollouts", scope="admin"),
    Route("GET", "/v1/stats/rollouts/{id}", "stats_rollout", scope="admin"),
    Route("GET", "/v1/stats/rollouts/{id}/samples", "stats_samples", scope="admin"),
    Route("GET", "/metrics", "metrics", scope="admin"),
    # The dashboard (proxy/ui.py): pages for admin keys' sessions, the sign-in form, its files.
    Route("GET", "/ui", "ui_overview", scope="admin", ui=True),
    Route("GET", "/ui/training", "ui_training", scope="admin", ui=True),
    Route("GET", "/ui/rollouts", "ui_rollouts", scope="admin", ui=True),
    Route("GET", "/ui/rollouts/{id}", "ui_rollout", scope="admin", ui=True),
    Route("GET", "/ui/datasets", "ui_datasets", scope="admin", ui=True),
    Route("GET", "/ui/login", "ui_login", scope="public", ui=True),
    Route("POST", "/ui/session", "ui_session", scope="public", ui=True),
    Route("POST", "/ui/logout", "ui_logout", scope="public", ui=True),
    Route("GET", "/ui/static/{file}", "ui_static", scope="public", ui=True),
    Route("GET", "/health", "health"),
)

_STATIC = {p: r for r in TABLE if "{" not in r.path for p in (r.path, *r.aliases)}
_TEMPLATED = tuple(r for r in TABLE if "{" in r.path)


def match(path: str) -> tuple[Route, dict[str, str]] | None:
    """The route serving `path` (the path form's prefix already removed) and its parameters."""
    route = _STATIC.get(path)
    if route is not None:
        return route, {}
    for route in _TEMPLATED:
        found = route.pattern.match(path)
        if found is not None:
            return route, found.groupdict()
    return None
