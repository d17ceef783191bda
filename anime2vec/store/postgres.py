"""One PostgreSQL database as the store of record of every ranker replica (and of retraining).

`Database` owns a connection pool (psycopg_pool: connections checked before use, so a restarted
server costs one failed check, not a failed call), migrates the schema at opening (migrations.py,
under an advisory lock: replicas starting together apply each file once), and runs each
operation as one transaction, retried when PostgreSQL reports a deadlock or a serialization
failure (two replicas writing the same rows: nothing was written, trying again is safe).
A database that cannot be reached is `DatabaseUnavailable`: UNAVAILABLE with a retry hint to a
gRPC caller (every write is idempotent or reports its outcome, see the stores), never a crash.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from anime2vec.serving.errors import ServiceError, unavailable

from .migrations import migrate_postgres
from .observe import Observer, timed

log = logging.getLogger(__name__)
T = TypeVar("T")
ATTEMPTS = 5  # per operation, for deadlocks / serialization failures only
STATEMENT_TIMEOUT_MS = 30_000  # a statement stuck longer than this is an outage, not a slow write


class DatabaseUnavailable(ServiceError):
    """PostgreSQL could not be reached or the connection broke mid-call (the outcome of a write
    that was committing is then unknown: callers retry idempotent writes)."""

    def __init__(self, message: str):
        err = unavailable(message, reason="STORE_UNAVAILABLE", retry_after_s=1.0)
        super().__init__(err.code, err.message, err.details)


def redacted(dsn: str) -> str:
    """The DSN without its password, for logs and errors."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    return make_conninfo("", **{k: ("***" if k == "password" else v) for k, v in params.items()})


def classify(e: BaseException) -> str:
    if isinstance(e, pg_errors.TransactionRollback):  # deadlock, serialization failure
        return "retried"
    if isinstance(e, (psycopg.OperationalError, PoolTimeout, DatabaseUnavailable)):
        return "unavailable"
    return "error"


class Database:
    """A pool of connections to one PostgreSQL database (thread-safe)."""

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 8,
        connect_timeout_s: float = 5.0,
        pool_timeout_s: float = 10.0,
        observe: Observer | None = None,
        application_name: str = "anime2vec",
    ):
        params = conninfo_to_dict(dsn)  # ProgrammingError for a malformed DSN: caught by the settings
        self.dsn, self.where, self.observe = dsn, redacted(dsn), observe
        # psycopg.connect's keywords: autocommit, and libpq parameters (str | int)
        extra: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = max(1, int(round(connect_timeout_s)))
        if "application_name" not in params:
            extra["application_name"] = application_name
        self._connect_kwargs = extra
        try:  # one direct connection first: an unreachable server fails now, with libpq's own reason
            with psycopg.connect(dsn, **extra) as conn:
                self.schema_version = migrate_postgres(conn)
        except psycopg.OperationalError as e:
            raise DatabaseUnavailable(f"PostgreSQL at {self.where} cannot be reached: {_first_line(e)}") from e
        self.pool = ConnectionPool(
            dsn,
            min_size=min_connections,
            max_size=max_connections,
            kwargs=extra,
            configure=_configure,
            check=ConnectionPool.check_connection,
            timeout=pool_timeout_s,
            max_lifetime=1800,
            open=False,
            name="a2v-store",
        )
        try:
            self.pool.open(wait=True, timeout=connect_timeout_s + 1)
        except PoolTimeout as e:
            self.pool.close()
            raise DatabaseUnavailable(f"PostgreSQL at {self.where} cannot be reached: {_first_line(e)}") from e
        self._closed = threading.Event()

    # ---- running operations ----------------------------------------------------------------
    def transact(
        self, store: str, operation: str, fn: Callable[[psycopg.Connection], T], *, snapshot: bool = False
    ) -> T:
        """fn(conn) inside one transaction; committed on return. snapshot=True: REPEATABLE READ,
        READ ONLY (every statement of fn sees the same committed state). Deadlocks and serialization
        failures are retried (with jitter) up to ATTEMPTS times; a lost database is DatabaseUnavailable."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with timed(self.observe, store, operation, classify), self._connection() as conn:
                    with conn.transaction():
                        if snapshot:
                            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                        return fn(conn)
            except pg_errors.TransactionRollback:
                if attempt == ATTEMPTS:
                    raise
                time.sleep(random.uniform(0.005, 0.05) * attempt)
        raise AssertionError("unreachable")

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as e:
            if isinstance(e, pg_errors.TransactionRollback):
                raise
            raise DatabaseUnavailable(f"the store (PostgreSQL) is unavailable: {_first_line(e)}") from e

    def ping(self) -> bool:
        """Whether one round trip to the database succeeds now."""
        try:
            with self.pool.connection(timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except (psycopg.Error, PoolTimeout):
            return False

    def stats(self) -> dict[str, int]:
        s = self.pool.get_stats()
        return {
            "size": s.get("pool_size", 0),
            "idle": s.get("pool_available", 0),
            "waiting": s.get("requests_waiting", 0),
        }

    # ---- notifications ---------------------------------------------------------------------
    def notify_connection(self) -> psycopg.Connection:
        """A connection of its own (outside the pool) for LISTEN."""
        try:
            return psycopg.connect(self.dsn, **self._connect_kwargs)
        except psycopg.OperationalError as e:
            raise DatabaseUnavailable(f"the store (PostgreSQL) is unavailable: {_first_line(e)}") from e

    def close(self) -> None:
        self.pool.close()


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS:d}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
