"""contract: drop instances.name and instances.display_name

Revision ID: c1
Revises:
Depends on: e1
"""
import os

from alembic import op

revision = "c1"
down_revision = None
branch_labels = ("contract",)
depends_on = "e1"


def upgrade():
    schema = os.environ["APP_SCHEMA"]
    op.drop_column("instances", "name", schema=schema)
    op.drop_column("instances", "display_name", schema=schema)


def downgrade():
    raise NotImplementedError("a contract is not undone")
