"""Model rollout: build a bundle version's Qdrant collection, then promote or roll back by moving
the collection alias. The ranker polls the alias (`A2V_RANKER_ALIAS_POLL_S`) and swaps the served
model atomically when it moves, so a release never restarts or fails a request.

    index <version>   load + verify the bundle, build its collection (item ids, the served vectors
                      `ServingModel(bundle).item_tower`, payloads `ServingModel.payload(i)`); the
                      alias is not touched. Anime added at run time are replayed by the ranker when
                      it switches, not here. An existing complete collection is left alone.
    promote <version> point the alias at it (refused without a complete collection and a verified
                      bundle in the store), remembering the previous target
    rollback          point the alias back at the previous target

Alias history (the stack of previous targets, newest last) is kept where the alias lives, and is
valid only for the target it was written with, so a promotion interrupted between the two writes
never yields a wrong rollback:
  - embedded (qdrant-edge): `<index root>/alias_history.json` = {"target": v, "previous": [...]}
    beside `aliases.json`;
  - Qdrant server: the metadata key `anime2vec_previous` of the target's own collection (written
    before the alias switch, so the history always travels with the alias).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .bundle import BundleError, list_bundles, load_bundle
from .index.base import AliasUnreadable, ItemPoint, VersionExists, check_version
from .paths import REPO_ROOT, default_model_store

HISTORY_FILE = "alias_history.json"
HISTORY_KEY = "anime2vec_previous"
MAX_HISTORY = 20


class RolloutError(RuntimeError):
    """A rollout step refused (unknown or unindexed version, corrupt bundle, nothing to roll back to)."""


def default_ranker_data_dir() -> Path:
    """The ranker's data directory (`A2V_RANKER_DATA_DIR`, default `var/ranker`): same as the ranker."""
    return Path(os.environ.get("A2V_RANKER_DATA_DIR", REPO_ROOT / "var" / "ranker")).resolve()


def default_rollout_store() -> Path:
    """The store the ranker loads bundles from (`A2V_RANKER_MODEL_STORE`, else the model store)."""
    env = os.environ.get("A2V_RANKER_MODEL_STORE")
    return Path(env).resolve() if env else default_model_store()


class AliasHistory(Protocol):
    def previous(self, target: str | None) -> list[str]:
        """Earlier alias targets (newest last), as recorded for `target`; [] when none or stale."""

    def record(self, target: str, previous: list[str]) -> None:
        """Record `previous` for `target`; called before the alias moves to `target`."""


