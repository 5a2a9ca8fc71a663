"""The tracker's exception hierarchy, and the one place that maps driver errors onto it.

Callers catch ``TrackerError`` for anything the tracker raises on purpose. ``InvalidInput`` is a
``ValueError`` so that code written against plain Python conventions still catches bad arguments.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc


class TrackerError(Exception):
    """Base class of every error the tracker raises deliberately."""

    #: What to do about it, where the tracker knows better than the driver's sentence it wraps; the
    #: message ends with it too. The CLI prints the driver's sentence and this (QA round 43: it
    #: printed the driver's alone, and a LATIN1 database's "has no equivalent" lost the way out).
    advice: str | None = None
    #: Made by ``translate`` around a driver error, saying no more than it: the CLI prints the
    #: driver's sentence instead. Other errors with a driver cause say more (which lock, held by
    #: whom, which setting) and print as they are (QA round 47: a migration's timeout printed
    #: "canceling statement due to lock timeout" alone).
    translated: bool = False


class InvalidInput(TrackerError, ValueError):
    """An argument or event was rejected before anything touched the database."""


class ConfigError(InvalidInput):
    """A ``TrackerConfig`` value is out of range or malformed."""


class StorageError(TrackerError):
    """The database failed in a way the tracker could not hide (after its retries)."""


class TransientStorageError(StorageError):
    """A conflict that is safe to retry: a deadlock, a serialization failure, a busy SQLite file."""


class UnstorableInput(InvalidInput, StorageError):
    """A value the database refused for its content, not for its state: a character that a PostgreSQL
    database of another encoding than UTF8 cannot hold. Invalid input to the caller (HTTP 422), never
    worth a retry; still a ``StorageError`` to the code that handles the database's refusals."""


class CommitOutcomeUnknown(StorageError):
    """The connection failed while committing, so the transaction may or may not have been applied.

    Postgres over a network: the server can commit and the connection drop before it says so. The
    tracker then asks the server on a new connection (the transaction's status by its id) and raises
    this only when it gets no answer. It neither retries such a write nor re-runs it in another
    transaction (that could apply it twice: counters would count an outcome twice); the caller
    decides, knowing a resend of an outcome or a speed sample may count it twice and a resend of
    presence or mappings does not.

    Also raised, on either engine, for a transaction still running when a forced shutdown
    abandoned it (``abandoned``: the service's answer says which of the two happened).
    """

    def __init__(self, message: str, *, abandoned: bool = False) -> None:
        super().__init__(message)
        self.abandoned = abandoned


class SchemaOutOfDate(TrackerError):
    """The database is not at the migration this version of the tracker needs (and auto_migrate is off)."""


class TrackerClosed(TrackerError):
    """The tracker was used after ``close()``."""


class WrongEventLoop(TrackerError, RuntimeError):
    """The tracker was used from an event loop other than the one that opened it.

    Its connections, locks and tasks belong to that loop: on Postgres, asyncpg failed the call with a
    bare RuntimeError and dropped the connection (QA round 18). One tracker per event loop.
    """


#: Serialization failure, deadlock, lock not available; and a foreign key violation, which the
#: tracker's own statements meet only when the sweeper forgot a key between a transaction's reading
#: its id and referring to it (a gossip merge: QA round 28): a fresh transaction finds the key again.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "23503"}
#: A prepared statement missing, or there already, on a connection that prepared it, or did not:
#: the server connection changed under the client (a pooler in transaction mode).
_PREPARED_STATEMENT_SQLSTATES = ("26000", "42P05")
#: undefined_column, undefined_table, undefined_function: a schema other than this version's.
_SCHEMA_SQLSTATES = ("42703", "42P01", "42883")
#: untranslatable_character, character_not_in_repertoire: the value, not the database's state.
_UNSTORABLE_SQLSTATES = ("22P05", "22021")
_TRANSIENT_MESSAGES = ("database is locked", "database table is locked", "database is busy")


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
    if sqlstate_of(error) in _TRANSIENT_SQLSTATES:
        return True
    if is_stale_statement(error):
        return True
    message = str(orig).lower()
    return any(fragment in message for fragment in _TRANSIENT_MESSAGES)


