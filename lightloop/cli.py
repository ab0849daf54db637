"""The `lightloop` command. Settings are read here, once, and passed down."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Coroutine
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import pydantic
from tabulate import tabulate

from lightloop.cli_keys import keys
from lightloop.cli_prompts import optimize_prompt, prompts
from lightloop.errors import LightloopError
from lightloop.settings import Settings, describe_settings, load_settings

T = TypeVar("T")
log = logging.getLogger("lightloop")


def _settings_epilog() -> str:
    # `\b` keeps click from re-wrapping the table.
    lines = ["\b", "Settings (environment variable, default), also read from lightloop.yaml:"]
    for env, default, description in describe_settings():
        shown = f" [default: {default}]" if default else ""
        lines.append(f"  {env}{shown}")
        if description:
            lines.append(f"      {description}")
    return "\n".join(lines)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None
    return settings


def _database_url(settings: Settings) -> str:
    from lightloop.store.embedded import resolve_database_url

    return resolve_database_url(settings.database_url, settings.pgdata)


@click.group(
    epilog=_settings_epilog(),
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="LIGHTLOOP_CONFIG",
    show_envvar=True,
    help="lightloop.yaml to read (default: ./lightloop.yaml when present).",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Data folder. [env var: LIGHTLOOP_HOME]",
)
@click.option(
    "--database-url",
    default=None,
    metavar="URL",
    help="Postgres URL instead of the embedded one. [env var: LIGHTLOOP_DATABASE_URL]",
)
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="[env var: LIGHTLOOP_LOG_LEVEL]",
)
@click.version_option(package_name="lightloop")
@click.pass_context
def cli(
    ctx: click.Context,
    config: Path | None,
    home: Path | None,
    database_url: str | None,
    log_level: str | None,
) -> None:
    """lightloop: record the LLM traffic of agents in Postgres and train better models from it."""
    settings = load_settings(config, home=home, database_url=database_url, log_level=log_level)
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.log_level != "debug":
        # Alembic narrates its plugin set-up at INFO on every run.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    ctx.obj = settings


# -- db ------------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The database: migrations, URL, and the embedded server."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to migrate to.")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the schema (the only way it changes). Refuses a schema newer than this code."""
    from lightloop.store.migrate import upgrade

    url = _database_url(_settings(ctx))
    at = _run(upgrade(url, revision))
    click.echo(f"database schema at revision {at}")


@db.command("url")
@click.pass_context
def db_url(ctx: click.Context) -> None:
    """Print the database URL (starting the embedded Postgres if it is not running)."""
    click.echo(_database_url(_settings(ctx)))


@db.command("start")
@click.pass_context
def db_start(ctx: click.Context) -> None:
    """Start the embedded Postgres (kept running until `lightloop db stop`)."""
    settings = _settings(ctx)
    if settings.database_url:
        raise click.UsageError("LIGHTLOOP_DATABASE_URL is set: there is no embedded Postgres to start")
    click.echo(_database_url(settings))


@db.command("stop")
@click.pass_context
def db_stop(ctx: click.Context) -> None:
    """Stop the embedded Postgres."""
    from lightloop.store.embedded import EmbeddedPostgres

    stopped = EmbeddedPostgres(_settings(ctx).pgdata).stop()
    click.echo("embedded Postgres stopped" if stopped else "embedded Postgres was not running")


@db.command("status")
@click.pass_context
def db_status(ctx: click.Context) -> None:
    """Say whether the embedded Postgres runs, and where; exit 3 when it does not."""
    from lightloop.store.embedded import EmbeddedPostgres

    info = EmbeddedPostgres(_settings(ctx).pgdata).status()
    if info is None:
        click.echo("embedded Postgres is not running")
        ctx.exit(3)
    click.echo(f"embedded Postgres running: pid {info.pid}, 127.0.0.1:{info.port}")


# -- sql -----------------------------------------------------------------------------------------