class FileAliasHistory:
    """Embedded backend: a JSON file beside aliases.json, replaced atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def previous(self, target: str | None) -> list[str]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):  # damaged: no history (a rollback is refused, a promotion rewrites it)
            return []
        if not isinstance(doc, dict) or target is None or doc.get("target") != target:
            return []
        previous = doc.get("previous")
        return [v for v in previous if isinstance(v, str)] if isinstance(previous, list) else []

    def record(self, target: str, previous: list[str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({"target": target, "previous": previous}))
        os.replace(tmp, self.path)


class CollectionAliasHistory:
    """Qdrant server: the history is metadata of the target collection itself."""

    def __init__(self, client):  # qdrant_client.QdrantClient
        self.client = client

    def previous(self, target: str | None) -> list[str]:
        from .index.client import collection_name

        if target is None:
            return []
        metadata = self.client.get_collection(collection_name(target)).config.metadata or {}
        return list(metadata.get(HISTORY_KEY) or [])

    def record(self, target: str, previous: list[str]) -> None:
        from .index.client import _COMPLETE, collection_name

        # repeat the completeness flag: only complete versions are promoted, and this stays
        # correct whether the server merges or replaces collection metadata
        self.client.update_collection(collection_name(target), metadata={_COMPLETE: True, HISTORY_KEY: previous})


@dataclass(frozen=True)
class VersionRow:
    version: str
    bundle: bool  # a bundle directory with a manifest is in the store
    collection: bool  # a complete collection exists
    live: bool  # the alias points at it


class Rollout:
    """Rollout operations over one index (either backend) and one bundle store."""

    def __init__(self, index, history: AliasHistory, store: Path, where: str):
        self.index, self.history, self.store, self.where = index, history, Path(store), where

    def close(self) -> None:
        self.index.close()

    def build(self, version: str, device: str | None = None) -> tuple[bool, int]:
        """Build the collection of `version`; (built, points). (False, 0) when it already existed."""
        from .serving_model.model import (
            ServingModel,  # torch and the models: only to build
        )

        bundle = self._verified_bundle(version)
        if self.index.has_version(version):
            return False, 0
        model = ServingModel(bundle, device=device)
        points = (ItemPoint(int(a), model.item_tower[i], model.payload(i)) for i, a in enumerate(model.item_ids))
        try:
            return True, self.index.create_version(version, int(model.item_tower.shape[1]), points)
        except VersionExists:  # built by another process meanwhile: just as good
            return False, 0

    def promote(self, version: str) -> tuple[str | None, str]:
        """Point the alias at `version`; returns (old target, new target). An alias record that
        does not name a version is overwritten (with no history to roll back to)."""
        old = self._alias_or_none()
        self._check_promotable(version)
        if old == version:
            return old, version
        previous = ([*self.history.previous(old), old] if old else [])[-MAX_HISTORY:]
        self.history.record(version, previous)
        self.index.set_alias(version)
        return old, version

    def rollback(self) -> tuple[str, str]:
        """Point the alias back at the previous target; returns (old target, new target)."""
        try:
            old = self.index.alias_target()
        except AliasUnreadable as e:
            raise RolloutError(f"{e}: nothing to roll back from; promote a version to rewrite it") from None
        previous = self.history.previous(old)
        if old is None or not previous:
            raise RolloutError(
                f"nothing to roll back to: no earlier alias target recorded for {old or 'an unset alias'} "
                f"in {self.where}"
            )
        target = previous[-1]
        self._check_promotable(target)
        self.history.record(target, previous[:-1])
        self.index.set_alias(target)
        return old, target

    def versions(self) -> list[VersionRow]:
        bundles = [p.name for p in list_bundles(self.store)]
        collections = set(self.index.versions())
        live = self._alias_or_none()
        names = bundles + sorted(collections - set(bundles))
        return [VersionRow(v, v in bundles, v in collections, v == live) for v in names]

    def _alias_or_none(self) -> str | None:
        """The alias target; None when unset or when its record is damaged (the ranker moves a
        damaged one aside at start-up; a promotion overwrites it)."""
        try:
            return self.index.alias_target()
        except AliasUnreadable:
            return None

    def _verified_bundle(self, version: str):
        try:
            check_version(version)  # also keeps `version` a plain name inside the store
        except ValueError as e:
            raise RolloutError(str(e)) from e
        path = self.store / version
        if not path.is_dir():
            raise RolloutError(
                f"no bundle {version} in {self.store}; have {[p.name for p in list_bundles(self.store)]}"
            )
        try:
            bundle = load_bundle(path)
        except BundleError as e:
            raise RolloutError(f"bundle {version} does not verify: {e}") from e
        if bundle.version != version:
            raise RolloutError(f"{path} holds bundle version {bundle.version}, not {version}")
        return bundle

    def _check_promotable(self, version: str) -> None:
        self._verified_bundle(version)
        if not self.index.has_version(version):
            raise RolloutError(
                f"version {version} has no complete collection in {self.where}: run `anime2vec index {version}` first"
            )


def open_rollout(
    store: Path | None = None,
    data_dir: Path | None = None,
    qdrant_url: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 10.0,
) -> Rollout:
    """The ranker's own index: a Qdrant server when `qdrant_url` is set, else the embedded index
    under `<data_dir>/qdrant` (the ranker's layout)."""
    store = Path(store) if store else default_rollout_store()
    if qdrant_url:
        import math

        from qdrant_client import QdrantClient

        from .index.client import QdrantItemIndex

        client = QdrantClient(
            url=qdrant_url, api_key=api_key, timeout=max(1, math.ceil(timeout_s)), check_compatibility=False
        )
        return Rollout(QdrantItemIndex(client), CollectionAliasHistory(client), store, qdrant_url)
    from .index.edge import EdgeItemIndex

    root = Path(data_dir or default_ranker_data_dir()) / "qdrant"
    return Rollout(EdgeItemIndex(root), FileAliasHistory(root / HISTORY_FILE), store, str(root))
