"""The tables of DESIGN.md as SQLAlchemy 2 models. Alembic migrations are the only way the
schema changes; `tests/integration/test_migrations.py` fails when these drift from them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    REAL,
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations can refer to them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TZ = DateTime(timezone=True)
NOW = func.now()


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, datetime: TZ}  # noqa: RUF012 - read by SQLAlchemy


class Rollout(Base):
    """One episode of an agent: the unit that gets a reward and is claimed for training."""

    __tablename__ = "rollouts"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    group_id: Mapped[str | None] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(Text)
    agent: Mapped[str | None] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(Text, default="train", server_default="train")
    status: Mapped[str] = mapped_column(Text, default="running", server_default="running")
    reward: Mapped[float | None] = mapped_column(Double)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = mapped_column(TZ, default=_now, server_default=NOW)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    consumed_by_step: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("training_steps.step"))
    # A claim is a lease: it lapses by itself at claim_expires_at (see store/claims.py).
    claimed_by: Mapped[str | None] = mapped_column(Text)
    claim_expires_at: Mapped[datetime | None] = mapped_column(TZ)
    # The group's declared size (the queue's group_size, or X-Lightloop-Group-Size): the trainer
    # claims the group only when that many of its rollouts are finished.
    group_size: Mapped[int | None] = mapped_column(Integer)
    # Queue rollouts only (store/queue.py): the dataset they came from, the current attempt
    # (rollout_attempts holds every attempt) and the version live when they were handed out.
    dataset: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int | None] = mapped_column(Integer)
    policy_version: Mapped[int | None] = mapped_column(Integer)
    # A prompt optimisation run's evaluation (store/prompt_runs.py): the candidate it is pinned
    # to. Such rollouts are handed out only to that run's runners and never trained on.
    prompt_run: Mapped[str | None] = mapped_column(Text)
    prompt_name: Mapped[str | None] = mapped_column(Text)
    prompt_version: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        CheckConstraint("mode IN ('train', 'val')", name="mode"),
        # queued: made by the task queue, not yet handed to a runner.
        CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed')", name="status"),
        CheckConstraint("group_size IS NULL OR group_size >= 1", name="group_size"),
        # The queue hands out the oldest queued rollout of a dataset, val first.
        Index(
            "ix_rollouts_queued",
            "dataset",
            "mode",
            "created_at",
            postgresql_where=text("status = 'queued'"),
        ),
        Index("ix_rollouts_dataset", "dataset"),
        # The claim query scans unconsumed rollouts by group; consumed ones are most of the table.
        Index(
            "ix_rollouts_unconsumed_group",
            text("coalesce(group_id, id)"),
            # An optimisation run's evaluations are never consumed: kept out, or they would stay
            # in this index (and every claim's scan) for good.
            postgresql_where=text("consumed_by_step IS NULL AND prompt_run IS NULL"),
        ),
        Index("ix_rollouts_created_at", "created_at"),
        Index(
            "uq_rollouts_prompt_evaluation",
            "prompt_run",
            "prompt_version",
            "mode",
            "task_id",
            unique=True,
            postgresql_where=text("prompt_run IS NOT NULL"),
        ),
    )


class Dataset(Base):
    """A named set of tasks (`lightloop tasks load`) and how the queue schedules it."""

    __tablename__ = "datasets"
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    # The policy model its rollouts are served by (val rounds follow its live version).
    policy: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger, server_default="0")
    epochs: Mapped[int] = mapped_column(Integer, server_default="1")  # 0: until stopped
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    # Set by `lightloop tasks stop`: no new train groups; the started ones finish.
    stopped_at: Mapped[datetime | None] = mapped_column(TZ, nullable=True)

    __table_args__ = (CheckConstraint("epochs >= 0", name="epochs"),)


class Task(Base):
    """One row of a dataset: the input an agent function gets."""

    __tablename__ = "tasks"
    dataset: Mapped[str] = mapped_column(Text, ForeignKey("datasets.name"), primary_key=True)
    split: Mapped[str] = mapped_column(Text, primary_key=True)
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    input: Mapped[dict[str, Any]] = mapped_column(JSONB)
    group_size: Mapped[int] = mapped_column(Integer, server_default="1")
    # Train tasks: how many times a group was made of it (one per epoch).
    epochs_started: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)

    __table_args__ = (
        CheckConstraint("split IN ('train', 'val')", name="split"),
        CheckConstraint("group_size >= 1", name="group_size"),
        # The queue starts the next group from the train tasks with the fewest epochs started.
        Index("ix_tasks_next", "dataset", "split", "epochs_started"),
    )


class RolloutAttempt(Base):
    """One try of a queue rollout by a runner, with its lease. A lapsed lease supersedes it."""

    __tablename__ = "rollout_attempts"
    rollout_id: Mapped[str] = mapped_column(Text, ForeignKey("rollouts.id"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="running")
    started_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    heartbeat_at: Mapped[datetime | None] = mapped_column(TZ)
    lease_expires_at: Mapped[datetime] = mapped_column(TZ)
    ended_at: Mapped[datetime | None] = mapped_column(TZ)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(
            "status IN ('running', 'succeeded', 'failed', 'superseded')",
            name="status",
        ),
        # The reaper scans running attempts by lease.
        Index(
            "ix_rollout_attempts_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'running'"),
        ),
    )


class ValRound(Base):
    """A dataset's val split run against one live policy version: made once per version."""

    __tablename__ = "val_rounds"
    dataset: Mapped[str] = mapped_column(Text, ForeignKey("datasets.name"), primary_key=True)
    policy: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)


