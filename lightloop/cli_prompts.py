"""`lightloop prompts` (versioned prompts the proxy serves on the wire, store/prompts.py) and
`lightloop optimize-prompt` (GEPA over the task queue, lightloop/optimize.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from tabulate import tabulate

from lightloop.cli_keys import _with_conn


@click.group()
def prompts() -> None:
    """Versioned prompts: the proxy replaces a registered prompt's baseline text, wherever a call
    sends it as a whole message, with the live version (or the candidate an optimisation run
    pinned to the rollout). Agents stay unchanged."""


@prompts.command("add")
@click.argument("name")
@click.option(
    "--text-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The prompt's text (UTF-8).",
)
@click.option("--agent", default=None, help="Only calls of this agent (X-Lightloop-Agent).")
@click.option("--model", default=None, help="Only calls to this model.")
@click.pass_context
def prompts_add(ctx: click.Context, name: str, text_file: Path, agent: str | None, model: str | None) -> None:
    """Register NAME with the file's text as its baseline (version 0, live) the first time;
    afterwards add the text as a new staged version."""
    from lightloop.store.prompts import add_prompt

    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{text_file} is not UTF-8 text: {exc}", param_hint="--text-file") from None
    try:
        version, new = _with_conn(ctx, lambda conn: add_prompt(conn, name, text, agent=agent, model=model))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if version.version == 0 and new:
        scope = ", ".join(f"{k} {v}" for k, v in (("agent", agent), ("model", model)) if v) or "every call"
        click.echo(f"registered prompt {name!r}: version 0 (baseline) is live; it applies to {scope}")
    elif new:
        click.echo(
            f"prompt {name!r}: version {version.version} staged (make it live: lightloop prompts set-live)"
        )
    else:
        click.echo(f"prompt {name!r} already has this text as version {version.version} ({version.status})")


@prompts.command("list")
@click.pass_context
def prompts_list(ctx: click.Context) -> None:
    """Every prompt: where it applies, its live version, how many versions, the best score."""
    from lightloop.store.prompts import list_prompts

    found = _with_conn(ctx, list_prompts)
    if not found:
        click.echo("no prompts yet: register one with `lightloop prompts add NAME --text-file F`")
        return
    rows = [
        [p["name"], p["agent"] or "", p["model"] or "", p["live"], p["versions"], _score(p["best_score"])]
        for p in found
    ]
    headers = ["name", "agent", "model", "live", "versions", "best score"]
    click.echo(tabulate(rows, headers=headers, tablefmt="psql", disable_numparse=True))


@prompts.command("show")
@click.argument("name")
@click.option("--version", "only", type=int, default=None, help="Print this version's text alone.")
@click.pass_context
def prompts_show(ctx: click.Context, name: str, only: int | None) -> None:
    """NAME's versions (status, origin, parent, score), then the live text; with --version,
    that version's text alone."""
    from lightloop.store.prompts import get_versions

    versions = _with_conn(ctx, lambda conn: get_versions(conn, name))  # unknown: NotFound, exit 1
    if only is not None:
        chosen = [v for v in versions if v.version == only]
        if not chosen:
            raise click.ClickException(f"prompt {name!r} has no version {only}")
        click.echo(chosen[0].text)
        return
    rows = [
        [
            v.version,
            v.status,
            v.origin,
            "" if v.parent is None else v.parent,
            _score(v.score),
            v.scored_on or "",
        ]
        for v in versions
    ]
    headers = ["version", "status", "origin", "parent", "score", "scored on"]
    click.echo(tabulate(rows, headers=headers, tablefmt="psql", disable_numparse=True))
    live = next(v for v in versions if v.status == "live")
    click.echo(f"\nlive text (version {live.version}):\n{live.text}")


@prompts.command("set-live")
@click.argument("name")
@click.argument("version", type=int)
@click.pass_context
def prompts_set_live(ctx: click.Context, name: str, version: int) -> None:
    """Make VERSION of NAME live: every proxy serves it from the next call on."""
    from lightloop.store.prompts import set_live

    record = _with_conn(ctx, lambda conn: set_live(conn, name, version))
    click.echo(f"prompt {name!r}: version {record.version} is live")


