"""proxy capture: llm_calls.response_id, attempt and upstream

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The `id` the agent got back (chatcmpl-...): rewards may name a call by it.
    op.add_column("llm_calls", sa.Column("response_id", sa.Text(), nullable=True))
    # /rollout/{id}/attempt/{n}/v1: the retry of the rollout this call belongs to.
    op.add_column("llm_calls", sa.Column("attempt", sa.Integer(), nullable=True))
    # The engine URL that served the call (each rollout sticks to one replica).
    op.add_column("llm_calls", sa.Column("upstream", sa.Text(), nullable=True))
    op.create_index("ix_llm_calls_response_id", "llm_calls", ["response_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_llm_calls_response_id", table_name="llm_calls")
    op.drop_column("llm_calls", "upstream")
    op.drop_column("llm_calls", "attempt")
    op.drop_column("llm_calls", "response_id")
