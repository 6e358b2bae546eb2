"""Alembic's environment for marmot's black-box test: the database comes from alembic.ini,
which the test writes for the node it migrates. Batch mode ("move and copy", SQLite's table
rebuild) as Alembic recommends for SQLite."""
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
engine = engine_from_config(
    config.get_section(config.config_ini_section),
    prefix="sqlalchemy.",
    poolclass=pool.NullPool,
    connect_args={"timeout": 30},
)
with engine.connect() as connection:
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