@cli.command("sql")
@click.argument("query")
@click.option("--json", "as_json", is_flag=True, help="Print rows as a JSON array of objects.")
@click.pass_context
def sql(ctx: click.Context, query: str, as_json: bool) -> None:
    """Run QUERY (use - to read it from standard input) and print the rows."""
    from lightloop.store.query import run_sql

    if query == "-":
        query = sys.stdin.read()
    result = _run(run_sql(_database_url(_settings(ctx)), query))
    if as_json:
        click.echo(json.dumps(result.records(), default=_json_default, indent=None))
        return
    if not result.columns:
        click.echo(result.status)
        return
    click.echo(
        tabulate(
            [[_cell(v) for v in row] for row in result.rows],
            headers=result.columns,
            tablefmt="psql",
            disable_numparse=True,
        )
    )
    count = len(result.rows)
    click.echo(f"({count} row{'' if count == 1 else 's'})")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime | date):
        return value.isoformat(sep=" ") if isinstance(value, datetime) else value.isoformat()
    if isinstance(value, list | tuple):
        return "{" + ",".join(_cell(v) for v in value) + "}"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


# -- engine --------------------------------------------------------------------------------------


@cli.command("engine")
@click.option(
    "--model",
    default=None,
    help="smollm2 (default), tiny, or a Hugging Face model folder. [env var: LIGHTLOOP_ENGINE__MODEL]",
)
@click.option("--host", default=None, help="[env var: LIGHTLOOP_ENGINE__HOST]")
@click.option("--port", type=int, default=None, help="[env var: LIGHTLOOP_ENGINE__PORT]")
@click.option("--served-model-name", default=None, help="[env var: LIGHTLOOP_ENGINE__SERVED_MODEL_NAME]")
@click.option("--max-model-len", type=int, default=None, help="[env var: LIGHTLOOP_ENGINE__MAX_MODEL_LEN]")
@click.option("--max-batch-size", type=int, default=None, help="[env var: LIGHTLOOP_ENGINE__MAX_BATCH_SIZE]")
@click.option(
    "--api-key",
    default=None,
    help="Key every /v1 route requires (vLLM's). [env var: LIGHTLOOP_ENGINE__API_KEY]",
)
@click.option(
    "--lora-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Load adapters only from under this folder. [env var: LIGHTLOOP_ENGINE__LORA_ROOT]",
)
@click.option(
    "--allow-runtime-lora-updating",
    is_flag=True,
    default=None,
    help="Serve load/unload_lora_adapter. [env var: LIGHTLOOP_ENGINE__ALLOW_RUNTIME_LORA_UPDATING]",
)
@click.pass_context
def engine(ctx: click.Context, /, **flags: Any) -> None:
    """Serve a model on CPU with the vLLM API subset lightloop uses (chat, completions,
    token ids, logprobs, runtime LoRA)."""
    from lightloop.engine.server import serve

    settings = _settings(ctx)
    settings = _override(settings, "engine", flags)
    serve(settings)


