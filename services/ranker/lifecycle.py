"""Which model version the ranker serves: the first one at start-up (`pick_bundles`), the swap to the
version the collection alias points to (`maybe_follow_alias`, polled), re-embedding the anime added at
run time into each version served, and serving those other replicas add (`follow_added`, polled by
catalog_follower.py). The swap is one assignment: a request keeps the version it started with.

The alias followed is the index's own, or (A2V_RANKER_ALIAS_DATA_DIR: several ranker processes on one
machine, each with its own copy of the embedded collections) the one in another ranker's data dir: this
process then builds its copy of the version's collection when it switches (`activate`), and points its
own alias at what it serves."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from anime2vec.bundle import BundleError, list_bundles, load_bundle
from anime2vec.index.base import AliasUnreadable, ItemIndex, ItemPoint
from anime2vec.index.edge import read_alias_file
from anime2vec.serving import heap
from anime2vec.serving.errors import unavailable
from anime2vec.serving.metrics import Metrics, set_model_info
from anime2vec.serving_model.model import ItemMeta, ServingModel
from anime2vec.store.added_anime import ASSIGNED_IDS, MAX_ANIME_ID, AddedAnime, AnyAddedAnimeStore

from .online_users import OnlineUsers
from .settings import RankerSettings
from .state import Serving, anime_text, item_vectors, load_serving, offline_metrics, payload_from_fields

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(
        self,
        settings: RankerSettings,
        index: ItemIndex,
        store: AnyAddedAnimeStore,
        users: OnlineUsers,
        metrics: Metrics,
    ):
        self.settings, self.index, self.store, self.users, self.metrics = settings, index, store, users, metrics
        self.served: Serving | None = None
        self._swap = threading.Lock()
        self._refused: tuple[str, tuple] | None = None  # (alias target, bundle files) last refused
        self._alias_problem: str | None = None  # why the alias could not be read, last poll
        # writes of added anime (this replica's UpsertAnime, following other replicas') and serving them: one step
        self.write_lock = threading.Lock()
        # another ranker's alias (its data dir's embedded index) this one follows; None: its own index's
        self.alias_file = settings.alias_data_dir / "qdrant" / "aliases.json" if settings.alias_data_dir else None

    def alias_target(self) -> str | None:
        """The version the followed alias names (None: unset); AliasUnreadable when its record is damaged."""
        if self.alias_file is None:
            return self.index.alias_target()
        return read_alias_file(self.alias_file)

    def activate(self, model: ServingModel) -> None:
        """Make `model` the served version: its collection must exist (built here if missing);
        added anime are re-embedded with its item tower; then the swap is one assignment."""
        serving = load_serving(model, self.settings.search_precision)
        if not self.index.has_version(model.version):
            log.info("building the Qdrant collection for %s (%d items)", model.version, len(model.item_ids))
            self.index.create_version(
                model.version,
                model.item_tower.shape[1],
                (ItemPoint(int(a), model.item_tower[i], model.payload(i)) for i, a in enumerate(model.item_ids)),
            )
        self._replay_added(serving)
        with self._swap:
            previous, self.served = self.served, serving
        before = previous.version if previous else None
        del previous  # the old version's last reference here: resettle() below may collect it
        self.users.version_switched(before, model.version)
        set_model_info(
            self.metrics,
            "ranker",
            model.version,
            model.manifest["encoder"]["name"],
            int(model.item_tower.shape[1]),
            offline_metrics(model.manifest),
        )
        log.info("serving model %s", model.version)
        heap.resettle()

    def _replay_added(self, serving: Serving) -> None:
        m, points = serving.model, []
        added = self.store.all()
        serving.added_revision = max((a.revision for a in added), default=0)
        for a in added:
            if a.anime_id > MAX_ANIME_ID:
                log.warning(
                    "added anime %d has an id above %d (accepted before ids were bounded): still served; "
                    "ids for new anime are assigned from %d on regardless",
                    a.anime_id,
                    MAX_ANIME_ID,
                    ASSIGNED_IDS.start,
                )
        if added and not m.has_vectors:  # no item vectors to embed them: serve the rest, keep them stored
            log.warning("model %s has no item tower: %d added anime are not served by it", m.version, len(added))
            return
        points = [p for p in (self._serve_added(serving, a) for a in added) if p is not None]
        if points:
            self.index.upsert(points, version=m.version)
            log.info("replayed %d added anime into %s", len(points), m.version)

    def _serve_added(self, serving: Serving, a: AddedAnime) -> ItemPoint | None:
        """Put a stored anime into `serving.extra`; its index point (None when its encoder differs)."""
        m = serving.model
        if a.encoder_fingerprint != m.manifest["encoder"]["fingerprint"]:
            log.warning(
                "added anime %d was encoded by %s, model %s uses %s: skipped until re-added",
                a.anime_id,
                a.encoder_fingerprint,
                m.version,
                m.manifest["encoder"]["fingerprint"],
            )
            return None
        vec, content, tfidf, cold, row = item_vectors(
            serving, a.anime_id, a.raw_vector, anime_text(m, a.fields), a.fields
        )
        serving.extra[a.anime_id] = ItemMeta(
            a.anime_id,
            content,
            payload_from_fields(a.anime_id, a.fields, cold),
            tfidf,
            a.fields.get("synopsis") or "",
            row,
            vec,
        )
        serving.applied[a.anime_id] = a.revision
        return ItemPoint(a.anime_id, vec, serving.extra[a.anime_id].payload)

    def follow_added(self) -> int:
        """Serve the anime other replicas wrote to a shared store since the last call (in revision
        order; what this replica wrote itself is already served): called by catalog_follower.py.
        Returns how many were applied."""
        s = self.served
        if s is None:
            return 0
        changes = self.store.changes_since(s.added_revision)
        if not changes:
            return 0
        with self.write_lock:  # against this replica's own UpsertAnime of the same ids
            if self.served is not s:  # a model switch replayed the store meanwhile: next call
                return 0
            todo = [a for a in changes if s.applied.get(a.anime_id, 0) < a.revision]
            if not s.model.has_vectors:
                todo = []
            points = [p for p in (self._serve_added(s, a) for a in todo) if p is not None]
            if points:
                self.index.upsert(points, version=s.version)
            s.added_revision = max(s.added_revision, changes[-1].revision)
            s.generation += 1
        if todo:
            log.info(
                "serving %d anime added through other replicas",
                len(todo),
                extra={"anime_ids": [a.anime_id for a in todo][:20], "revision": s.added_revision},
            )
        return len(todo)

    def current(self) -> Serving:
        s = self.served
        if s is None:
            raise unavailable("no model loaded yet", reason="MODEL_NOT_LOADED", retry_after_s=2.0)
        return s

    def maybe_follow_alias(self) -> None:
        """Called periodically: load and serve the version the alias points to, if it moved.
        A target that cannot be served (no bundle, a bundle that does not verify, a failed load)
        is refused while the current version keeps serving, and counted in
        a2v_bundle_load_failures_total. A missing or invalid bundle is logged and counted once, then
        tried again only when the alias or the bundle's files change (re-hashing a large bundle on
        every poll would cost a core); a failed load (e.g. Qdrant unreachable) is retried each poll."""
        try:
            target = self.alias_target()
        except Exception as e:  # e.g. a Qdrant server down for a moment: ask again next poll, keep the thread
            if str(e) != self._alias_problem:  # once per problem, not once per poll
                log.warning(
                    "cannot read the alias: %s; still serving %s", e, self.served.version if self.served else None
                )
            self._alias_problem = str(e)
            return
        self._alias_problem = None
        current = self.served.version if self.served else None
        if not target or target == current:
            return
        path = self.settings.model_store / target
        attempt = (target, _bundle_files(path))
        if attempt == self._refused:
            return
        if not path.is_dir():
            self._refuse(
                attempt,
                "missing",
                f"alias points to {target} but no such bundle in {self.settings.model_store}; still serving {current}",
            )
            return
        try:
            bundle = load_bundle(path)
        except BundleError as e:
            self._refuse(attempt, "invalid", f"refusing to serve {target}: {e}; still serving {current}")
            return
        try:
            self.activate(ServingModel(bundle, device=self.settings.device or None))
            if self.alias_file is not None and self.index.alias_target() != target:
                self.index.set_alias(target)  # this data dir says what this process serves
        except Exception:
            log.exception("could not switch to %s; still serving %s", target, current)
            self.metrics.bundle_load_failures.labels(service="ranker", reason="error").inc()

    def _refuse(self, attempt: tuple[str, tuple], reason: str, message: str) -> None:
        self._refused = attempt
        self.metrics.bundle_load_failures.labels(service="ranker", reason=reason).inc()
        log.error(message, extra={"version": attempt[0], "reason": reason})


def _bundle_files(path: Path) -> tuple:
    """(relative path, size, mtime) of every file of a bundle directory: changes when it is
    replaced or repaired. () when there is no such directory."""
    if not path.is_dir():
        return ()
    return tuple(
        sorted(
            (str(p.relative_to(path)), st.st_size, st.st_mtime_ns)
            for p in path.rglob("*")
            if p.is_file()
            for st in [p.stat()]
        )
    )


def pick_bundles(settings: RankerSettings, alias_target: Callable[[], str | None]) -> list[Path]:
    """The bundle to serve first: [explicit setting], else [the target of the alias followed], else
    every bundle, newest first (the ranker serves the first that verifies)."""
    store = settings.model_store
    if settings.bundle:
        return [Path(settings.bundle) if Path(settings.bundle).is_absolute() else store / settings.bundle]
    try:
        target = alias_target()
    except AliasUnreadable as e:  # another ranker's alias (its own recovers it); this one's was recovered before
        log.warning("cannot read the alias followed (%s); serving the newest bundle that verifies", e)
        target = None
    if target and (store / target).is_dir():
        return [store / target]
    found = list_bundles(store)
    if not found:
        raise SystemExit(f"no model bundle in {store}: train one with `make train` (or `anime2vec train --sample`)")
    return found[::-1]
