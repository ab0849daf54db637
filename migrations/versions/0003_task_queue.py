"""task queue: datasets, tasks, attempts, val rounds, declared group sizes, reward_by_version

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The learning curve in one query: mean train and val reward per policy version (and dataset).
# A rollout counts under the version that served its calls (the oldest, if a swap happened
# mid-rollout); a rollout with no policy call under the version live when it was handed out.
# Calls of superseded attempts are left out, as the trainer leaves them out.
REWARD_BY_VERSION = """
CREATE VIEW reward_by_version AS
WITH finished AS (
    SELECT r.dataset, r.mode, r.reward,
           coalesce(
               (SELECT min(c.policy_version) FROM llm_calls c
                WHERE c.rollout_id = r.id
                  AND (r.attempt IS NULL OR c.attempt IS NULL OR c.attempt = r.attempt)),
               r.policy_version, 0) AS policy_version
    FROM rollouts r
    WHERE r.status IN ('succeeded', 'failed') AND r.reward IS NOT NULL
)
SELECT policy_version, dataset,
       avg(reward) FILTER (WHERE mode = 'train') AS train_reward,
       count(*) FILTER (WHERE mode = 'train') AS train_rollouts,
       avg(reward) FILTER (WHERE mode = 'val') AS val_reward,
       count(*) FILTER (WHERE mode = 'val') AS val_rollouts
FROM finished
GROUP BY policy_version, dataset
"""


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("epochs", sa.Integer(), server_default="1", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("epochs >= 0", name=op.f("ck_datasets_epochs")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_datasets")),
    )
    op.create_table(
        "tasks",
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("split", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("input", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("group_size", sa.Integer(), server_default="1", nullable=False),
        sa.Column("epochs_started", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("split IN ('train', 'val')", name=op.f("ck_tasks_split")),
        sa.CheckConstraint("group_size >= 1", name=op.f("ck_tasks_group_size")),
        sa.ForeignKeyConstraint(["dataset"], ["datasets.name"], name=op.f("fk_tasks_dataset_datasets")),
        sa.PrimaryKeyConstraint("dataset", "split", "id", name=op.f("pk_tasks")),
    )
    op.create_index("ix_tasks_next", "tasks", ["dataset", "split", "epochs_started"], unique=False)
    op.create_table(
        "val_rounds",
        sa.Column("dataset", sa.Text(), nullable=False),
        sa.Column("policy", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["dataset"], ["datasets.name"], name=op.f("fk_val_rounds_dataset_datasets")),
        sa.PrimaryKeyConstraint("dataset", "policy", "version", name=op.f("pk_val_rounds")),
    )
    op.add_column("rollouts", sa.Column("group_size", sa.Integer(), nullable=True))
    op.add_column("rollouts", sa.Column("dataset", sa.Text(), nullable=True))
    op.add_column("rollouts", sa.Column("attempt", sa.Integer(), nullable=True))
    op.add_column("rollouts", sa.Column("policy_version", sa.Integer(), nullable=True))
    op.drop_constraint(op.f("ck_rollouts_status"), "rollouts", type_="check")
    op.create_check_constraint(
        op.f("ck_rollouts_status"), "rollouts", "status IN ('queued', 'running', 'succeeded', 'failed')"
    )
    op.create_check_constraint(
        op.f("ck_rollouts_group_size"), "rollouts", "group_size IS NULL OR group_size >= 1"
    )
    op.create_index(
        "ix_rollouts_queued",
        "rollouts",
        ["dataset", "mode", "created_at"],
        unique=False,
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index("ix_rollouts_dataset", "rollouts", ["dataset"], unique=False)
    op.create_table(
        "rollout_attempts",
        sa.Column("rollout_id", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), server_default="running", nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'failed', 'superseded')",
            name=op.f("ck_rollout_attempts_status"),
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_rollout_attempts_rollout_id_rollouts")
        ),
        sa.PrimaryKeyConstraint("rollout_id", "attempt", name=op.f("pk_rollout_attempts")),
    )
    op.create_index(
        "ix_rollout_attempts_lease",
        "rollout_attempts",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'running'"),
    )
    op.execute(REWARD_BY_VERSION)


def downgrade() -> None:
    op.execute("DROP VIEW reward_by_version")
    op.drop_index("ix_rollout_attempts_lease", table_name="rollout_attempts")
    op.drop_table("rollout_attempts")
    op.drop_index("ix_rollouts_dataset", table_name="rollouts")
    op.drop_index("ix_rollouts_queued", table_name="rollouts")
    op.drop_constraint(op.f("ck_rollouts_group_size"), "rollouts", type_="check")
    op.drop_constraint(op.f("ck_rollouts_status"), "rollouts", type_="check")
    op.create_check_constraint(
        op.f("ck_rollouts_status"), "rollouts", "status IN ('running', 'succeeded', 'failed')"
    )
    op.drop_column("rollouts", "policy_version")
    op.drop_column("rollouts", "attempt")
    op.drop_column("rollouts", "dataset")
    op.drop_column("rollouts", "group_size")
    op.drop_table("val_rounds")
    op.drop_index("ix_tasks_next", table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("datasets")
