"""The ranker's stores of record, on the backend its settings name.

A2V_RANKER_STORE_DSN set: one PostgreSQL database shared by every replica (schema migrated at
opening; a database that cannot be reached stops the start with StoreUnavailable, exit 1, naming
it without its password). Unset: the SQLite files under A2V_RANKER_STORE_DIR (default
A2V_RANKER_DATA_DIR), opened through recovery.open_store (a damaged file is quarantined and replaced
by an empty store) under recovery.StoreDirLock: several ranker processes on one machine may share
them (WAL: readers and one writer at a time across processes; every write is BEGIN IMMEDIATE).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anime2vec.feedback import FeedbackStore
from anime2vec.serving.metrics import Metrics
from anime2vec.store.added_anime import AddedAnimeStore, AnyAddedAnimeStore, PostgresAddedAnimeStore
from anime2vec.store.observe import metrics_observer

from .recovery import StoreDirLock, StoreUnavailable, open_store
from .settings import RankerSettings

if TYPE_CHECKING:  # imported when used: PostgreSQL only
    from anime2vec.store.feedback_postgres import AnyFeedbackStore
    from anime2vec.store.postgres import Database

log = logging.getLogger("services.ranker")


@dataclass
class RankerStores:
    added: AnyAddedAnimeStore
    feedback: AnyFeedbackStore
    database: Database | None = None  # when on PostgreSQL
    lock: StoreDirLock | None = None  # on SQLite: held while the files are open (other processes may share them)

    @property
    def backend(self) -> str:
        return "postgres" if self.database is not None else "sqlite"

    @property
    def shared(self) -> bool:
        """Other replicas may write too: follow their changes."""
        return self.database is not None

    def close(self) -> None:
        self.added.close()
        self.feedback.close()
        if self.database is not None:
            self.database.close()
        if self.lock is not None:
            self.lock.close()


def open_sqlite_stores(directory: Path, observe) -> RankerStores:
    """The SQLite stores in `directory`, opened by one process at a time (a damaged one is recovered
    only when no other process has it open), then marked in use by this one."""
    lock = StoreDirLock(directory)
    added: AddedAnimeStore | None = None
    try:
        with lock.opening():
            added = open_store(
                lambda p: AddedAnimeStore(p, observe),
                directory / "added_anime.sqlite",
                directory,
                "the store of added anime",
                lock.alone,
            )
            feedback = open_store(
                lambda p: FeedbackStore(p, observe),
                directory / "feedback.sqlite",
                directory,
                "the feedback store",
                lock.alone,
            )
            lock.hold()
    except BaseException:
        if added is not None:
            added.close()
        lock.close()
        raise
    return RankerStores(added, feedback, lock=lock)


def open_stores(settings: RankerSettings, metrics: Metrics) -> RankerStores:
    if not settings.store_dsn:
        observe = metrics_observer(metrics, "sqlite")
        metrics.store_up.labels(backend="sqlite").set(1)
        return open_sqlite_stores(settings.sqlite_dir, observe)
    from anime2vec.store.feedback_postgres import PostgresFeedbackStore
    from anime2vec.store.postgres import Database, DatabaseUnavailable

    try:
        db = Database(
            settings.store_dsn,
            max_connections=settings.store_pool_size,
            connect_timeout_s=settings.store_connect_timeout_s,
            observe=metrics_observer(metrics, "postgres"),
            application_name="anime2vec-ranker",
        )
    except DatabaseUnavailable as e:
        metrics.store_up.labels(backend="postgres").set(0)
        raise StoreUnavailable(e.message) from e
    try:
        added = PostgresAddedAnimeStore(db)
    except Exception:
        db.close()
        raise
    metrics.store_up.labels(backend="postgres").set(1)
    log.info("stores of record on PostgreSQL at %s (schema version %d)", db.where, db.schema_version)
    return RankerStores(added, PostgresFeedbackStore(db), db)
