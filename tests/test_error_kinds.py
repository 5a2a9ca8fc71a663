"""Which driver errors the tracker retries (``errors.is_transient``) and what it makes of them."""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

from tracker.errors import TransientStorageError, is_transient, translate


def _wrapped(orig: Exception) -> sa_exc.DBAPIError:
    return sa_exc.DBAPIError("SELECT 1", {}, orig)


def test_statements_prepared_before_a_migration_are_retried_not_answered_503() -> None:
    """After a migration changed a table under them, a pooled connection's prepared statements fail
    once; SQLAlchemy's asyncpg dialect clears them, so a new transaction succeeds. Taken for a
    lasting failure, each answered 503 once per connection (QA round 47)."""
    dbapi = AsyncAdapt_asyncpg_dbapi
    stale_plan = dbapi.InvalidCachedStatementError(
        "cached statement plan is invalid due to a database schema or configuration change"
    )
    stale_type = dbapi.InternalServerError("cache lookup failed for type 16423")
    for orig in (stale_plan, stale_type):
        assert is_transient(_wrapped(orig))
        assert isinstance(translate(_wrapped(orig)), TransientStorageError)
    assert not is_transient(_wrapped(dbapi.NotSupportedError("cannot alter type of a column used by a view")))