def is_stale_statement(error: BaseException) -> bool:
    """A statement prepared before another process's migration changed its table (asyncpg's
    ``InvalidCachedStatementError``, or its type cache: "cache lookup failed for type"). SQLAlchemy's
    asyncpg dialect has cleared its caches, so a new transaction prepares it anew: retried, reads
    too. Answered 503 once per pooled connection after such a migration (QA rounds 47, 49)."""
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    return type(orig).__name__ == "InvalidCachedStatementError" or (
        "cache lookup failed for type" in str(orig).lower()
    )


def is_disconnect(error: BaseException) -> bool:
    """Tell whether the connection was lost under a driver error: SQLAlchemy saw it (and invalidated
    the connection), or the server said so (class 08, connection exception; 57P, shutting down).
    Before COMMIT was sent that is safe to run again on a fresh connection: the server rolls back a
    transaction whose connection is gone. A connection that could not be made at all (refused,
    reset, timed out: an ``OSError``, which SQLAlchemy passes through unwrapped from asyncpg's
    connect) is one too: nothing was sent."""
    if isinstance(error, OSError):
        return True
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    state = sqlstate_of(error)
    return error.connection_invalidated or (state is not None and state.startswith(("08", "57P")))


def sqlstate_of(error: BaseException) -> str | None:
    """The SQLSTATE the Postgres server answered with, if the error is its answer (a lost connection,
    a timeout or a client-side failure has none)."""
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    state = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    return state if isinstance(state, str) else None


#: Longest ``describe`` answers: a log line stays one short line whatever the driver said.
_MOST_DESCRIBED = 240


def describe(error: BaseException) -> str:
    """A short one-line account of an error for a log line: its class, Postgres' SQLSTATE when the
    server answered, and the first line of the driver's message, at most ``_MOST_DESCRIBED``
    characters, then the tracker's advice if it has some. ``str()`` of SQLAlchemy's errors carries
    the whole statement and its parameters (peer ids by the thousand in a gossip merge): each retry
    of a deadlocked merge logged ~1.7 KB in a 48-minute soak. The tracker's own errors name the
    driver error they wrap the same way.

    >>> describe(sqlite3.OperationalError("database is locked"))
    'OperationalError: database is locked'
    """
    cause = error.__cause__
    if isinstance(error, TrackerError) and cause is not None and not isinstance(cause, TrackerError):
        # With its advice after the bounded part: the sweeper's log line for a database downgraded
        # under it named the missing column and not what to do (QA round 47).
        said = _bounded(f"{type(error).__name__}: {describe(cause)}")
        return said + (f" ({error.advice})" if error.advice else "")
    orig: BaseException = error
    if isinstance(error, sa_exc.DBAPIError) and error.orig is not None:
        # SQLAlchemy's asyncpg adapter wraps asyncpg's error, whose class names the condition.
        inner = error.orig.__cause__
        orig = inner if inner is not None and getattr(inner, "sqlstate", None) else error.orig
    state = sqlstate_of(error)
    first = next((line.strip() for line in str(orig).splitlines() if line.strip()), "")
    named = f"{type(orig).__name__} [SQLSTATE {state}]" if state else type(orig).__name__
    return _bounded(f"{named}: {first}" if first else named)


def _bounded(text: str) -> str:
    return text if len(text) <= _MOST_DESCRIBED else text[: _MOST_DESCRIBED - 3] + "..."


_ENCODING_ADVICE = (
    "the database's encoding is not UTF8, so it holds only the characters of that encoding; create "
    "the tracker's database with ENCODING 'UTF8'"
)
_SCHEMA_ADVICE = (
    "the database's schema is not the one this tracker's version needs: was it downgraded or "
    "migrated under it? tracker db check says; run the version the schema is at"
)
_SQLITE_LOCK_ADVICE = (
    "another connection held the file's lock longer than sqlite_busy_timeout_s (a write, also "
    "write_retries times more); retry once it is done"
)
_PG_LOCK_ADVICE = (
    "another session held a lock longer than pg_lock_timeout_s (a write, also write_retries times "
    "more); pg_locks and pg_stat_activity name it"
)
_CONFLICT_ADVICE = "concurrent transactions conflicted on every attempt (write_retries); retry"
_POOL_ADVICE = (
    "every pooled connection (pool_size, and as many more) stayed in use for the pool's 30 s: calls "
    "waiting behind a lock held elsewhere (pg_locks names it) or more at once than the pool; retry"
)
_STALE_ADVICE = "another process changed the schema under this one's prepared statements; retry"
_POOLER_ADVICE = (
    "behind a connection pooler in transaction mode, such as PgBouncer's pool_mode = transaction, "
    "set pg_transaction_pooling"
)


