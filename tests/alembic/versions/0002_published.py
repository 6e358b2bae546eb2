"""ADD COLUMN with a default."""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.add_column(
        "posts",
        sa.Column("published", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade():
    op.drop_column("posts", "published")
