"""The serving model: one loaded bundle turned into the vectors a request needs.

Every query becomes one vector, so a single Qdrant search over the bundle's item vectors ranks
the whole catalogue, cold and warm items alike (models/hybrid.py):
  item   [β_cf·q ; β_ct·c·Wv ; pop ; onehot(group)]
  query  [α_cf·p ; α_ct·f ; α_pop ; group offsets]  with p = x·P (factored EASE) and f the
         standardised content query of z = unit(x·C)
where x is a history: a known user's training row (plus feedback, users.py), a list of
favourites (an anime added at serving time contributes its content row to z only), and C the
content rows [TF-IDF ; MiniLM ; metadata] (no MiniLM block in a quick bundle: manifest
"content"). Free text has only z (its TF-IDF and MiniLM blocks); an anime added through AddAnime
gets its content row from its text, encoding and metadata, and lands in the text group. The WMF fallback scores in memory (U·V over the bundle's items);
popularity needs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from anime2vec.bundle import Bundle
from anime2vec.features.metadata import ItemMetadata, content_block
from anime2vec.features.whiten import Whitener
from anime2vec.models.hybrid import WARM, Hybrid
from anime2vec.models.wmf import WMF

log = logging.getLogger(__name__)


@dataclass
class ItemMeta:
    """What the ranker knows about an anime that is not in the bundle arrays (added via UpsertAnime)."""

    anime_id: int
    content: np.ndarray  # in the bundle's `content` space: whitened MiniLM, or TF-IDF (explanations, diversity)
    payload: dict
    tfidf: np.ndarray | None = None  # dense TF-IDF projection of its text
    text: str = ""  # its synopsis (explanations name the terms it shares)
    row: np.ndarray | None = None  # the hybrid's content row [TF-IDF ; MiniLM ; metadata]
    vector: np.ndarray | None = None  # its serving vector, as written to the index


class ServingModel:
    def __init__(self, bundle: Bundle, device: str | None = None):
        m = bundle.manifest
        self.bundle = bundle
        self.version: str = m["version"]
        self.manifest = m
        self.item_ids = np.asarray(bundle.arrays["item_ids"], np.int64)
        self.pos = {int(a): i for i, a in enumerate(self.item_ids)}
        self.user_ids = np.asarray(bundle.arrays["user_ids"], np.int64)
        self.user_pos = {int(u): i for i, u in enumerate(self.user_ids)}
        self.catalog = bundle.catalog
        self._payloads: dict[int, dict] = {}
        # Plain Python columns: a request reads a few rows, and a pandas row lookup costs ~50 µs
        cat = self.catalog
        self.titles: list[str] = [str(t) for t in cat["title"]]
        self.genres: list[list[str]] = [[str(g) for g in (gs if gs is not None else [])] for gs in cat["genres"]]
        self.synopses: list[str] = (
            [x if isinstance(x, str) else "" for x in cat["synopsis"]] if "synopsis" in cat else [""] * len(cat)
        )
        self.content = np.asarray(bundle.arrays["content"], np.float32)
        # which blocks the hybrid's content rows hold, and which space `content` is in: a quick
        # bundle (`anime2vec train --quick`) has no MiniLM block, and TF-IDF vectors as `content`
        spec = m.get("content", {"blocks": ["tfidf", "minilm", "meta"], "space": "minilm"})
        self.content_blocks: list[str] = list(spec["blocks"])
        self.content_space: str = spec["space"]
        whitener = bundle.prefixed("whitener")
        self.whitener = Whitener.from_dict(whitener) if whitener else None
        train = bundle.train
        hp = m.get("hyperparameters", {})
        wmf_params = {
            k: v for k, v in hp.get("wmf", {}).items() if k in ("regularization", "alpha", "iterations", "seed")
        }
        self.wmf = WMF.from_factors(bundle.arrays["wmf_U"], bundle.arrays["wmf_V"], train, **wmf_params)
        self.train = train
        self.tfidf = None
        if (bundle.path / "tfidf.npz").is_file():
            from anime2vec.features.tfidf import TfidfFeatures

            self.tfidf = TfidfFeatures.load(bundle.path / "tfidf.npz")
        state = bundle.prefixed("hybrid")
        self.hybrid: Hybrid | None = None
        self.metadata: ItemMetadata | None = None
        if state and "hybrid" in hp and "metadata" in m:
            self.hybrid = Hybrid.from_state(state, hp["hybrid"], train, name=m.get("model", "anime2vec-hybrid"))
            self.metadata = ItemMetadata.from_dict(m["metadata"])
            self.item_tower = self.hybrid.serving_item_vectors(np.arange(len(self.item_ids)))
            self.warm = self.hybrid.group == WARM
        else:
            log.warning(
                "bundle %s has no hybrid arrays (an older bundle format): serving WMF and popularity only", self.version
            )
            self.item_tower = np.asarray(bundle.arrays["item_tower"], np.float32)
            self.warm = np.any(self.wmf.V != 0, axis=1)
        members = self.catalog["members"].fillna(0).to_numpy(np.float64) if "members" in self.catalog else None
        train_pop = np.asarray((train > 0).sum(axis=0)).ravel().astype(np.float64)
        # popularity prior: MAL members where known, training counts to break ties
        self.popularity = (members if members is not None else train_pop) + 1e-3 * train_pop

    # ---- item metadata -------------------------------------------------------------------
    def payload(self, i: int) -> dict:
        """Anime row i's index payload (a copy; built once: a pandas row lookup costs ~50 µs)."""
        cached = self._payloads.get(i)
        if cached is None:
            cached = self._payloads[i] = self._build_payload(i)
        return dict(cached)

    def _build_payload(self, i: int) -> dict:
        row = self.catalog.iloc[i]
        year = row.get("year")
        return {
            "anime_id": int(self.item_ids[i]),
            "title": str(row.get("title", "")),
            "genres": [str(g) for g in (row.get("genres") or [])],
            "type": str(row.get("type") or ""),
            "year": None if year is None or year != year else int(year),
            "members": int(row.get("members") or 0),
            "cold": not bool(self.warm[i]),
            "source": "bundle",
        }

    # ---- query vectors -----------------------------------------------------------------
    @property
    def has_vectors(self) -> bool:
        """Whether the bundle serves the hybrid's vectors (else only the in-memory fallbacks)."""
        return self.hybrid is not None

    has_dropoutnet = has_vectors  # the name older callers use

    def history_vector(
        self, history: sp.csr_matrix, request: str, n_liked: int, extra_content: np.ndarray | None = None
    ) -> np.ndarray:
        """The query vector of one history row ("users" or "favourites" weights)."""
        return self.listed_vector(history.indices, history.data, request, n_liked, extra_content)

    def listed_vector(
        self,
        rows: np.ndarray,
        weights: np.ndarray,
        request: str,
        n_liked: int,
        extra_content: np.ndarray | None = None,
    ) -> np.ndarray:
        """`history_vector` of the row with confidences `weights` at catalogue `rows` (in the CSR
        row's order): the same vector, bit for bit, without building the row."""
        assert self.hybrid is not None
        parts = self.hybrid.query_parts_listed(rows, weights, extra_content)
        return self.hybrid.serving_query_vectors(*parts, request, n_liked)[0]

    def favourites_vector(
        self, liked: list[int], weights: list[float] | None, extra: Mapping[int, ItemMeta] | None = None
    ) -> np.ndarray:
        """Query vector for a set of liked anime ids (bundle items and/or added anime)."""
        w_all = [1.0] * len(liked) if not weights else [float(x) for x in weights]
        listed = {a: w for a, w in zip(liked, w_all) if a in self.pos}
        outside = [
            (row, w)
            for a, w in zip(liked, w_all)
            if a not in self.pos and extra and a in extra and (row := extra[a].row) is not None
        ]
        # start: the zero the default 0 adds, as an array (typed, and the same sum bit for bit)
        z = sum((w * r for r, w in outside), np.zeros_like(outside[0][0])) if outside else None
        # the canonical CSR row's order: by catalogue row (one per anime: the dict kept the last weight)
        ordered = sorted((self.pos[a], w) for a, w in listed.items())
        idx = np.array([i for i, _ in ordered], np.int64)
        w = np.array([x for _, x in ordered], np.float32)
        return self.listed_vector(idx, w, "favourites", len(liked), z)

    def user_vector(self, user_id: int) -> np.ndarray:
        i = self.user_pos[user_id]
        at = slice(self.train.indptr[i], self.train.indptr[i + 1])  # the training row, as stored
        return self.listed_vector(self.train.indices[at], self.train.data[at], "users", at.stop - at.start)

    def whiten(self, raw: np.ndarray) -> np.ndarray | None:
        """Whitened encodings (n, dim); None for a bundle without a MiniLM block (no whitener)."""
        if self.whitener is None:
            return None
        return self.whitener.transform(np.atleast_2d(np.asarray(raw, np.float32)))

    def semantic_vector(self, minilm: np.ndarray | None, tfidf: np.ndarray | None) -> np.ndarray:
        """An anime's or a query's vector in the space of `content` (explanations, diversity):
        its whitened encoding, or its TF-IDF projection in a bundle without a MiniLM block."""
        if self.content_space == "minilm" and minilm is not None:
            return minilm
        if self.content_space == "tfidf" and tfidf is not None:
            return np.asarray(tfidf, np.float32)
        return np.zeros(self.content.shape[1], np.float32)

    def tfidf_vector(self, text: str | None) -> np.ndarray | None:
        """Dense TF-IDF projection of a text with the bundle's fitted vocabulary (None: unknown)."""
        if self.tfidf is None or not text:
            return None
        return self.tfidf.dense(self.tfidf.transform([text]))[0]

    def content_row(self, minilm: np.ndarray | None, tfidf: np.ndarray | None, fields: dict | None) -> np.ndarray:
        """The hybrid's content row of an anime outside the bundle (or a free-text query: no
        fields, its metadata block stays empty) from its whitened encoding (unused without a
        MiniLM block), TF-IDF projection and fields, built as the pipeline built the catalogue's."""
        assert self.hybrid is not None and self.metadata is not None
        metadata = self.metadata
        blocks = {
            "tfidf": lambda: (
                np.zeros(self.bundle.arrays["tfidf_content"].shape[1], np.float32) if tfidf is None else tfidf
            ),
            "minilm": lambda: np.atleast_2d(np.asarray(minilm)),  # asarray: as atleast_2d does, typed
            "meta": lambda: (
                np.zeros(metadata.dim, np.float32)
                if fields is None
                else metadata.row(fields.get("type"), fields.get("year"), fields.get("episodes"), fields.get("genres"))
            ),
        }
        return content_block([blocks[b]() for b in self.content_blocks])[0]

    def text_vector(self, raw: np.ndarray, text: str | None = None) -> np.ndarray:
        """Query vector of a free-text query from its raw encoder vector and text (the "text"
        weights: content alone)."""
        assert self.hybrid is not None
        w = self.whiten(raw)
        row = self.content_row(None if w is None else w[0], self.tfidf_vector(text), None)
        hy = self.hybrid
        assert hy.P is not None  # set by derive(), which loading a bundle runs
        z = row[None] / max(float(np.linalg.norm(row)), 1e-9)
        p = np.zeros((1, hy.P.shape[1]), np.float32)
        return hy.serving_query_vectors(p, hy.content_query(z), hy.text_query(z), "text", 0)[0]

    def item_vector(self, row: np.ndarray, i: int | None = None) -> np.ndarray:
        """Serving vector of an anime from its content row: a new anime (text group), or catalogue
        anime `i` with replaced text (it keeps its audience)."""
        assert self.hybrid is not None
        return self.hybrid.serving_item_vectors(None if i is None else [i], np.atleast_2d(row))[0]

    # ---- fallbacks (in memory, bundle items only) -----------------------------------------
    def wmf_scores_favourites(self, liked: list[int], weights: list[float] | None) -> np.ndarray | None:
        idx = [self.pos[a] for a in liked if a in self.pos and self.warm[self.pos[a]]]
        if not idx:
            return None
        w = (
            np.ones(len(idx), np.float32)
            if not weights
            else np.asarray(
                [wt for a, wt in zip(liked, weights) if a in self.pos and self.warm[self.pos[a]]], np.float32
            )
        )
        h = sp.csr_matrix((w, (np.zeros(len(idx), int), idx)), shape=(1, len(self.item_ids)))
        u = self.wmf.fold_in(h)[0]
        return self.wmf.V @ u

    def wmf_scores_user(self, user_id: int) -> np.ndarray | None:
        assert self.wmf.U is not None  # WMF.from_factors sets the factors
        u = self.wmf.U[self.user_pos[user_id]]
        return None if not np.any(u) else self.wmf.V @ u