def _override(settings: Settings, section: str, flags: dict[str, Any]) -> Settings:
    """`settings` with the flags given (not None) in `section`, validated as the settings are:
    `--port 70000` is refused like LIGHTLOOP_PROXY__PORT=70000 would be."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return settings
    current = getattr(settings, section)
    try:
        updated = type(current).model_validate({**dict(current), **given})
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors()
        )
        raise click.UsageError(problems) from None
    return settings.model_copy(update={section: updated})


# -- proxy ---------------------------------------------------------------------------------------


@cli.command("proxy")
@click.option("--host", default=None, help="[env var: LIGHTLOOP_PROXY__HOST]")
@click.option("--port", type=int, default=None, help="[env var: LIGHTLOOP_PROXY__PORT]")
@click.option("--workers", type=int, default=None, help="Processes. [env var: LIGHTLOOP_PROXY__WORKERS]")
@click.option(
    "--ssl-certfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Serve HTTPS with this PEM certificate. [env var: LIGHTLOOP_PROXY__SSL_CERTFILE]",
)
@click.option(
    "--ssl-keyfile",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The certificate's PEM private key. [env var: LIGHTLOOP_PROXY__SSL_KEYFILE]",
)
@click.pass_context
def proxy(ctx: click.Context, /, **flags: Any) -> None:
    """Serve the OpenAI-compatible proxy (LiteLLM's proxy app with lightloop's policy lane),
    recording every call into Postgres. Point agents' OPENAI_BASE_URL at http://HOST:PORT/v1
    (https:// with --ssl-certfile and --ssl-keyfile)."""
    from lightloop.proxy.server import serve

    settings = _settings(ctx)
    settings = _override(settings, "proxy", flags)
    for tls_file in (settings.proxy.ssl_certfile, settings.proxy.ssl_keyfile):
        if tls_file is not None and not tls_file.is_file():
            raise click.UsageError(f"{tls_file} is not a file")
    url = _database_url(settings)
    _migrate_if_reachable(url)
    serve(settings, url)


def _migrate_if_reachable(url: str) -> None:
    """Bring the schema to head; a database that is down now is not fatal to a proxy (it spools)."""
    from lightloop.store.errors import DatabaseUnavailable
    from lightloop.store.migrate import upgrade

    try:
        _run(upgrade(url))
    except DatabaseUnavailable as exc:
        log.warning("%s; serving anyway, calls are spooled until it is back", exc)


# -- trainer -------------------------------------------------------------------------------------


@cli.command("trainer")
@click.option("--max-steps", type=int, default=None, help="Stop after this many recorded steps.")
@click.option(
    "--check",
    is_flag=True,
    help="Health check: exit 0 if a trainer under this LIGHTLOOP_HOME beat recently, 1 if not.",
)
@click.option("--max-age", type=float, default=60.0, show_default=True, help="Seconds --check accepts.")
@click.pass_context
def trainer(ctx: click.Context, max_steps: int | None, check: bool, max_age: float) -> None:
    """Train the policy on finished, rewarded rollouts and publish each step as a new version
    (LoRA, hot-swapped into every engine). Runs until Ctrl-C."""
    settings = _settings(ctx)
    if check:
        # Kept free of the trainer's imports (torch): health checks run it every few seconds.
        _check_heartbeat(settings.trainer_heartbeat, max_age)
        return
    _require_training()
    from lightloop.trainer.daemon import serve

    url = _database_url(settings)
    _migrate_if_reachable(url)
    serve(settings, url, max_steps)


def _require_training() -> None:
    """Training needs the `train` extra, which the proxy and engine image (`lightloop:serve`) and
    a plain `pip install lightloop` leave out: one clear line instead of an ImportError at the
    first step."""
    missing = [m for m in ("verl", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise LightloopError(
            f"training needs the 'train' extra ({', '.join(missing)} not installed): "
            "pip install 'lightloop[train]', or use the lightloop:cpu image"
        )


def _check_heartbeat(path: Path, max_age_s: float) -> None:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        raise LightloopError(f"no trainer heartbeat at {path}") from None
    if age > max_age_s:
        raise LightloopError(f"the trainer's last heartbeat is {age:.0f} s old (limit {max_age_s:.0f} s)")


@cli.command("vllm-args")
@click.option("--policy", default=None, help="The policy model vLLM serves (default: the trainer's).")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write them to this file (atomically) instead of standard output.",
)
@click.pass_context
def vllm_args_command(ctx: click.Context, policy: str | None, output: Path | None) -> None:
    """Print the `vllm serve` flags this configuration needs (LoRA slots for the policy's adapter
    and its agents' adapters, kept versions included; the LoRA rank; processed logprobs), on
    one line. Compose and Kubernetes start vLLM with them."""
    from lightloop.vllm_flags import vllm_args

    line = " ".join(vllm_args(_settings(ctx), policy))
    if output is None:
        click.echo(line)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(line + "\n")
    partial.replace(output)  # vLLM never reads half a file


# -- up ------------------------------------------------------------------------------------------


@cli.command("up", epilog=_settings_epilog())
@click.option(
    "--engine/--no-engine", default=True, help="Start the CPU engine (off when vLLM serves the policy)."
)
@click.option("--trainer/--no-trainer", "with_trainer", default=True, help="Start the trainer.")
@click.pass_context
def up(ctx: click.Context, engine: bool, with_trainer: bool) -> None:
    """Start everything on this machine and stay in the foreground until Ctrl-C: the embedded
    Postgres (unless LIGHTLOOP_DATABASE_URL is set), migrated to the newest schema; the CPU
    engine (smollm2 by default); the proxy; and the trainer. Prints the base URL and key to give
    agents. Stopping stops what this command started."""
    from lightloop.stack import running_stack

    settings = _settings(ctx)
    if with_trainer:
        _require_training()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with running_stack(settings, engine=engine, trainer=with_trainer) as stack:
        click.echo(f"lightloop is up (schema {stack.revision})")
        click.echo(f"  OPENAI_BASE_URL={stack.base_url}/v1")
        click.echo(f"  OPENAI_API_KEY={_key_shown(settings, stack.key, stack.key_created)}")
        click.echo(
            f"  models:    {', '.join(p.name for p in settings.policy)} (trainable), and LiteLLM's model_list"
        )
        if with_trainer:
            click.echo(f"  trainer:   {settings.trainer.algorithm}; see training_steps and policy_versions")
        click.echo(f"  database:  {_without_password(stack.database_url)}   (in full: lightloop db url)")
        click.echo(
            '  query it:  lightloop sql "SELECT * FROM llm_calls LIMIT 5"   (or psql "$(lightloop db url)")'
        )
        click.echo("Press Ctrl-C to stop.", nl=True)
        sys.stdout.flush()
        while not stop.wait(1.0):
            stack.check_children()


def _key_shown(settings: Settings, key: str, created: bool) -> str:
    """The key, printed once: when it was just made. Later starts print how to read it, so
    that it does not land in every terminal log and CI output."""
    kept = settings.home / "master.key"
    if created:
        return f"{key}   (new; kept in {kept}, printed only now)"
    if settings.master_key is not None and settings.master_key.get_secret_value():
        if os.environ.get("LITELLM_MASTER_KEY"):
            return "$LITELLM_MASTER_KEY"
        return "(the master_key of lightloop.yaml)"
    return f"$(cat {kept})"


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# -- tasks -----------------------------------------------------------------------------------------


@cli.group()
def tasks() -> None:
    """Datasets of tasks for `lightloop run`: load them, see their progress."""


@tasks.command("load")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--dataset", required=True, help="Dataset name (letters, digits and . _ : @ -).")
@click.option("--split", type=click.Choice(["train", "val"]), default="train", show_default=True)
@click.option(
    "--group-size",
    type=click.IntRange(1, 10_000),
    default=4,
    show_default=True,
    help="Rollouts per train task (one GRPO group).",
)
@click.option(
    "--epochs",
    type=click.IntRange(0),
    default=None,
    help="Passes over the train split (0: until stopped). [default: 1]",
)
@click.option("--seed", type=int, default=None, help="Seed of the train split's shuffle. [default: 0]")
@click.option(
    "--policy", default=None, help="Policy model the dataset trains (default: the first under policy)."
)
@click.pass_context
def tasks_load(
    ctx: click.Context,
    file: Path,
    dataset: str,
    split: str,
    group_size: int,
    epochs: int | None,
    seed: int | None,
    policy: str | None,
) -> None:
    """Load FILE (JSONL, CSV or Parquet; one task per row, a JSON object) into DATASET. A task's
    `id` field is its id, else a hash of its content: loading the same file twice adds nothing.
    One transaction: a malformed row loads nothing."""
    from lightloop.ids import ID_RULE, is_valid_id
    from lightloop.store.database import connect
    from lightloop.store.tasks import load_tasks
    from lightloop.taskfiles import read_tasks

    settings = _settings(ctx)
    if not is_valid_id(dataset):
        raise click.BadParameter(
            f"{dataset[:80]!r} is not a valid name: use {ID_RULE}", param_hint="--dataset"
        )
    names = [p.name for p in settings.policy]
    policy = policy or names[0]
    if policy not in names:
        raise click.BadParameter(
            f"{policy!r} is not a policy model ({', '.join(names)})", param_hint="--policy"
        )
    rows = read_tasks(file)
    url = _database_url(settings)
    _migrate_if_reachable(url)

    async def load() -> Any:
        conn = await connect(url)
        try:
            return await load_tasks(
                conn, dataset, split, rows, group_size=group_size, policy=policy, seed=seed, epochs=epochs
            )
        finally:
            await conn.close()

    result = _run(load())
    click.echo(
        f"{dataset}/{split}: {result.added} tasks added, {result.already_there} already there "
        f"(group size {group_size if split == 'train' else 1})"
    )


@tasks.command("stop")
@click.argument("dataset")
@click.pass_context
def tasks_stop(ctx: click.Context, dataset: str) -> None:
    """Stop training on DATASET: no new train groups are started and the ones no runner has
    started are discarded; started groups and val rounds finish, so runners drain and exit.
    Loading tasks into it again resumes it."""
    from lightloop.store.database import connect
    from lightloop.store.tasks import stop_dataset

    url = _database_url(_settings(ctx))

    async def stop() -> int:
        conn = await connect(url)
        try:
            return await stop_dataset(conn, dataset)
        finally:
            await conn.close()

    discarded = _run(stop())  # an unknown dataset: NotFound, one line and exit 1 (main)
    click.echo(f"{dataset}: stopped; {discarded} queued rollouts that no runner had started were discarded")


@tasks.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def tasks_list(ctx: click.Context, as_json: bool) -> None:
    """Every dataset and split with its tasks and the queue's progress (rollouts queued,
    running, done, failed)."""
    from lightloop.store.database import connect
    from lightloop.store.tasks import dataset_progress

    url = _database_url(_settings(ctx))

    async def read() -> Any:
        conn = await connect(url)
        try:
            return await dataset_progress(conn)
        finally:
            await conn.close()

    splits = [s for d in _run(read()) for s in d.splits.values()]
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in splits]))
        return
    if not splits:
        click.echo("no datasets yet: load one with `lightloop tasks load FILE --dataset NAME`")
        return
    headers = [
        "dataset",
        "split",
        "policy",
        "tasks",
        "group",
        "epochs",
        "queued",
        "running",
        "done",
        "failed",
        "planned",
    ]
    table = [
        [
            s.dataset,
            s.split,
            s.policy,
            s.tasks,
            s.group_size,
            s.epochs or "until stopped",
            s.queued,
            s.running,
            s.done,
            s.failed,
            "" if s.planned is None else s.planned,
        ]
        for s in splits
    ]
    click.echo(tabulate(table, headers=headers, tablefmt="psql", disable_numparse=True))


