"""writer_marks: each batch writer's flushed-up-to watermark, so that claims and reward lookups
wait for rows another proxy process accepted and has not yet written

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "writer_marks",
        sa.Column("writer_id", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("durable_through", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("stale_after_s", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("writer_id", name=op.f("pk_writer_marks")),
    )


def downgrade() -> None:
    op.drop_table("writer_marks")