class Span(Base):
    """An OpenTelemetry span: the proxy's LLM spans and spans agents send by OTLP."""

    __tablename__ = "spans"
    span_id: Mapped[str] = mapped_column(Text, primary_key=True)
    trace_id: Mapped[str] = mapped_column(Text)
    parent_span_id: Mapped[str | None] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    kind: Mapped[str | None] = mapped_column(Text)
    start_time: Mapped[datetime] = mapped_column(TZ)
    end_time: Mapped[datetime | None] = mapped_column(TZ)
    status_code: Mapped[str | None] = mapped_column(Text)
    status_message: Mapped[str | None] = mapped_column(Text)
    # Original attribute keys, flat (`gen_ai.request.model`), as the OTel GenAI conventions name them.
    attributes: Mapped[dict[str, Any]] = mapped_column(
        JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    events: Mapped[list[Any] | None] = mapped_column(JSONB)
    resource: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    scope: Mapped[str | None] = mapped_column(Text)
    # Promoted from attributes for SQL users; no foreign key: agents may name rollouts by OTLP
    # before (or without) the proxy having seen them.
    rollout_id: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_spans_trace_id", "trace_id"),
        Index("ix_spans_rollout_id", "rollout_id"),
        Index("ix_spans_start_time", "start_time"),
    )


class LlmCall(Base):
    """One completion choice of one LLM span, with the engine's token ids and logprobs.

    A call with `n > 1` yields one row per choice (choice_index 0..n-1) under the same span, so
    every row is one training sample candidate and the arrays stay one-dimensional."""

    __tablename__ = "llm_calls"
    span_id: Mapped[str] = mapped_column(Text, primary_key=True)
    choice_index: Mapped[int] = mapped_column(Integer, primary_key=True, default=0, server_default="0")
    rollout_id: Mapped[str] = mapped_column(Text, ForeignKey("rollouts.id"))
    seq: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(Text)
    agent: Mapped[str | None] = mapped_column(Text)
    policy_version: Mapped[int | None] = mapped_column(Integer)
    request: Mapped[dict[str, Any]] = mapped_column(JSONB)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    prompt_token_ids: Mapped[list[int] | None] = mapped_column(ARRAY(Integer))
    completion_token_ids: Mapped[list[int] | None] = mapped_column(ARRAY(Integer))
    completion_logprobs: Mapped[list[float] | None] = mapped_column(ARRAY(REAL))
    finish_reason: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Double)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # When the call started at the proxy; with seq, the order of a rollout's calls.
    created_at: Mapped[datetime] = mapped_column(TZ, default=_now, server_default=NOW)
    response_id: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int | None] = mapped_column(Integer)
    upstream: Mapped[str | None] = mapped_column(Text)
    # The registered prompt the proxy swapped into this call, and its version (proxy/prompts.py).
    prompt_name: Mapped[str | None] = mapped_column(Text)
    prompt_version: Mapped[int | None] = mapped_column(Integer)
    # The adapter that served the call, by its policy key (`policy`, or `policy-planner` for an
    # agent with an adapter of its own); `policy_version` is that adapter's version.
    adapter: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_llm_calls_rollout_id_seq", "rollout_id", "seq"),
        Index("ix_llm_calls_response_id", "response_id"),
    )


class Reward(Base):
    __tablename__ = "rewards"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    rollout_id: Mapped[str] = mapped_column(Text, ForeignKey("rollouts.id"))
    span_id: Mapped[str | None] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text, server_default="reward")
    value: Mapped[float] = mapped_column(Double)
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)

    __table_args__ = (
        CheckConstraint("value = value AND abs(value) < 'Infinity'::float8", name="finite"),
        Index("ix_rewards_rollout_id", "rollout_id"),
    )


class PolicyVersion(Base):
    """A trained version of a policy model. At most one version per policy is live."""

    __tablename__ = "policy_versions"
    policy: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    base_model: Mapped[str] = mapped_column(Text)
    uri: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="staged")
    reason: Mapped[str | None] = mapped_column(Text)
    training_step: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("training_steps.step"))
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    live_at: Mapped[datetime | None] = mapped_column(TZ)

    __table_args__ = (
        CheckConstraint("status IN ('staged', 'live', 'retired', 'failed')", name="status"),
        Index(
            "uq_policy_versions_one_live",
            "policy",
            unique=True,
            postgresql_where=text("status = 'live'"),
        ),
    )


