"""The tracker's exception hierarchy, and the one place that maps driver errors onto it.

Callers catch ``TrackerError`` for anything the tracker raises on purpose. ``InvalidInput`` is a
``ValueError`` so that code written against plain Python conventions still catches bad arguments.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc


class TrackerError(Exception):
    """Base class of every error the tracker raises deliberately."""


class InvalidInput(TrackerError, ValueError):
    """An argument or event was rejected before anything touched the database."""


class ConfigError(InvalidInput):
    """A ``TrackerConfig`` value is out of range or malformed."""


class StorageError(TrackerError):
    """The database failed in a way the tracker could not hide (after its retries)."""


class TransientStorageError(StorageError):
    """A conflict that is safe to retry: a deadlock, a serialization failure, a busy SQLite file."""


class SchemaOutOfDate(TrackerError):
    """The database is not at the migration this version of the tracker needs (and auto_migrate is off)."""


class TrackerClosed(TrackerError):
    """The tracker was used after ``close()``."""


_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available
_TRANSIENT_SQLITE = ("database is locked", "database table is locked", "database is busy")


def is_transient(error: BaseException) -> bool:
    """Tell whether a driver error is a conflict that a fresh transaction would not hit again.

    Errors come wrapped by SQLAlchemy, or bare from ``sqlite3`` on the SQLite write lane.
    """
    if isinstance(error, sa_exc.DBAPIError):
        orig: BaseException | None = error.orig
    elif isinstance(error, sqlite3.Error):
        orig = error
    else:
        return False
    sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    if sqlstate in _TRANSIENT_SQLSTATES:
        return True
    message = str(orig).lower()
    return any(fragment in message for fragment in _TRANSIENT_SQLITE)


def translate(error: BaseException) -> TrackerError:
    """Wrap a driver error in the tracker's hierarchy, keeping the original as ``__cause__``."""
    if is_transient(error):
        wrapped: TrackerError = TransientStorageError(f"database conflict, retries exhausted: {error}")
    else:
        wrapped = StorageError(f"database error: {error}")
    wrapped.__cause__ = error
    return wrapped