# -- run -------------------------------------------------------------------------------------------


@cli.command("run")
@click.argument("agent")
@click.option("--dataset", required=True, help="The dataset to take tasks from.")
@click.option(
    "--split",
    type=click.Choice(["train", "val"]),
    default=None,
    help="Only this split (default: val rounds first, then train).",
)
@click.option(
    "--concurrency", type=click.IntRange(1, 10_000), default=8, show_default=True, help="Rollouts at once."
)
@click.option(
    "--proxy",
    "proxy_url",
    default=None,
    metavar="URL",
    help="The proxy (default: the configured proxy address).",
)
@click.option(
    "--key",
    default=None,
    help="The proxy's key (default: LITELLM_MASTER_KEY or the key `lightloop up` keeps).",
)
@click.option(
    "--max-tasks", type=click.IntRange(1), default=None, help="Stop after taking this many rollouts."
)
@click.option("--model", default=None, help="Model the agent asks for (default: the dataset's policy model).")
@click.option("--quiet", is_flag=True, help="Log lines instead of a progress bar.")
@click.option(
    "--retry-s", type=float, default=30.0, show_default=True, help="How long an unreachable proxy is retried."
)
@click.option(
    "--prompt-run",
    default=None,
    metavar="RUN",
    help="Help a prompt optimisation run (`lightloop optimize-prompt`): take only its evaluations.",
)
@click.pass_context
def run_agent(
    ctx: click.Context,
    agent: str,
    dataset: str,
    split: str | None,
    concurrency: int,
    proxy_url: str | None,
    key: str | None,
    max_tasks: int | None,
    model: str | None,
    quiet: bool,
    retry_s: float,
    prompt_run: str | None,
) -> None:
    """Run AGENT (path/to/file.py:function or package.module:function, a sync or async
    `(task: dict, llm: lightloop.LLM) -> float | None`) over the tasks of a dataset, taken from
    the proxy's queue; any number of runners share it. Returning a float finishes the rollout
    with that reward, `(reward, feedback)` adds feedback text; None means the agent posted its
    own. Ctrl-C stops taking tasks and lets
    running ones finish; a second Ctrl-C abandons them (exit 130)."""
    from lightloop.runner import Runner, run_cli

    function, proxy_url, key = _agent_and_proxy(ctx, agent, proxy_url, key)
    runner = Runner(
        function,
        proxy_url,
        key,
        dataset,
        split,
        concurrency,
        max_tasks,
        model,
        retry_s,
        prompt_run=prompt_run,
    )
    code = _run(run_cli(runner, quiet=quiet))
    if code:
        ctx.exit(code)


