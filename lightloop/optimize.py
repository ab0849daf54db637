"""`lightloop optimize-prompt`: GEPA (the `gepa` library, arXiv 2507.19457) searches for a better
text of a registered prompt, and every evaluation it asks for is rollouts through the task queue.

- A candidate is a staged `prompt_versions` row (its parent is the candidate GEPA reflected on).
  Evaluating it on tasks queues one rollout per task, pinned to it; the proxy serves the pinned
  text to the unchanged agent, which the same runner as `lightloop run` runs here (other
  machines can help: `lightloop run AGENT --dataset D --prompt-run RUN`).
- Reflection reads the rollouts' recorded calls, rewards and the agent's feedback, and asks the
  reflection model, through the proxy (so those calls are recorded too), for a better text.
- Resume: GEPA's state is kept in `prompt_runs.state` at the start of every iteration, and an
  evaluation is one rollout per (run, candidate, split, task): a resumed run reads what was
  scored instead of scoring it again; only the interrupted iteration's unfinished rollouts run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from lightloop.agents import Agent
from lightloop.errors import LightloopError

log = logging.getLogger(__name__)

REFLECTION_AGENT = "lightloop-optimizer"
STATE_FILE = "gepa_state.bin"  # where gepa keeps its state in its run_dir
MAX_FAILED_IN_A_ROW = 4  # reflection calls failing one after another, none ever succeeding: stop
BASELINE_CHECK_CALLS = 1000


class OptimizeError(LightloopError):
    """The optimisation cannot start or cannot go on (the message says why)."""


@dataclass(frozen=True)
class Task:
    """One task GEPA evaluates a candidate on (its DataInst)."""

    split: str
    id: str
    input: dict[str, Any]


@dataclass
class OptimizeConfig:
    name: str
    dataset: str
    agent_spec: str  # FILE:function, as stored with the run
    agent: Agent
    reflection_model: str
    proxy: str
    key: str
    database_url: str
    budget: int = 100
    concurrency: int = 8
    train_split: str = "train"
    val_split: str = "val"
    minibatch: int = 3
    seed: int = 0
    reflection_max_tokens: int = 1024
    fresh: bool = False
    on_progress: Callable[[Progress], None] | None = None


@dataclass
class Progress:
    run_id: str
    budget: int
    used: int = 0
    best_score: float | None = None
    best_version: int | None = None
    candidates: int = 0
    proposals_failed: int = 0
    resumed: bool = False


@dataclass
class Outcome:
    run_id: str
    baseline_version: int
    baseline_score: float | None
    best_version: int
    best_score: float | None
    metric_calls: int
    candidates: int
    proposals_failed: int
    resumed: bool


@dataclass
class _Search:
    """Everything one run holds while GEPA drives it; the async side (Postgres, the queue and
    the runner) runs on its own event loop, called from GEPA's synchronous adapter methods."""

    config: OptimizeConfig
    loop: asyncio.AbstractEventLoop
    conn: Any
    run: Any
    progress: Progress
    versions: dict[str, int] = field(default_factory=dict)  # candidate text -> version
    parent: int | None = None
    failed_in_a_row: int = 0
    proposed: int = 0
    last_error: str | None = None
    val_ids: list[str] = field(default_factory=list)

    def wait(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    # -- candidates ----------------------------------------------------------------------------

    def version_of(self, text: str) -> int:
        if text not in self.versions:
            from lightloop.store.prompts import add_candidate

            version, new = self.wait(
                add_candidate(self.conn, self.config.name, text, parent=self.parent, run_id=self.run.id)
            )
            self.versions[text] = version.version
            if new:
                self.progress.candidates += 1
        return self.versions[text]

    # -- evaluation through the queue ----------------------------------------------------------

    def evaluate(self, tasks: list[Task], text: str) -> list[Any]:
        """Each task's evaluation of the candidate (one rollout each, reused when it exists)."""
        version = self.version_of(text)
        evaluated: list[Any] = self.wait(self._evaluate(version, tasks))
        return evaluated

    async def _evaluate(self, version: int, tasks: list[Task]) -> list[Any]:
        from lightloop.runner import Runner
        from lightloop.store.prompt_runs import enqueue_evaluations, evaluations

        by_split: dict[str, list[str]] = {}
        for t in tasks:
            by_split.setdefault(t.split, []).append(t.id)
        found: dict[tuple[str, str], Any] = {}
        for split, ids in by_split.items():
            await enqueue_evaluations(self.conn, self.run, version, split, ids)
            done = await evaluations(self.conn, self.run.id, version, split, ids)
            if any(e.status not in ("succeeded", "failed") for e in done.values()) or len(done) < len(ids):
                runner = Runner(
                    self.config.agent,
                    self.config.proxy,
                    self.config.key,
                    self.config.dataset,
                    split,
                    self.config.concurrency,
                    prompt_run=self.run.id,
                )
                await runner.run()  # until this run's queued and running evaluations are done
                done = await evaluations(self.conn, self.run.id, version, split, ids)
            missing = [i for i in ids if i not in done or done[i].status not in ("succeeded", "failed")]
            if missing:
                raise OptimizeError(
                    f"evaluations of v{version} on {split} tasks {missing[:5]} did not finish"
                )
            found.update({(split, i): e for i, e in done.items()})
        return [found[(t.split, t.id)] for t in tasks]

    # -- reflection ----------------------------------------------------------------------------

    def reflect(self, prompt: str | list[dict[str, Any]]) -> str:
        """GEPA's reflection LM: the reflection model through the proxy, recorded as calls of
        the optimiser. A failure or an answer with no text is counted and raised, so GEPA skips
        this proposal and goes on."""
        from lightloop.store.prompt_runs import count_failed_proposal

        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        try:
            text = _ask(self.config, self.run.id, messages)
            if not _proposed_text(text):
                raise OptimizeError(f"the reflection model {self.config.reflection_model} returned no prompt")
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.failed_in_a_row += 1
            self.progress.proposals_failed = self.wait(count_failed_proposal(self.conn, self.run.id))
            log.warning("a proposal failed (%s); the run goes on", self.last_error)
            self._report()
            raise
        self.failed_in_a_row = 0
        self.proposed += 1
        return text

    def hopeless(self, _state: Any) -> bool:
        """GEPA's stop condition: every reflection so far failed, several times in a row."""
        return self.proposed == 0 and self.failed_in_a_row >= MAX_FAILED_IN_A_ROW

    # -- state and scores ----------------------------------------------------------------------

    def save_state(self, run_dir: str | None) -> None:
        from lightloop.store.prompt_runs import save_state

        if run_dir is None or not (Path(run_dir) / STATE_FILE).is_file():
            return
        state = (Path(run_dir) / STATE_FILE).read_bytes()
        self.wait(save_state(self.conn, self.run.id, state, self.progress.used))

    def record_val(self, text: str, scores: dict[Any, float], average: float, complete: bool) -> None:
        from lightloop.store.prompts import record_score

        version = self.version_of(text)
        if complete:
            by_task = {self.val_ids[int(i)]: float(s) for i, s in scores.items()}
            scored_on = f"{self.config.dataset}/{self.config.val_split}"
            self.wait(record_score(self.conn, self.config.name, version, float(average), by_task, scored_on))
        if self.progress.best_score is None or average > self.progress.best_score:
            self.progress.best_score, self.progress.best_version = float(average), version
        self._report()

    def _report(self) -> None:
        if self.config.on_progress is not None:
            self.config.on_progress(self.progress)


class _Adapter:
    """GEPA's adapter (duck-typed `GEPAAdapter`): one component, the prompt's text."""

    propose_new_texts = None

    def __init__(self, search: _Search) -> None:
        self.search = search
        self.component = search.config.name

    def evaluate(self, batch: list[Task], candidate: dict[str, str], capture_traces: bool = False) -> Any:
        from gepa.core.adapter import EvaluationBatch

        results = self.search.evaluate(batch, candidate[self.component])
        scores = [e.reward if e.reward is not None else 0.0 for e in results]
        outputs = [{"reward": e.reward, "status": e.status, "feedback": e.feedback} for e in results]
        trajectories = (
            [{"task": t, "evaluation": e} for t, e in zip(batch, results, strict=True)]
            if capture_traces
            else None
        )
        return EvaluationBatch(outputs=outputs, scores=scores, trajectories=trajectories)

    def make_reflective_dataset(
        self, candidate: dict[str, str], eval_batch: Any, components_to_update: list[str]
    ) -> dict[str, list[dict[str, Any]]]:
        from lightloop.store.prompt_runs import transcripts

        trajectories = eval_batch.trajectories or []
        calls = self.search.wait(
            transcripts(self.search.conn, [t["evaluation"].rollout_id for t in trajectories])
        )
        records = [
            {
                "Inputs": json.dumps(t["task"].input, ensure_ascii=False),
                "Generated Outputs": _transcript(calls[t["evaluation"].rollout_id]),
                "Feedback": _feedback(t["evaluation"]),
            }
            for t in trajectories
        ]
        return {component: records for component in components_to_update}


class _Callbacks:
    """GEPA's callbacks: the parent of the next candidate, val scores, the budget, the state."""

    def __init__(self, search: _Search) -> None:
        self.search = search

    def on_proposal_start(self, event: dict[str, Any]) -> None:
        self.search.parent = self.search.version_of(event["parent_candidate"][self.search.config.name])

    def on_valset_evaluated(self, event: dict[str, Any]) -> None:
        complete = event["num_examples_evaluated"] == event["total_valset_size"]
        self.search.record_val(
            event["candidate"][self.search.config.name],
            event["scores_by_val_id"],
            event["average_score"],
            complete,
        )

    def on_budget_updated(self, event: dict[str, Any]) -> None:
        self.search.progress.used = int(event["metric_calls_used"])
        self.search._report()

    def on_state_saved(self, event: dict[str, Any]) -> None:
        self.search.save_state(event.get("run_dir"))


class _Quiet:
    """GEPA's logger: its lines go to lightloop's log at debug (it would otherwise print, or
    replace sys.stdout for the whole run)."""

    def log(self, message: str) -> None:
        log.debug("gepa: %s", message)


def optimize(config: OptimizeConfig) -> Outcome:
    """Run (or resume) an optimisation of `config.name`; the best version and its score next
    to the baseline's."""
    loop = asyncio.new_event_loop()
    try:
        return _optimize(config, loop)
    finally:
        loop.close()


def _optimize(config: OptimizeConfig, loop: asyncio.AbstractEventLoop) -> Outcome:
    from gepa.api import optimize as gepa_optimize

    from lightloop.store import connect, prompts
    from lightloop.store import prompt_runs as runs

    conn = loop.run_until_complete(connect(config.database_url))
    try:
        prompt = loop.run_until_complete(prompts.get_prompt(conn, config.name))
        versions = loop.run_until_complete(prompts.get_versions(conn, config.name))
        baseline = versions[0]
        live = next(v for v in versions if v.status == "live")
        train = loop.run_until_complete(runs.split_tasks(conn, config.dataset, config.train_split))
        val = loop.run_until_complete(runs.split_tasks(conn, config.dataset, config.val_split))
        if not val:
            raise OptimizeError(
                f"dataset {config.dataset!r} has no {config.val_split!r} tasks to score candidates on"
            )
        run = (
            None
            if config.fresh
            else loop.run_until_complete(runs.unfinished_run(conn, config.name, config.dataset))
        )
        resumed = run is not None
        if run is None:
            checked, found = loop.run_until_complete(
                runs.baseline_seen(
                    conn,
                    config.name,
                    prompts.normalise(baseline.text),
                    prompt["agent"],
                    prompt["model"],
                    BASELINE_CHECK_CALLS,
                )
            )
            if found == 0:
                scope = (
                    " and ".join(
                        f"{k} {v!r}" for k, v in (("agent", prompt["agent"]), ("model", prompt["model"])) if v
                    )
                    or "any agent or model"
                )
                raise OptimizeError(
                    f"no recorded call holds prompt {config.name!r}'s baseline text: checked the {checked} "
                    f"most recent calls of {scope}. Run the agent through the proxy first (the baseline "
                    "must be a whole message's text, exact after trimming whitespace)"
                )
            run = loop.run_until_complete(
                runs.start_run(
                    conn,
                    run_id=f"po-{uuid.uuid4().hex[:12]}",
                    name=config.name,
                    dataset=config.dataset,
                    train_split=config.train_split,
                    val_split=config.val_split,
                    agent=config.agent_spec,
                    reflection_model=config.reflection_model,
                    budget=config.budget,
                    seed=config.seed,
                )
            )
        progress = Progress(
            run.id, run.budget, used=run.metric_calls, resumed=resumed, proposals_failed=run.proposals_failed
        )
        search = _Search(config, loop, conn, run, progress, val_ids=[i for i, _ in val])
        # Versions the run made before (a resume): their texts map to the same rows.
        search.versions.update({v.text: v.version for v in versions})
        trainset = [Task(config.train_split, i, x) for i, x in train] or [
            Task(config.val_split, i, x) for i, x in val
        ]
        valset = [Task(config.val_split, i, x) for i, x in val]
        with tempfile.TemporaryDirectory(prefix="lightloop-gepa-") as run_dir:
            if run.state is not None:
                (Path(run_dir) / STATE_FILE).write_bytes(run.state)
            try:
                result: Any = gepa_optimize(
                    seed_candidate={config.name: live.text},
                    trainset=trainset,
                    valset=valset,
                    adapter=cast(Any, _Adapter(search)),
                    reflection_lm=search.reflect,
                    reflection_minibatch_size=min(config.minibatch, len(trainset)),
                    max_metric_calls=run.budget,
                    stop_callbacks=[cast(Any, search.hopeless)],
                    callbacks=[cast(Any, _Callbacks(search))],
                    logger=_Quiet(),
                    run_dir=run_dir,
                    seed=run.seed,
                    display_progress_bar=False,
                )
            except BaseException as exc:
                if isinstance(exc, Exception):
                    loop.run_until_complete(
                        runs.end_run(
                            conn, run.id, "failed", best_version=None, error=f"{type(exc).__name__}: {exc}"
                        )
                    )
                raise
        if search.proposed == 0 and search.last_error is not None:
            loop.run_until_complete(
                runs.end_run(conn, run.id, "failed", best_version=None, error=search.last_error)
            )
            raise OptimizeError(f"every proposal failed; the reflection model said: {search.last_error}")
        # Every candidate's val score as GEPA measured it (those it scored on the whole val split).
        scored_on = f"{config.dataset}/{config.val_split}"
        for index, candidate in enumerate(result.candidates):
            subscores = result.val_subscores[index]
            if len(subscores) == len(valset):
                loop.run_until_complete(
                    prompts.record_score(
                        conn,
                        config.name,
                        search.version_of(candidate[config.name]),
                        float(result.val_aggregate_scores[index]),
                        {search.val_ids[int(i)]: float(s) for i, s in subscores.items()},
                        scored_on,
                    )
                )
        best_text: str = result.best_candidate[config.name]
        best_version = search.version_of(best_text)
        loop.run_until_complete(runs.end_run(conn, run.id, "finished", best_version=best_version))
        return Outcome(
            run_id=run.id,
            baseline_version=live.version,
            baseline_score=float(result.val_aggregate_scores[0]),
            best_version=best_version,
            best_score=float(result.val_aggregate_scores[result.best_idx]),
            metric_calls=int(result.total_metric_calls or progress.used),
            candidates=len(result.candidates),
            proposals_failed=search.progress.proposals_failed,
            resumed=resumed,
        )
    finally:
        loop.run_until_complete(conn.close())


def _ask(config: OptimizeConfig, run_id: str, messages: list[dict[str, Any]]) -> str:
    import httpx

    from lightloop.tracing import untraced

    base = config.proxy.rstrip("/").removesuffix("/v1")
    with untraced():
        answer = httpx.post(
            f"{base}/v1/chat/completions",
            json={
                "model": config.reflection_model,
                "messages": messages,
                "max_tokens": config.reflection_max_tokens,
            },
            headers={
                "authorization": f"Bearer {config.key}",
                "x-lightloop-agent": REFLECTION_AGENT,
                "x-lightloop-rollout": f"{run_id}-reflect-{uuid.uuid4().hex[:8]}",
                "x-lightloop-mode": "val",  # recorded, never trained on
            },
            timeout=600,
        )
    if answer.status_code != 200:
        try:
            message = answer.json()["error"]["message"]
        except Exception:
            message = answer.text[:300]
        raise OptimizeError(f"the reflection model answered HTTP {answer.status_code}: {message}")
    content = answer.json()["choices"][0]["message"].get("content")
    return content if isinstance(content, str) else ""


def _proposed_text(reply: str) -> bool:
    """Whether GEPA will find a prompt in the reply: the text between the first and last ```
    fences (a language tag dropped), or the whole reply when it has none."""
    if "```" in reply:
        first, last = reply.find("```"), reply.rfind("```")
        inner = reply[first + 3 : last] if last > first else reply[first + 3 :]
        lines = inner.split("\n", 1)
        if len(lines) == 2 and lines[0].strip() and " " not in lines[0].strip():
            inner = lines[1]  # a language tag
        return bool(inner.strip())
    return bool(reply.strip())


def _transcript(calls: list[dict[str, Any]]) -> str:
    """The rollout's conversation as the model saw it: the last call's messages (which carry the
    earlier turns) and each call's reply."""
    if not calls:
        return "(no recorded call)"
    lines = []
    for message in calls[-1]["messages"]:
        if isinstance(message, dict):
            lines.append(f"{message.get('role', '?')}: {_content(message)}")
    reply = calls[-1]["response"] or {}
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if choices:
        lines.append(f"assistant: {_content(choices[0].get('message') or {})}")
    return "\n".join(lines)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    text = content if isinstance(content, str) else ""
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        text += f" [tool call {function.get('name')}({function.get('arguments')})]"
    return text.strip()


def _feedback(evaluation: Any) -> str:
    reward = "none" if evaluation.reward is None else f"{evaluation.reward:.3f}"
    parts = [f"reward {reward}" + ("" if evaluation.status == "succeeded" else " (the agent failed)")]
    if evaluation.feedback:
        parts.append(evaluation.feedback)
    return ". ".join(parts)