@click.command("optimize-prompt")
@click.argument("name")
@click.option("--dataset", required=True, help="The dataset whose tasks score candidates.")
@click.option("--val-split", default="val", show_default=True, help="The split candidates are scored on.")
@click.option(
    "--train-split", default="train", show_default=True, help="The split reflection draws minibatches from."
)
@click.option(
    "--agent", "agent_spec", required=True, help="The agent, FILE:function (as for `lightloop run`)."
)
@click.option(
    "--reflection-model", required=True, help="Any model the proxy serves, which proposes new texts."
)
@click.option(
    "--budget",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Task evaluations (rollouts) at most.",
)
@click.option("--concurrency", type=click.IntRange(1, 10_000), default=8, show_default=True)
@click.option(
    "--minibatch", type=click.IntRange(1), default=3, show_default=True, help="Tasks per reflection."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--reflection-max-tokens", type=click.IntRange(16), default=1024, show_default=True, help="Per proposal."
)
@click.option("--apply", is_flag=True, help="Make the best version live at the end (if it beats the start).")
@click.option("--fresh", is_flag=True, help="Start a new run even if one of NAME on DATASET did not finish.")
@click.option(
    "--proxy", "proxy_url", default=None, metavar="URL", help="The proxy (default: configured address)."
)
@click.option("--key", default=None, help="The proxy's key (default: as for `lightloop run`).")
@click.option("--quiet", is_flag=True, help="Log lines instead of a progress bar.")
@click.pass_context
def optimize_prompt(ctx: click.Context, /, **o: Any) -> None:
    """Search for a better text of prompt NAME with GEPA: each candidate is scored by running
    the dataset's tasks through the queue with it pinned to their rollouts (the proxy serves it
    to the unchanged agent), and the reflection model reads those rollouts' calls, rewards and
    feedback to propose the next. Every candidate is kept as a staged version. Stopped (even by
    kill -9), the same command resumes the run from Postgres."""
    from lightloop.cli import _agent_and_proxy, _database_url, _migrate_if_reachable, _settings
    from lightloop.optimize import OptimizeConfig, optimize

    agent, proxy_url, key = _agent_and_proxy(ctx, o["agent_spec"], o["proxy_url"], o["key"])
    url = _database_url(_settings(ctx))
    _migrate_if_reachable(url)
    progress = _ProgressDisplay(quiet=o["quiet"])
    config = OptimizeConfig(
        name=o["name"],
        dataset=o["dataset"],
        agent_spec=o["agent_spec"],
        agent=agent,
        reflection_model=o["reflection_model"],
        proxy=proxy_url,
        key=key,
        database_url=url,
        budget=o["budget"],
        concurrency=o["concurrency"],
        train_split=o["train_split"],
        val_split=o["val_split"],
        minibatch=o["minibatch"],
        seed=o["seed"],
        reflection_max_tokens=o["reflection_max_tokens"],
        fresh=o["fresh"],
        on_progress=progress.update,
    )
    with progress:
        outcome = optimize(config)
    click.echo(
        f"run {outcome.run_id}{' (resumed)' if outcome.resumed else ''}: {outcome.metric_calls} evaluations, "
        f"{outcome.candidates} candidates ({outcome.accepted} kept by GEPA), "
        f"{outcome.proposals_failed} failed proposals"
    )
    rows = [
        ["start", outcome.baseline_version, _score(outcome.baseline_score)],
        ["best", outcome.best_version, _score(outcome.best_score)],
    ]
    headers = ["", "version", f"val score ({o['val_split']})"]
    click.echo(tabulate(rows, headers=headers, tablefmt="psql", disable_numparse=True))
    if outcome.best_version == outcome.baseline_version:
        click.echo("no candidate beat the version the run started from; nothing to apply")
    elif o["apply"]:
        from lightloop.store.prompts import set_live

        _with_conn(ctx, lambda conn: set_live(conn, o["name"], outcome.best_version))
        click.echo(f"version {outcome.best_version} is live")
    else:
        click.echo(f"make it live with: lightloop prompts set-live {o['name']} {outcome.best_version}")


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


class _ProgressDisplay:
    """A rich progress bar of the budget used and the best score so far (log lines if quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._bar: Any = None
        self._task: Any = None
        self._last: tuple[int, float | None, int] | None = None

    def __enter__(self) -> _ProgressDisplay:
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[best]}"),
                TimeElapsedColumn(),
            )
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, p: Any) -> None:
        best = "best -" if p.best_score is None else f"best {p.best_score:.3f} (v{p.best_version})"
        best += f", {p.candidates} candidates" + (
            f", {p.proposals_failed} failed" if p.proposals_failed else ""
        )
        if self._bar is None:
            state = (p.used, p.best_score, p.proposals_failed)
            if state != self._last:
                click.echo(f"{p.run_id}: {p.used}/{p.budget} evaluations, {best}", err=True)
                self._last = state
            return
        if self._task is None:
            self._task = self._bar.add_task(f"optimising ({p.run_id})", total=p.budget, best=best)
        self._bar.update(self._task, completed=min(p.used, p.budget), best=best)