def _agent_and_proxy(
    ctx: click.Context, agent: str, proxy_url: str | None, key: str | None
) -> tuple[Any, str, str]:
    """What a command that runs an agent needs (`run`, `optimize-prompt`): the agent function
    (one that cannot be loaded: one line, exit 2), the proxy and its key (by default the
    configured address, and LITELLM_MASTER_KEY or the key `lightloop up` keeps)."""
    from lightloop.agents import AgentLoadError, load_agent
    from lightloop.runner import default_key

    settings = _settings(ctx)
    if settings.log_level != "debug":
        # One line per HTTP request (the agent's and the runner's own) would drown the progress.
        for noisy in ("httpx", "openai", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # stamina logs each scheduled retry at WARNING; the runner says once if it gives up.
        logging.getLogger("stamina").setLevel(logging.ERROR)
    try:
        function = load_agent(agent)
    except AgentLoadError as exc:
        click.echo(f"lightloop: error: {exc}", err=True)
        ctx.exit(2)
    master = settings.master_key.get_secret_value() if settings.master_key else None
    return (
        function,
        proxy_url or f"http://{settings.proxy.host}:{settings.proxy.port}",
        key or default_key(settings.home, master),
    )


# -- demo ----------------------------------------------------------------------------------------


@cli.command("demo")
@click.option(
    "--model", default=None, help="smollm2 (default) or tiny (a wiring check; it does not learn the task)."
)
@click.option("--steps", type=int, default=40, show_default=True, help="Training steps at most.")
@click.option(
    "--minutes", type=float, default=15.0, show_default=True, help="Stop starting new steps after this."
)
@click.option("--groups", type=int, default=8, show_default=True, help="Tasks per step.")
@click.option("--tries", type=int, default=4, show_default=True, help="Attempts per task (one GRPO group).")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the task choice and order and of the LoRA start.",
)
@click.option(
    "--task",
    "task_kind",
    type=click.Choice(["opposite-choice", "opposites", "sums"]),
    default=None,
    help="opposite-choice (the default): the opposite of a word, chosen from three; opposites: "
    "the opposite recalled (plateaus near 0.72, README); sums: the number only (stalls, README). "
    "With --model tiny the default is sums: a random model never says a right word, and only the "
    "lengths of its wrong numbers differ, which keeps its groups from going flat.",
)
@click.option(
    "--learning-rate", type=float, default=1e-3, show_default=True, help="The trainer's LoRA learning rate."
)
@click.option(
    "--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="PNG to write."
)
@click.pass_context
def demo(
    ctx: click.Context,
    model: str | None,
    steps: int,
    minutes: float,
    groups: int,
    tries: int,
    seed: int,
    task_kind: str | None,
    learning_rate: float,
    plot_path: Path | None,
) -> None:
    """The whole loop on CPU, on the task queue: a task set is loaded as a dataset, the runner hands
    them to an example `openai` SDK agent (reward 1 for the exact answer), the trainer learns
    from the groups, the held-out split runs against every new version, and the curve is read
    back from `reward_by_version` and plotted. Uses a running stack when the proxy answers, else
    starts one."""
    import contextlib

    import httpx

    from lightloop.demo import CURVE_SQL, Demo, plot
    from lightloop.proxy.server import master_key
    from lightloop.stack import running_stack

    _require_training()
    settings = _settings(ctx)
    # SIGTERM must unwind like Ctrl-C, so that the stack this command started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model = model or settings.engine.model
    task_kind = task_kind or ("sums" if model == "tiny" else "opposite-choice")
    base = f"http://{settings.proxy.host}:{settings.proxy.port}"
    key, _ = master_key(settings)
    with contextlib.ExitStack() as stack_ctx:
        try:
            running = (
                httpx.get(base + "/health", headers={"authorization": f"Bearer {key}"}, timeout=2).status_code
                == 200
            )
        except httpx.HTTPError:
            running = False
        if running:
            click.echo(f"using the lightloop already running at {base}")
            url = _database_url(settings)
        else:
            click.echo(f"starting lightloop ({model}); the first start of smollm2 converts its weights once")
            env = {
                "LIGHTLOOP_ENGINE__MODEL": model,
                "LIGHTLOOP_TRAINER__MODEL": model,
                "LIGHTLOOP_TRAINER__GROUPS_PER_STEP": str(groups),
                "LIGHTLOOP_TRAINER__MIN_GROUPS": str(groups),
                "LIGHTLOOP_TRAINER__POLL_INTERVAL_S": "0.5",
                "LIGHTLOOP_TRAINER__LEARNING_RATE": str(learning_rate),
                "LIGHTLOOP_TRAINER__SEED": str(seed),
                # A held-out round is served the version it measures while the engines keep it;
                # steps here are shorter than a round, so keep a few.
                "LIGHTLOOP_TRAINER__KEEP_VERSIONS": "4",
            }
            stack = stack_ctx.enter_context(running_stack(settings, extra_env=env))
            base, key, url = stack.base_url, stack.key, stack.database_url
        demo_run = Demo(
            base,
            key,
            url,
            policy=settings.policy[0].name,
            groups=groups,
            tries=tries,
            seed=seed,
            task=task_kind,
            log=lambda line: click.echo(line),
        )
        curve = _run(demo_run.run(steps, minutes))
    click.echo(f"reward per version on {demo_run.dataset}, from SQL:")
    click.echo(CURVE_SQL.strip())
    for row in curve:
        if not row["val_rollouts"]:
            continue
        train = "" if row["train_reward"] is None else f"   training tries {float(row['train_reward']):.3f}"
        click.echo(f"  v{row['policy_version']}: {float(row['val_reward']):.3f} held-out{train}")
    held = [(r["policy_version"], float(r["val_reward"])) for r in curve if r["val_rollouts"]]
    if held:
        best = max(held, key=lambda p: p[1])
        click.echo(
            f"baseline v{held[0][0]}: {held[0][1]:.3f} held-out; final v{held[-1][0]}: {held[-1][1]:.3f}; "
            f"best v{best[0]}: {best[1]:.3f}"
        )
    path = plot_path or settings.home / "demo.png"
    plot(
        curve, path, f"lightloop demo: {model}, {task_kind}, seed {seed}, {groups}x{tries} rollouts per step"
    )
    click.echo(f"plot: {path}")


cli.add_command(keys)
cli.add_command(prompts)
cli.add_command(optimize_prompt)


def main() -> NoReturn:
    """Entry point: lightloop errors become one line on stderr and exit status 1."""
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of exiting.
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except LightloopError as exc:
        click.echo(f"lightloop: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
