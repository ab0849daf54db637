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
import contextlib
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
MAX_FAILED_IN_A_ROW = 4  # proposals failing one after another, none ever succeeding: stop
POLL_S = 0.25  # how often the optimiser looks whether a batch of evaluations finished
WRITTEN_WAIT_S = 30.0  # at most this long for their calls to be written (then reflect anyway)
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
    candidates: int  # versions the run made
    accepted: int  # of those, the ones GEPA kept in its pool (better on a minibatch)
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
    iteration: int = -1
    failed_iteration: int | None = None  # GEPA asks again once after a failure: same answer
    callback_error: BaseException | None = None  # GEPA swallows callbacks' errors: kept here

    def wait(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def check(self) -> None:
        """Raise what a callback could not do (save the state, record a score): GEPA would
        log it and go on, losing resumability or scores without a word."""
        if self.callback_error is not None:
            raise OptimizeError(
                f"keeping the run's record failed: {self.callback_error}"
            ) from self.callback_error

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
        self.check()
        version = self.version_of(text)
        evaluated: list[Any] = self.wait(self._evaluate(version, tasks))
        return evaluated

    async def _evaluate(self, version: int, tasks: list[Task]) -> list[Any]:
        from lightloop.store.prompt_runs import enqueue_evaluations

        by_split: dict[str, list[str]] = {}
        for t in tasks:
            by_split.setdefault(t.split, []).append(t.id)
        found: dict[tuple[str, str], Any] = {}
        for split, ids in by_split.items():
            await enqueue_evaluations(self.conn, self.run, version, split, ids)
            done = await self._run_until_finished(version, split, ids)
            found.update({(split, i): e for i, e in done.items()})
        return [found[(t.split, t.id)] for t in tasks]

    async def _run_until_finished(self, version: int, split: str, ids: list[str]) -> dict[str, Any]:
        """Run this run's queued evaluations of `split` with the agent here (runners elsewhere
        with --prompt-run help) until those of `ids` are finished and their calls written."""
        from lightloop.runner import Runner
        from lightloop.store.prompt_runs import evaluations, written_through

        def finished(done: dict[str, Any]) -> bool:
            return len(done) == len(ids) and all(e.status in ("succeeded", "failed") for e in done.values())

        done = await evaluations(self.conn, self.run.id, version, split, ids)
        if not finished(done):
            runner = Runner(
                self.config.agent,
                self.config.proxy,
                self.config.key,
                self.config.dataset,
                split,
                self.config.concurrency,
                prompt_run=self.run.id,
            )
            running = asyncio.ensure_future(runner.run())
            try:
                # The queue never reports a running optimisation drained (helpers wait between
                # batches), so this runner is stopped once the batch it is here for is done.
                while not finished(done):
                    if running.done():
                        running.result()  # the runner's error (the proxy unreachable, say)
                        raise OptimizeError(
                            f"the runner stopped before v{version}'s {split} evaluations finished"
                        )
                    await asyncio.wait({running}, timeout=POLL_S)
                    done = await evaluations(self.conn, self.run.id, version, split, ids)
            finally:
                runner.stop()
                await running
        # Their calls may be in another proxy process's writer still: wait until written.
        for _ in range(int(WRITTEN_WAIT_S / POLL_S)):
            if await written_through(self.conn, self.run.id, version, split, ids):
                break
            await asyncio.sleep(POLL_S)
        return done

    # -- reflection ----------------------------------------------------------------------------

    def reflect(self, prompt: str | list[dict[str, Any]]) -> str:
        """GEPA's reflection LM: the reflection model through the proxy, recorded as calls of
        the optimiser. A failure or an answer with no text is counted and raised, so GEPA skips
        this proposal and goes on."""
        from lightloop.store.prompt_runs import count_failed_proposal

        if self.failed_iteration == self.iteration:
            # GEPA retries a failed proposal once at once: one failure, one call, one count.
            raise OptimizeError(self.last_error or "the proposal failed")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        try:
            text = _ask(self.config, self.run.id, messages)
            if not _proposed_text(text):
                raise OptimizeError(f"the reflection model {self.config.reflection_model} returned no prompt")
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.failed_in_a_row += 1
            self.failed_iteration = self.iteration
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
    """GEPA's callbacks: the iteration, the parent of the next candidate, val scores, the
    budget, the state. GEPA logs a callback's error and goes on; each is kept for `check`."""

    def __init__(self, search: _Search) -> None:
        self.search = search

    def _kept(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:
            self.search.callback_error = self.search.callback_error or exc
            raise

    def on_iteration_start(self, event: dict[str, Any]) -> None:
        self.search.iteration = int(event["iteration"])
        used = getattr(event.get("state"), "total_num_evals", None)
        if isinstance(used, int):
            self.search.progress.used = used
            self.search._report()

    def on_proposal_start(self, event: dict[str, Any]) -> None:
        text = event["parent_candidate"][self.search.config.name]
        self._kept(lambda: setattr(self.search, "parent", self.search.version_of(text)))

    def on_valset_evaluated(self, event: dict[str, Any]) -> None:
        complete = event["num_examples_evaluated"] == event["total_valset_size"]
        text = event["candidate"][self.search.config.name]
        scores, average = event["scores_by_val_id"], event["average_score"]
        self._kept(lambda: self.search.record_val(text, scores, average, complete))

    def on_budget_updated(self, event: dict[str, Any]) -> None:
        self.search.progress.used = int(event["metric_calls_used"])
        self.search._report()

    def on_state_saved(self, event: dict[str, Any]) -> None:
        self._kept(lambda: self.search.save_state(event.get("run_dir")))


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

    from lightloop.store import connect
    from lightloop.store import prompt_runs as runs

    def wait(coro: Any) -> Any:
        return loop.run_until_complete(coro)

    conn = wait(connect(config.database_url))
    try:
        run, resumed = _start_or_resume(config, conn, wait)
        versions = {v.text: v.version for v in wait(_versions(conn, config.name))}
        start_text = next(text for text, v in versions.items() if v == run.start_version)
        val = wait(runs.tasks_by_id(conn, run.dataset, run.val_split, run.val_tasks))
        train = wait(runs.tasks_by_id(conn, run.dataset, run.train_split, run.train_tasks))
        progress = Progress(
            run.id,
            run.budget,
            used=run.metric_calls,
            resumed=resumed,
            proposals_failed=run.proposals_failed,
            candidates=wait(runs.count_candidates(conn, run.id)),
        )
        search = _Search(config, loop, conn, run, progress, val_ids=list(run.val_tasks))
        search.versions.update(versions)  # texts the prompt has map to their rows (a resume)
        valset = [Task(run.val_split, i, x) for i, x in val]
        trainset = [Task(run.train_split, i, x) for i, x in train] or valset
        with tempfile.TemporaryDirectory(prefix="lightloop-gepa-") as run_dir:
            if run.state is not None:
                (Path(run_dir) / STATE_FILE).write_bytes(run.state)
            try:
                result: Any = gepa_optimize(
                    seed_candidate={config.name: start_text},
                    trainset=trainset,
                    valset=valset,
                    adapter=cast(Any, _Adapter(search)),
                    reflection_lm=search.reflect,
                    reflection_minibatch_size=min(config.minibatch, len(trainset)),
                    max_metric_calls=run.budget,
                    # Rewards are any finite number: a minibatch of 1.0s is not "perfect".
                    skip_perfect_score=False,
                    stop_callbacks=[cast(Any, search.hopeless)],
                    callbacks=[cast(Any, _Callbacks(search))],
                    logger=_Quiet(),
                    run_dir=run_dir,
                    seed=run.seed,
                    display_progress_bar=False,
                )
                search.check()
            except Exception as exc:
                # The run stays resumable (status running): the same command goes on from its
                # last saved iteration once the proxy or Postgres is back. The error is kept.
                with contextlib.suppress(Exception):
                    wait(runs.note_error(conn, run.id, f"{type(exc).__name__}: {exc}"))
                if isinstance(exc, LightloopError):
                    raise
                raise OptimizeError(
                    f"the run stopped ({type(exc).__name__}: {exc}); run the same command to resume it"
                ) from exc
        if search.proposed == 0 and search.last_error is not None:
            wait(runs.end_run(conn, run.id, "failed", best_version=None, error=search.last_error))
            raise OptimizeError(f"every proposal failed; the reflection model said: {search.last_error}")
        _record_scores(search, result, len(valset), wait)
        best_version = search.version_of(result.best_candidate[config.name])
        used = int(result.total_metric_calls or progress.used)
        wait(runs.end_run(conn, run.id, "finished", best_version=best_version, metric_calls=used))
        return Outcome(
            run_id=run.id,
            baseline_version=run.start_version,
            baseline_score=float(result.val_aggregate_scores[0]),
            best_version=best_version,
            best_score=float(result.val_aggregate_scores[result.best_idx]),
            metric_calls=used,
            candidates=wait(runs.count_candidates(conn, run.id)),
            accepted=len(result.candidates) - 1,
            proposals_failed=search.progress.proposals_failed,
            resumed=resumed,
        )
    finally:
        with contextlib.suppress(Exception):
            wait(conn.close())


async def _versions(conn: Any, name: str) -> list[Any]:
    from lightloop.store.prompts import get_versions

    return await get_versions(conn, name)


def _start_or_resume(config: OptimizeConfig, conn: Any, wait: Callable[[Any], Any]) -> tuple[Any, bool]:
    """The newest unfinished run of the prompt on the dataset (taken for this process: two
    optimisers never drive one run), or a new one after the baseline check."""
    from lightloop.store import prompt_runs as runs
    from lightloop.store import prompts

    prompt = wait(prompts.get_prompt(conn, config.name))  # NotFound: one line
    versions = wait(prompts.get_versions(conn, config.name))
    run = None if config.fresh else wait(runs.unfinished_run(conn, config.name, config.dataset))
    if run is not None:
        if not wait(runs.lock_run(conn, run.id)):
            raise OptimizeError(
                f"run {run.id} of prompt {config.name!r} is being optimised by another process"
            )
        dropped = wait(runs.drop_queued(conn, run.id))
        differs = [
            f"--{flag.replace('_', '-')} {given} (the run's: {stored})"
            for flag, given, stored in (
                ("budget", config.budget, run.budget),
                ("val_split", config.val_split, run.val_split),
                ("train_split", config.train_split, run.train_split),
                ("reflection_model", config.reflection_model, run.reflection_model),
                ("agent", config.agent_spec, run.agent),
            )
            if given != stored
        ]
        if differs:
            log.warning("resuming run %s with its own settings; ignored: %s", run.id, ", ".join(differs))
        log.info("resuming run %s (%d unstarted evaluations dropped)", run.id, dropped)
        return run, True
    baseline = versions[0]
    checked, found = wait(
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
        scope = " and ".join(
            f"{k} {v!r}" for k, v in (("agent", prompt["agent"]), ("model", prompt["model"])) if v
        )
        raise OptimizeError(
            f"no recorded call holds prompt {config.name!r}'s baseline text: checked the {checked} most "
            f"recent calls of {scope or 'any agent or model'}. Run the agent through the proxy first (the "
            "baseline must be a whole message's text, exact after trimming whitespace)"
        )
    val = wait(runs.split_tasks(conn, config.dataset, config.val_split))
    if not val:
        raise OptimizeError(
            f"dataset {config.dataset!r} has no {config.val_split!r} tasks to score candidates on"
        )
    train = wait(runs.split_tasks(conn, config.dataset, config.train_split))
    live = next(v for v in versions if v.status == "live")
    run_id = f"po-{uuid.uuid4().hex[:12]}"
    run = wait(
        runs.start_run(
            conn,
            run_id=run_id,
            name=config.name,
            dataset=config.dataset,
            train_split=config.train_split,
            val_split=config.val_split,
            agent=config.agent_spec,
            reflection_model=config.reflection_model,
            budget=config.budget,
            seed=config.seed,
            start_version=live.version,
            policy_version=wait(runs.live_policy_version(conn, config.dataset)),
            train_tasks=[i for i, _ in train],
            val_tasks=[i for i, _ in val],
        )
    )
    wait(runs.lock_run(conn, run_id))
    if config.fresh:
        wait(runs.supersede_runs(conn, config.name, config.dataset, run_id))
    return run, False


def _record_scores(search: _Search, result: Any, val_size: int, wait: Callable[[Any], Any]) -> None:
    """Every candidate's val score as GEPA measured it (those it scored on the whole val split)."""
    from lightloop.store.prompts import record_score

    config = search.config
    scored_on = f"{config.dataset}/{search.run.val_split}"
    for index, candidate in enumerate(result.candidates):
        subscores = result.val_subscores[index]
        if len(subscores) == val_size:
            by_task = {search.val_ids[int(i)]: float(s) for i, s in subscores.items()}
            version = search.version_of(candidate[config.name])
            wait(
                record_score(
                    search.conn,
                    config.name,
                    version,
                    float(result.val_aggregate_scores[index]),
                    by_task,
                    scored_on,
                )
            )


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
    """Whether GEPA will find a prompt in the reply, by GEPA's own extraction (the text between
    the first and last ``` fences, a language tag dropped; or the whole reply)."""
    from gepa.strategies.instruction_proposal import InstructionProposalSignature

    extracted = InstructionProposalSignature.output_extractor(reply)
    return bool(extracted.get("new_instruction", "").strip())


def _transcript(calls: list[dict[str, Any]]) -> str:
    """The rollout's conversation as the model saw it: the messages of the last call that
    carried the prompt (they hold the earlier turns; an agent's other calls may not) and its
    reply."""
    if not calls:
        return "(no recorded call)"
    last = ([c for c in calls if c.get("prompt")] or calls)[-1]
    lines = []
    for message in last["messages"]:
        if isinstance(message, dict):
            lines.append(f"{message.get('role', '?')}: {_content(message)}")
    reply = last["response"] or {}
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