_READ_ONLY_ADVICE = (
    "opening a tracker writes its node and clock rows (tracker_nodes, tracker_clocks), so every "
    "tracker process and CLI command needs to write them: on Postgres INSERT and UPDATE on the "
    "tracker's tables, on SQLite write access to the file and its directory (the -wal and -shm "
    "files); a role or user that only reads queries the tables and views directly (docs/analytics.md)"
)


def _read_only(error: BaseException) -> bool:
    """Refused a write for want of rights on a table (Postgres's insufficient_privilege on a table,
    not a migration's "must be owner of table" nor a schema's permission, also 42501: the advice
    named rights the role had, QA round 61), a read-only transaction (the role docs/analytics.md
    suggests, QA round 69), or SQLite's read-only file."""
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    if sqlstate_of(error) == "25006":  # read_only_sql_transaction: default_transaction_read_only
        return True
    if sqlstate_of(error) == "42501":
        return "permission denied for table" in str(orig)
    return isinstance(orig, sqlite3.OperationalError) and "readonly database" in str(orig)


def _schema_mismatch(error: BaseException) -> bool:
    if sqlstate_of(error) in _SCHEMA_SQLSTATES:
        return True
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    said = str(orig)
    return isinstance(orig, sqlite3.OperationalError) and (
        said.startswith(("no such column", "no such table")) or " has no column named " in said
    )


def _transient_advice(error: BaseException) -> str:
    """Reads are not retried on a lock (QA round 52: their advice named write_retries alone)."""
    if sqlstate_of(error) == "55P03":
        return _PG_LOCK_ADVICE
    if is_stale_statement(error):
        return _STALE_ADVICE
    orig = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    if isinstance(orig, sqlite3.Error):
        return _SQLITE_LOCK_ADVICE
    return _CONFLICT_ADVICE


def translate(error: BaseException) -> TrackerError:
    """Wrap a driver error in the tracker's hierarchy, keeping the original as ``__cause__``.

    The message is ``describe(error)``: an application logging ``"failed: %s" % error`` printed the
    driver's whole text, the statement and a batch's parameters included (kilobytes of peer ids),
    and the full text is still there in the cause for a traceback."""
    said = describe(error)
    advice: str | None = None
    if isinstance(error, sa_exc.TimeoutError):
        # SQLAlchemy's own "QueuePool limit ... reached" came out raw: an embedding application's
        # handler for TrackerError missed it, and the service answered 500 (QA round 70).
        wrapped: TrackerError = TransientStorageError(
            f"no database connection came free: {said} ({_POOL_ADVICE})"
        )
        advice = _POOL_ADVICE
    elif is_transient(error):
        # The driver's "database is locked" alone named neither the setting nor what to look for
        # (QA round 49): the CLI prints this advice after it; the service answers 503 storage_busy.
        advice = _transient_advice(error)
        wrapped = TransientStorageError(f"database conflict, retries exhausted: {said} ({advice})")
    elif sqlstate_of(error) in _UNSTORABLE_SQLSTATES:
        # Answered "the database is unavailable; retry later" (503) before, for a request that no
        # retry could ever store (QA round 40: a LATIN1 database and the id 日本語).
        advice = _ENCODING_ADVICE
        wrapped = UnstorableInput(f"the database cannot store this value: {said} ({advice})")
    else:
        if _schema_mismatch(error):
            # A tracker whose database was downgraded (or migrated) under it: "retry later" could
            # never come true (QA round 47).
            advice = _SCHEMA_ADVICE
        elif sqlstate_of(error) in _PREPARED_STATEMENT_SQLSTATES:
            advice = _POOLER_ADVICE
        elif _read_only(error):
            # "permission denied for table tracker_nodes" from `tracker stats` under the read-only
            # role docs/analytics.md suggests said nothing of why a read wrote (QA round 59).
            advice = _READ_ONLY_ADVICE
        wrapped = StorageError(f"database error: {said}" + (f" ({advice})" if advice else ""))
    wrapped.advice = advice
    wrapped.__cause__ = error
    wrapped.translated = True
    return wrapped
