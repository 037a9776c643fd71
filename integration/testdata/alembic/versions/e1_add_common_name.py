"""expand: add instances.common_name

Revision ID: e1
Revises:
"""
import os

from alembic import op
import sqlalchemy as sa

revision = "e1"
down_revision = None
branch_labels = ("expand",)
depends_on = None


def upgrade():
    schema = os.environ["APP_SCHEMA"]
    op.execute(f'ALTER TABLE "{schema}".instances ADD COLUMN IF NOT EXISTS common_name text')


def downgrade():
    op.drop_column("instances", "common_name", schema=os.environ["APP_SCHEMA"])
