"""agent adapters: which adapter served each call (a policy's own, or one of its agents')

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The adapter's policy key (`policy` or `policy-planner`): `policy_version` is its version.
    # NULL for rows written before this (the policy's own) and for the LiteLLM lane.
    op.add_column("llm_calls", sa.Column("adapter", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("llm_calls", "adapter")