_sql = text


class Prompt(Base):
    """A registered prompt: calls (of its agent or model; any call when neither is set) whose
    message text equals its baseline (version 0) get the version chosen for their rollout."""

    __tablename__ = "prompts"
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    agent: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)


class PromptVersion(Base):
    """One text of a prompt. At most one version per prompt is live."""

    __tablename__ = "prompt_versions"
    name: Mapped[str] = mapped_column(Text, ForeignKey("prompts.name"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    parent: Mapped[int | None] = mapped_column(Integer)
    origin: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="staged")
    # The mean val reward, where it was measured ("dataset/split"), and per val task.
    score: Mapped[float | None] = mapped_column(Double)
    scored_on: Mapped[str | None] = mapped_column(Text)
    scores: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    run_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    live_at: Mapped[datetime | None] = mapped_column(TZ)

    __table_args__ = (
        CheckConstraint("origin IN ('baseline', 'manual', 'optimiser')", name="origin"),
        CheckConstraint("status IN ('staged', 'live', 'retired')", name="status"),
        # `text` is a column of this class here, hence the module's alias for SQL text.
        Index("uq_prompt_versions_one_live", "name", unique=True, postgresql_where=_sql("status = 'live'")),
    )


class PromptRun(Base):
    """A prompt optimisation run (`lightloop optimize-prompt`): its settings, GEPA's state as of
    its last iteration (to resume from), and how it ended."""

    __tablename__ = "prompt_runs"
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text, ForeignKey("prompts.name"))
    dataset: Mapped[str] = mapped_column(Text)
    train_split: Mapped[str] = mapped_column(Text)
    val_split: Mapped[str] = mapped_column(Text)
    agent: Mapped[str] = mapped_column(Text)
    reflection_model: Mapped[str] = mapped_column(Text)
    budget: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer, server_default="0")
    # What the run started from and measures with, so that a resume goes on with the same: the
    # prompt version it started from, the policy version its evaluations are served, the tasks.
    start_version: Mapped[int] = mapped_column(Integer)
    policy_version: Mapped[int] = mapped_column(Integer)
    train_tasks: Mapped[list[str]] = mapped_column(ARRAY(Text))
    val_tasks: Mapped[list[str]] = mapped_column(ARRAY(Text))
    status: Mapped[str] = mapped_column(Text, server_default="running")
    metric_calls: Mapped[int] = mapped_column(Integer, server_default="0")
    proposals_failed: Mapped[int] = mapped_column(Integer, server_default="0")
    best_version: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)

    __table_args__ = (CheckConstraint("status IN ('running', 'finished', 'failed')", name="status"),)


class TrainingStep(Base):
    __tablename__ = "training_steps"
    step: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    policy: Mapped[str | None] = mapped_column(Text)
    policy_in: Mapped[int | None] = mapped_column(Integer)
    policy_out: Mapped[int | None] = mapped_column(Integer)
    trainer: Mapped[str | None] = mapped_column(Text)
    n_rollouts: Mapped[int | None] = mapped_column(Integer)
    n_tokens: Mapped[int | None] = mapped_column(BigInteger)
    loss: Mapped[float | None] = mapped_column(Double)
    reward_mean: Mapped[float | None] = mapped_column(Double)
    reward_std: Mapped[float | None] = mapped_column(Double)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    started_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)


class WriterMark(Base):
    """A batch writer's promise (store/marks.py): every row it accepted before `durable_through`
    is in Postgres. Claims and lookups of rows another process may still hold read it."""

    __tablename__ = "writer_marks"
    writer_id: Mapped[str] = mapped_column(Text, primary_key=True)
    host: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    # Database time (clock_timestamp()), never the writer's own clock: finishes are stamped with
    # the same clock, so the comparison holds across hosts whose clocks disagree.
    durable_through: Mapped[datetime | None] = mapped_column(TZ)
    seen_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    # A writer not seen for this long is gone (killed): it no longer holds anything back.
    stale_after_s: Mapped[float] = mapped_column(Double)


class ApiKey(Base):
    """A scoped key (store/keys.py): agents call models and report; admins also read what every
    agent sent. Only the SHA-256 of the key is kept: keys are 256 random bits, so a fast hash
    is as safe as a slow one and costs nothing per request."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    scope: Mapped[str] = mapped_column(Text)
    key_hash: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[datetime] = mapped_column(TZ, server_default=NOW)
    last_used_at: Mapped[datetime | None] = mapped_column(TZ)
    revoked_at: Mapped[datetime | None] = mapped_column(TZ)
    __table_args__ = (CheckConstraint("scope IN ('agent', 'admin')", name="scope"),)


metadata = Base.metadata
