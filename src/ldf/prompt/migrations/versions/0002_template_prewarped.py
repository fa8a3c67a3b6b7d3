"""Whether a detector's template was the one prewarped on nextVisit

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:20:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("prompt_job") as batch:
        batch.add_column(
            sa.Column("template_prewarped", sa.Boolean(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("prompt_job") as batch:
        batch.drop_column("template_prewarped")
