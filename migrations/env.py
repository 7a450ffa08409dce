"""Alembic environment: the URL from the app's settings, the metadata from app.models."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from app.db import sqlalchemy_url
from app.models import Base
from config import Settings


def _database_url() -> str:
    try:
        from flask import current_app

        url = current_app.config["JOBSERVICE_SETTINGS"].database_url
    except RuntimeError:  # outside an app context (plain `alembic`)
        url = Settings.from_env().database_url
    if not url:
        raise RuntimeError("DATABASE_URL is not set")
    return sqlalchemy_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=Base.metadata, literal_binds=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
