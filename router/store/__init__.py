"""Persistence: SQLAlchemy 2 async models and repositories (SQLite by default, PostgreSQL in production)."""

from router.store.db import Database, NotFound, Conflict
from router.store.repositories import Store

__all__ = ["Database", "Store", "NotFound", "Conflict"]
