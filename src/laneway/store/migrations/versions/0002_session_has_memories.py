"""sessions.has_memories: whether the session holds session-scoped memories, returned by
the claim, so a turn of a session without memories skips the recall query.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "sessions",
        sa.Column("has_memories", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.execute(
        "UPDATE sessions SET has_memories = EXISTS "
        "(SELECT 1 FROM memories WHERE memories.session_id = sessions.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("has_memories")
