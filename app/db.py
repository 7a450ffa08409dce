"""Engine and session factory: built from settings by whoever runs (API, scheduler, worker)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; this service runs on psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.engine: Engine = create_engine(
            sqlalchemy_url(url), pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size * 2
        )
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self.sessions()
        try:
            yield session
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


@contextmanager
def transaction(session: Session) -> Iterator[Session]:
    """One unit of work: commits when the block ends, rolls back when it raises."""
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
