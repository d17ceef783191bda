"""How a ranker replica learns of anime added through another replica.

The store of added anime is the truth; each replica's served catalogue (`Serving.extra`) and index
points are derived from it. Every write carries a revision that grows in commit order
(anime2vec/store/added_anime.py), so a replica asks the store for the changes after the last
revision it serves and applies them (Lifecycle.follow_added: re-embedded with its own item
tower, upserted into its index, listed in its catalogue). It asks again as soon as PostgreSQL
NOTIFYs a commit, and at least every A2V_RANKER_CATALOG_FOLLOW_S seconds whatever happens, so a
missed notification (the listening connection was down) delays an anime by one period, never
loses it. The SQLite stores have no notification: several ranker processes on one machine that
share them (A2V_RANKER_STORE_DIR, `make run`) learn of each other's writes by this poll alone, every
A2V_RANKER_CATALOG_FOLLOW_S; for a ranker alone on its files the loop only closes the window in which
a model switch could miss its own write.

The same loop reports the store's health: a2v_store_up (the last question reached the store),
a2v_store_connections (the pool), a2v_added_anime_revision and a2v_catalog_follow_timestamp_seconds.
"""

from __future__ import annotations

import logging
import threading
import time

from anime2vec.serving.metrics import Metrics

log = logging.getLogger("services.ranker")


class CatalogFollower:
    def __init__(self, servicer, stores, metrics: Metrics, interval_s: float):
        self.servicer, self.stores, self.metrics, self.interval_s = servicer, stores, metrics, interval_s
        self._stop = threading.Event()
        self._problem: str | None = None
        self._thread = threading.Thread(target=self._run, name="catalog-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def poll_once(self) -> int:
        """Apply what other replicas wrote; update the health metrics. Returns how many anime were applied."""
        backend = self.stores.backend
        try:
            applied = self.servicer.lifecycle.follow_added()
        except Exception as e:  # the store is down or the index refused: keep serving, ask again
            self.metrics.store_up.labels(backend=backend).set(0)
            if str(e) != self._problem:  # once per problem, not once per poll
                log.warning(
                    "cannot follow the store of added anime: %s; anime added through other replicas "
                    "are served once it answers again",
                    str(e)[:300],
                    extra={"reason": "store_follow"},
                )
            self._problem = str(e)
            return 0
        if self._problem is not None:
            log.info("following the store of added anime again")
        self._problem = None
        self.metrics.store_up.labels(backend=backend).set(1)
        self.metrics.catalog_follow.set(time.time())
        s = self.servicer.lifecycle.served
        if s is not None:
            self.metrics.added_anime_revision.set(s.added_revision)
        return applied

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            if self.stores.database is not None:
                for state, n in self.stores.database.stats().items():
                    self.metrics.store_connections.labels(state=state).set(n)
            self.stores.added.wait_for_changes(self.interval_s, self._stop)
