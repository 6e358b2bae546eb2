"""A table rebuild ("move and copy"): a renamed column, a new column with a UNIQUE
constraint, which SQLite can only add by rebuilding the table."""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade():
    with op.batch_alter_table("posts", recreate="always") as batch:
        batch.alter_column("body", new_column_name="content", existing_type=sa.Text)
        batch.add_column(sa.Column("slug", sa.String(200)))
        batch.create_unique_constraint("uq_posts_slug", ["slug"])


def downgrade():
    with op.batch_alter_table("posts", recreate="always") as batch:
        batch.drop_constraint("uq_posts_slug", type_="unique")
        batch.drop_column("slug")
        batch.alter_column("content", new_column_name="body", existing_type=sa.Text)
