"""prompts: versioned prompts served on the wire, optimisation runs, the prompt each call saw

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As in 0003, with an optimisation run's evaluations left out: they measure prompt candidates,
# not the policy version that served them.
REWARD_BY_VERSION = """
CREATE OR REPLACE VIEW reward_by_version AS
WITH finished AS (
    SELECT r.dataset, r.mode, r.reward,
           coalesce(
               (SELECT min(c.policy_version) FROM llm_calls c
                WHERE c.rollout_id = r.id
                  AND (r.attempt IS NULL OR c.attempt IS NULL OR c.attempt = r.attempt)),
               r.policy_version, 0) AS policy_version
    FROM rollouts r
    WHERE r.status IN ('succeeded', 'failed') AND r.reward IS NOT NULL AND r.prompt_run IS NULL
)
SELECT policy_version, dataset,
       avg(reward) FILTER (WHERE mode = 'train') AS train_reward,
       count(*) FILTER (WHERE mode = 'train') AS train_rollouts,
       avg(reward) FILTER (WHERE mode = 'val') AS val_reward,
       count(*) FILTER (WHERE mode = 'val') AS val_rollouts
FROM finished
GROUP BY policy_version, dataset
"""

REWARD_BY_VERSION_0003 = REWARD_BY_VERSION.replace(" AND r.prompt_run IS NULL", "")

# Rewards per (prompt version, policy version): a rollout counts under the prompt version its
# calls were served (the oldest, if the live prompt changed mid-rollout), optimisation runs'
# evaluations included (`evaluations` counts them apart).
REWARD_BY_PROMPT_VERSION = """
CREATE VIEW reward_by_prompt_version AS
WITH served AS (
    SELECT r.id, r.dataset, r.mode, r.reward, r.prompt_run,
           c.prompt_name, c.prompt_version, c.policy_version
    FROM rollouts r
    JOIN LATERAL (
        SELECT prompt_name, min(prompt_version) AS prompt_version,
               coalesce(min(policy_version), r.policy_version, 0) AS policy_version
        FROM llm_calls
        WHERE rollout_id = r.id AND prompt_name IS NOT NULL
          AND (r.attempt IS NULL OR attempt IS NULL OR attempt = r.attempt)
        GROUP BY prompt_name
    ) c ON true
    WHERE r.status IN ('succeeded', 'failed') AND r.reward IS NOT NULL
)
SELECT prompt_name, prompt_version, policy_version, dataset,
       avg(reward) FILTER (WHERE mode = 'train') AS train_reward,
       count(*) FILTER (WHERE mode = 'train') AS train_rollouts,
       avg(reward) FILTER (WHERE mode = 'val') AS val_reward,
       count(*) FILTER (WHERE mode = 'val') AS val_rollouts,
       count(*) FILTER (WHERE prompt_run IS NOT NULL) AS evaluations
FROM served
GROUP BY prompt_name, prompt_version, policy_version, dataset
"""


def upgrade() -> None:
    op.create_table(
        "prompts",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("agent", sa.Text(), nullable=True),
        sa.Column("model", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_prompts")),
    )
    op.create_table(
        "prompt_versions",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("parent", sa.Integer(), nullable=True),
        sa.Column("origin", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="staged", nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.Column("scored_on", sa.Text(), nullable=True),
        sa.Column("scores", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("run_id", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("live_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "origin IN ('baseline', 'manual', 'optimiser')", name=op.f("ck_prompt_versions_origin")
        ),
        sa.CheckConstraint("status IN ('staged', 'live', 'retired')", name=op.f("ck_prompt_versions_status")),
        sa.ForeignKeyConstraint(["name"], ["prompts.name"], name=op.f("fk_prompt_versions_name_prompts")),
        sa.PrimaryKeyConstraint("name", "version", name=op.f("pk_prompt_versions")),
    )
    op.create_index(
        "uq_prompt_versions_one_live",
        "prompt_versions",
        ["name"],
        unique=True,
        postgresql_where=sa.text("status = 'live'"),
    )
    op.create_table(
        "prompt_runs",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("train_split", sa.Text(), nullable=False),
        sa.Column("val_split", sa.Text(), nullable=False),
        sa.Column("agent", sa.Text(), nullable=False),
        sa.Column("reflection_model", sa.Text(), nullable=False),
        sa.Column("budget", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("start_version", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("train_tasks", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("val_tasks", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("status", sa.Text(), server_default="running", nullable=False),
        sa.Column("metric_calls", sa.Integer(), server_default="0", nullable=False),
        sa.Column("proposals_failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("best_version", sa.Integer(), nullable=True),
        sa.Column("state", sa.LargeBinary(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('running', 'finished', 'failed')", name=op.f("ck_prompt_runs_status")),
        sa.ForeignKeyConstraint(["name"], ["prompts.name"], name=op.f("fk_prompt_runs_name_prompts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_runs")),
    )
    op.add_column("rollouts", sa.Column("prompt_run", sa.Text(), nullable=True))
    op.add_column("rollouts", sa.Column("prompt_name", sa.Text(), nullable=True))
    op.add_column("rollouts", sa.Column("prompt_version", sa.Integer(), nullable=True))
    # One evaluation of a candidate on a task per run: a resumed run finds what was scored.
    op.create_index(
        "uq_rollouts_prompt_evaluation",
        "rollouts",
        ["prompt_run", "prompt_version", "mode", "task_id"],
        unique=True,
        postgresql_where=sa.text("prompt_run IS NOT NULL"),
    )
    op.drop_index("ix_rollouts_unconsumed_group", table_name="rollouts")
    op.create_index(
        "ix_rollouts_unconsumed_group",
        "rollouts",
        [sa.literal_column("coalesce(group_id, id)")],
        unique=False,
        postgresql_where=sa.text("consumed_by_step IS NULL AND prompt_run IS NULL"),
    )
    op.add_column("llm_calls", sa.Column("prompt_name", sa.Text(), nullable=True))
    op.add_column("llm_calls", sa.Column("prompt_version", sa.Integer(), nullable=True))
    op.execute(REWARD_BY_VERSION)
    op.execute(REWARD_BY_PROMPT_VERSION)


def downgrade() -> None:
    op.execute("DROP VIEW reward_by_prompt_version")
    op.execute(REWARD_BY_VERSION_0003)
    op.drop_column("llm_calls", "prompt_version")
    op.drop_column("llm_calls", "prompt_name")
    op.drop_index("uq_rollouts_prompt_evaluation", table_name="rollouts")
    op.drop_index("ix_rollouts_unconsumed_group", table_name="rollouts")
    op.create_index(
        "ix_rollouts_unconsumed_group",
        "rollouts",
        [sa.literal_column("coalesce(group_id, id)")],
        unique=False,
        postgresql_where=sa.text("consumed_by_step IS NULL"),
    )
    op.drop_column("rollouts", "prompt_version")
    op.drop_column("rollouts", "prompt_name")
    op.drop_column("rollouts", "prompt_run")
    op.drop_table("prompt_runs")
    op.drop_index("uq_prompt_versions_one_live", table_name="prompt_versions")
    op.drop_table("prompt_versions")
    op.drop_table("prompts")
