"""Alembic environment for the contract tests.

The database URL comes from PHASECAST_DATABASE_URL (or DATABASE_URL), as
'phasecast contract --exec' sets it; APP_SCHEMA names the schema that holds
the application's tables and Alembic's own version table.
"""
import logging.config
import os

from alembic import context
from sqlalchemy import create_engine, text

config = context.config
if config.config_file_name:
    logging.config.fileConfig(config.config_file_name)

url = os.environ.get("PHASECAST_DATABASE_URL") or os.environ["DATABASE_URL"]
# SQLAlchemy knows PostgreSQL as postgresql://, not postgres://.
if url.startswith("postgres://"):
    url = "postgresql://" + url[len("postgres://"):]
app_schema = os.environ["APP_SCHEMA"]


def run_migrations_online():
    engine = create_engine(url)
    with engine.connect() as connection:
        # Never queue a DROP behind a long transaction for long: fail, and
        # let the operator run the contract again.
        connection.execute(text("SET lock_timeout = '5s'"))
        context.configure(
            connection=connection,
            version_table_schema=app_schema,
            transaction_per_migration=True,
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
