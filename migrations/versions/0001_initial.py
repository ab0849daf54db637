"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "spans",
        sa.Column("span_id", sa.Text(), nullable=False),
        sa.Column("trace_id", sa.Text(), nullable=False),
        sa.Column("parent_span_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=True),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status_code", sa.Text(), nullable=True),
        sa.Column("status_message", sa.Text(), nullable=True),
        sa.Column(
            "attributes",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("events", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("resource", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column("rollout_id", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=True),
        sa.Column("output_tokens", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("span_id", name=op.f("pk_spans")),
    )
    op.create_index("ix_spans_rollout_id", "spans", ["rollout_id"], unique=False)
    op.create_index("ix_spans_start_time", "spans", ["start_time"], unique=False)
    op.create_index("ix_spans_trace_id", "spans", ["trace_id"], unique=False)
    op.create_table(
        "training_steps",
        sa.Column("step", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("policy", sa.Text(), nullable=True),
        sa.Column("policy_in", sa.Integer(), nullable=True),
        sa.Column("policy_out", sa.Integer(), nullable=True),
        sa.Column("trainer", sa.Text(), nullable=True),
        sa.Column("n_rollouts", sa.Integer(), nullable=True),
        sa.Column("n_tokens", sa.BigInteger(), nullable=True),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.Column("reward_mean", sa.Double(), nullable=True),
        sa.Column("reward_std", sa.Double(), nullable=True),
        sa.Column(
            "metrics",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("step", name=op.f("pk_training_steps")),
    )
    op.create_table(
        "policy_versions",
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.Text(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=True),
        sa.Column("sha256", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="staged", nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("training_step", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("live_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('staged', 'live', 'retired', 'failed')",
            name=op.f("ck_policy_versions_status"),
        ),
        sa.ForeignKeyConstraint(
            ["training_step"],
            ["training_steps.step"],
            name=op.f("fk_policy_versions_training_step_training_steps"),
        ),
        sa.PrimaryKeyConstraint("policy", "version", name=op.f("pk_policy_versions")),
    )
    op.create_index(
        "uq_policy_versions_one_live",
        "policy_versions",
        ["policy"],
        unique=True,
        postgresql_where=sa.text("status = 'live'"),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=True),
        sa.Column("task_id", sa.Text(), nullable=True),
        sa.Column("agent", sa.Text(), nullable=True),
        sa.Column("mode", sa.Text(), server_default="train", nullable=False),
        sa.Column("status", sa.Text(), server_default="running", nullable=False),
        sa.Column("reward", sa.Double(), nullable=True),
        sa.Column(
            "metadata",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("consumed_by_step", sa.BigInteger(), nullable=True),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claim_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("mode IN ('train', 'val')", name=op.f("ck_rollouts_mode")),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')", name=op.f("ck_rollouts_status")),
        sa.ForeignKeyConstraint(
            ["consumed_by_step"],
            ["training_steps.step"],
            name=op.f("fk_rollouts_consumed_by_step_training_steps"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index("ix_rollouts_created_at", "rollouts", ["created_at"], unique=False)
    op.create_index(
        "ix_rollouts_unconsumed_group",
        "rollouts",
        [sa.literal_column("coalesce(group_id, id)")],
        unique=False,
        postgresql_where=sa.text("consumed_by_step IS NULL"),
    )
    op.create_table(
        "llm_calls",
        sa.Column("span_id", sa.Text(), nullable=False),
        sa.Column("choice_index", sa.Integer(), server_default="0", nullable=False),
        sa.Column("rollout_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("agent", sa.Text(), nullable=True),
        sa.Column("policy_version", sa.Integer(), nullable=True),
        sa.Column("request", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("response", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("prompt_token_ids", postgresql.ARRAY(sa.Integer()), nullable=True),
        sa.Column("completion_token_ids", postgresql.ARRAY(sa.Integer()), nullable=True),
        sa.Column("completion_logprobs", postgresql.ARRAY(sa.REAL()), nullable=True),
        sa.Column("finish_reason", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=True),
        sa.Column("usage", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_llm_calls_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("span_id", "choice_index", name=op.f("pk_llm_calls")),
    )
    op.create_index("ix_llm_calls_rollout_id_seq", "llm_calls", ["rollout_id", "seq"], unique=False)
    op.create_table(
        "rewards",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("rollout_id", sa.Text(), nullable=False),
        sa.Column("span_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), server_default="reward", nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "value = value AND abs(value) < 'Infinity'::float8", name=op.f("ck_rewards_finite")
        ),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], name=op.f("fk_rewards_rollout_id_rollouts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rewards")),
    )
    op.create_index("ix_rewards_rollout_id", "rewards", ["rollout_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_rewards_rollout_id", table_name="rewards")
    op.drop_table("rewards")
    op.drop_index("ix_llm_calls_rollout_id_seq", table_name="llm_calls")
    op.drop_table("llm_calls")
    op.drop_index(
        "ix_rollouts_unconsumed_group",
        table_name="rollouts",
        postgresql_where=sa.text("consumed_by_step IS NULL"),
    )
    op.drop_index("ix_rollouts_created_at", table_name="rollouts")
    op.drop_table("rollouts")
    op.drop_index(
        "uq_policy_versions_one_live",
        table_name="policy_versions",
        postgresql_where=sa.text("status = 'live'"),
    )
    op.drop_table("policy_versions")
    op.drop_table("training_steps")
    op.drop_index("ix_spans_trace_id", table_name="spans")
    op.drop_index("ix_spans_start_time", table_name="spans")
    op.drop_index("ix_spans_rollout_id", table_name="spans")
    op.drop_table("spans")
