"""The gateway's copy of the ranker's catalogue, for title resolution.

A `Catalogue` is an immutable snapshot: the entries of one model version (bundle catalogue plus
added anime) and a `TitleIndex` over them. `CatalogueSync` keeps the current snapshot fresh from a
background thread, never on the request path: it polls the ranker's GetModelInfo and rebuilds from
ListCatalog when the model version or the item count changed (a promotion, or anime added through
another gateway replica), and it wakes early when a response names another version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
import pandas as pd
from rapidfuzz import fuzz, process, utils

from anime2vec.serving.errors import unavailable
from anime2vec.v1 import common_pb2, ranker_pb2

from .filters import Facets
from .titles import TitleIndex

log = logging.getLogger("services.gateway.catalog")

_COLUMNS = ("title", "title_english", "title_japanese", "synonyms", "members", "type", "year", "genres")
_RETRY_S = 1.0  # how soon to try again while no snapshot could be loaded


def _row(e: ranker_pb2.CatalogEntry) -> dict:
    return {
        "title": e.title,
        "title_english": e.title_english,
        "title_japanese": e.title_japanese,
        "synonyms": tuple(e.synonyms),
        "members": int(e.members),
        "type": e.type,
        "year": int(e.year) if e.HasField("year") else None,
        "genres": tuple(e.genres),
    }


@dataclass(frozen=True)
class Catalogue:
    version: str
    frame: pd.DataFrame  # index anime_id; the _COLUMNS
    index: TitleIndex
    titles: dict[int, str]  # anime_id → title: every favourites request names its anime (a frame lookup is ~50 µs)
    filterable: Facets  # the genres, types and years filters can match

    @classmethod
    def build(cls, version: str, rows: dict[int, dict]) -> "Catalogue":
        frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(_COLUMNS))
        frame.index = frame.index.astype("int64")
        frame["year"] = frame["year"].astype("Int64")
        frame.index.name = "anime_id"
        return cls(
            version, frame, TitleIndex(frame), {int(a): str(t) for a, t in frame["title"].items()}, Facets.of(frame)
        )

    @classmethod
    def from_entries(cls, version: str, entries: Iterable[ranker_pb2.CatalogEntry]) -> "Catalogue":
        return cls.build(version, {int(e.anime_id): _row(e) for e in entries})

    def __len__(self) -> int:
        return len(self.frame)

    def __contains__(self, anime_id: int) -> bool:
        return anime_id in self.frame.index

    def title(self, anime_id: int) -> str:
        return self.titles.get(anime_id, "")

    def facets(self, anime_id: int) -> dict:
        """type (str), year (int or None), members (int) and genres (tuple) of a listed anime."""
        row = self.frame.loc[anime_id]
        return {
            "type": row["type"] or "",
            "year": None if pd.isna(row["year"]) else int(row["year"]),
            "members": int(row["members"] or 0),
            "genres": row["genres"],
        }

    def matched_name(self, anime_id: int, query: str) -> str:
        """Which of the anime's names the query matched best (main, English, Japanese, synonym)."""
        row = self.frame.loc[anime_id]
        names = [n for n in (row["title"], row["title_english"], row["title_japanese"], *row["synonyms"]) if n]
        best = process.extractOne(query, names, scorer=fuzz.token_sort_ratio, processor=utils.default_process)
        return best[0] if best else str(row["title"])

    def with_entry(self, entry: ranker_pb2.CatalogEntry) -> "Catalogue":
        """A new snapshot with `entry` added or replaced (same version)."""
        rows = self.frame.to_dict(orient="index")
        row = _row(entry)
        old = rows.get(int(entry.anime_id))
        if old is not None and not row["members"]:  # the ranker keeps a replaced anime's popularity
            row["members"] = old["members"]
        rows[int(entry.anime_id)] = row
        return Catalogue.build(self.version, rows)


def entry_from_input(anime_id: int, a: common_pb2.AnimeInput) -> ranker_pb2.CatalogEntry:
    """The catalogue entry an AddAnime request creates, as the ranker will list it."""
    e = ranker_pb2.CatalogEntry(
        anime_id=anime_id,
        title=a.title.strip(),
        title_english=a.title_english.strip(),
        synonyms=list(a.synonyms),
        members=a.members,
        type=a.type,
        genres=[g.strip() for g in a.genres],
    )
    if a.HasField("year"):
        e.year = a.year
    return e


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


class CatalogueSync:
    """fetch_info() → ModelInfo and fetch_page(token) → ListCatalogResponse call the ranker (they
    raise grpc.RpcError or ServiceError); on_loaded(info) runs after each successful (re)build."""

    def __init__(
        self,
        fetch_info: Callable[[], common_pb2.ModelInfo],
        fetch_page: Callable[[str], ranker_pb2.ListCatalogResponse],
        poll_s: float,
        on_loaded: Callable[[common_pb2.ModelInfo], None] = lambda info: None,
    ):
        self._fetch_info, self._fetch_page, self.poll_s, self._on_loaded = fetch_info, fetch_page, poll_s, on_loaded
        self._current: Catalogue | None = None
        self._lock = threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="catalogue-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def current(self) -> Catalogue | None:
        return self._current

    def get(self) -> Catalogue:
        """The current snapshot, or UNAVAILABLE while none has loaded yet."""
        c = self._current
        if c is None:
            raise unavailable(
                "the title index is not loaded yet (waiting for the ranker's catalogue); "
                "refer to anime by id or retry shortly",
                reason="CATALOG_NOT_LOADED",
                retry_after_s=2.0,
            )
        return c

    def notice_version(self, version: str) -> None:
        """A response was served by `version`: refresh soon if that is not the snapshot's."""
        c = self._current
        if version and (c is None or c.version != version):
            self._wake.set()

    def add(self, entry: ranker_pb2.CatalogEntry, version: str) -> None:
        """Make an anime just added through this gateway resolvable at once."""
        with self._lock:
            c = self._current
            if c is not None and c.version == version:
                self._current = c.with_entry(entry)
            else:
                self._wake.set()  # the snapshot is of another version anyway: rebuild

    def refresh_if_changed(self) -> bool:
        """One poll: rebuild when the ranker's version or item count differs. True if rebuilt."""
        info = self._fetch_info()
        c = self._current
        if c is not None and c.version == info.version and len(c) == info.n_items:
            return False
        entries, token, version = [], "", None
        while True:
            page = self._fetch_page(token)
            if version is None:
                version = page.model_version
            elif page.model_version != version:
                raise RuntimeError(f"model version changed from {version} to {page.model_version} while paging")
            entries.extend(page.entries)
            token = page.next_page_token
            if not token:
                break
        fresh = Catalogue.from_entries(version, entries)
        with self._lock:
            self._current = fresh
        log.info("title index built", extra={"version": version, "entries": len(fresh)})
        self._on_loaded(info)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh_if_changed()
            except Exception as e:  # ranker down, version moved mid-way, ...: keep the old snapshot
                log.warning("cannot refresh the title index: %s", _describe(e))
            self._wake.wait(self.poll_s if self._current is not None else _RETRY_S)
            self._wake.clear()
