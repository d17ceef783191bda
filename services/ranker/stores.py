"""The ranker's stores of record, on the backend its settings name.

A2V_RANKER_STORE_DSN set: one PostgreSQL database shared by every replica (schema migrated at
opening; a database that cannot be reached stops the start with StoreUnavailable, exit 1, naming
it without its password). Unset: the SQLite files under A2V_RANKER_DATA_DIR, opened through
recovery.open_store (a damaged file is quarantined and replaced by an empty store).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anime2vec.feedback import FeedbackStore
from anime2vec.serving.metrics import Metrics
from anime2vec.store.added_anime import AddedAnimeStore, AnyAddedAnimeStore, PostgresAddedAnimeStore
from anime2vec.store.observe import metrics_observer

from .recovery import StoreUnavailable, open_store
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


def open_stores(settings: RankerSettings, metrics: Metrics) -> RankerStores:
    if not settings.store_dsn:
        observe = metrics_observer(metrics, "sqlite")
        metrics.store_up.labels(backend="sqlite").set(1)
        return RankerStores(
            open_store(
                lambda p: AddedAnimeStore(p, observe),
                settings.data_dir / "added_anime.sqlite",
                settings.data_dir,
                "the store of added anime",
            ),
            open_store(
                lambda p: FeedbackStore(p, observe),
                settings.data_dir / "feedback.sqlite",
                settings.data_dir,
                "the feedback store",
            ),
        )
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
