"""Pure ranking helpers: request validation, filters over the in-memory catalogue, MMR and
dislike re-ranking (explanations: explanations.py). No gRPC, no Qdrant: unit-testable on arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from anime2vec.index.base import SearchFilter
from anime2vec.models.mmr import cosine_matrix, mmr_order
from anime2vec.serving.errors import invalid_argument
from anime2vec.v1 import common_pb2

MAX_FILTER_VALUES = 50
MAX_FILTER_CHARS = 100
YEAR_RANGE = (1900, 2100)


@dataclass
class Candidate:
    anime_id: int
    score: float
    payload: dict
    content: np.ndarray | None = None  # whitened content vector (MMR, explanations)
    reasons: list = field(default_factory=list)


_STRATEGIES = frozenset(common_pb2.Strategy.values())


def validate_options(
    opts: common_pb2.RecommendOptions, default_limit: int, max_limit: int, max_ids: int
) -> tuple[int, float]:
    """(limit, diversity) or INVALID_ARGUMENT naming every bad field."""
    bad: list[tuple[str, str]] = []
    limit = opts.limit or default_limit
    if opts.limit < 0:
        bad.append(("options.limit", f"must be >= 0 (0 means the default {default_limit}), got {opts.limit}"))
    elif limit > max_limit:
        bad.append(("options.limit", f"at most {max_limit}, got {opts.limit}"))
    d = opts.diversity
    if not math.isfinite(d) or d < 0 or d > 1:
        bad.append(("options.diversity", f"must be in [0, 1], got {d}"))
    if opts.strategy not in _STRATEGIES:
        bad.append(("options.strategy", f"unknown strategy {opts.strategy}"))
    f = opts.filters
    for name in ("include_genres", "exclude_genres", "types"):
        values = list(getattr(f, name))
        if len(values) > MAX_FILTER_VALUES:
            bad.append((f"options.filters.{name}", f"at most {MAX_FILTER_VALUES} values, got {len(values)}"))
        for i, v in enumerate(values[:MAX_FILTER_VALUES]):
            if not v.strip() or len(v) > MAX_FILTER_CHARS:
                bad.append((f"options.filters.{name}[{i}]", f"must be 1-{MAX_FILTER_CHARS} non-blank characters"))
    for name in ("year_min", "year_max"):
        if f.HasField(name) and not YEAR_RANGE[0] <= getattr(f, name) <= YEAR_RANGE[1]:
            bad.append(
                (f"options.filters.{name}", f"must be in {YEAR_RANGE[0]}..{YEAR_RANGE[1]}, got {getattr(f, name)}")
            )
    if f.HasField("year_min") and f.HasField("year_max") and f.year_min > f.year_max:
        bad.append(("options.filters.year_min", f"{f.year_min} is after year_max {f.year_max}"))
    if len(f.exclude_ids) > max_ids:
        bad.append(("options.filters.exclude_ids", f"at most {max_ids} ids, got {len(f.exclude_ids)}"))
    if bad:
        raise invalid_argument(bad)
    return limit, float(d)


def search_filter(f: common_pb2.Filters, excluded: set[int]) -> SearchFilter:
    return SearchFilter(
        include_genres=tuple(g.strip() for g in f.include_genres),
        exclude_genres=tuple(g.strip() for g in f.exclude_genres),
        types=tuple(t.strip() for t in f.types),
        year_min=f.year_min if f.HasField("year_min") else None,
        year_max=f.year_max if f.HasField("year_max") else None,
        exclude_ids=tuple(sorted(excluded | set(f.exclude_ids))),
        cold_only=f.cold_start_only,
    )


class CatalogueFilter:
    """The same filter semantics as the Qdrant payload filter, over the bundle's items in numpy
    (for the WMF and popularity fallbacks, which rank in memory). `cold` marks the items the model
    has no interactions for (the payload's "cold"); None: none is cold."""

    def __init__(self, item_ids: np.ndarray, genres: list, types: list, years: list, cold: np.ndarray | None = None):
        self.item_ids = item_ids
        self.cold = np.zeros(len(item_ids), bool) if cold is None else np.asarray(cold, bool)
        vocab = sorted({g.casefold() for gs in genres for g in gs})
        self.genre_col = {g: j for j, g in enumerate(vocab)}
        self.genre = np.zeros((len(item_ids), max(len(vocab), 1)), bool)
        for i, gs in enumerate(genres):
            for g in gs:
                self.genre[i, self.genre_col[g.casefold()]] = True
        self.types = np.array([(t or "").casefold() for t in types])
        self.years = np.array([np.nan if y is None or y != y else float(y) for y in years])
        self.pos = {int(a): i for i, a in enumerate(item_ids)}

    def _any_genre(self, names) -> np.ndarray:
        cols = [self.genre_col[g.casefold()] for g in names if g.casefold() in self.genre_col]
        # numpy's stubs type .any(axis=...) as bool | array; row-wise over a 2-d array it is an array
        return self.genre[:, cols].any(axis=1) if cols else np.zeros(len(self.item_ids), bool)  # type: ignore[return-value]

    def mask(self, f: SearchFilter) -> np.ndarray:
        m = np.ones(len(self.item_ids), bool)
        if f.include_genres:
            m &= self._any_genre(f.include_genres)
        if f.exclude_genres:
            m &= ~self._any_genre(f.exclude_genres)
        if f.types:
            m &= np.isin(self.types, [t.casefold() for t in f.types])
        if f.year_min is not None:
            m &= self.years >= f.year_min  # NaN compares False: unknown years drop out
        if f.year_max is not None:
            m &= self.years <= f.year_max
        if f.cold_only:
            m &= self.cold
        idx = [self.pos[a] for a in f.exclude_ids if a in self.pos]
        m[idx] = False
        return m


def reranked(diversity: float, n_disliked: int) -> str:
    """ServedBy.reranked: how the re-rank changed the score order ("" when it did not run)."""
    parts = ([f"diversity {diversity:g} (maximal marginal relevance)"] if diversity > 0 else []) + (
        [f"away from {n_disliked} disliked anime"] if n_disliked else []
    )
    return " and ".join(parts)


def mmr(
    cands: list[Candidate], diversity: float, dislikes: np.ndarray | None = None, dislike_weight: float = 0.5
) -> list[Candidate]:
    """Maximal marginal relevance over content vectors with λ = diversity (anime2vec.models.mmr,
    the implementation the offline trade-off curve measures). Disliked items' content is a
    standing penalty: dislike_weight × the candidate's largest positive cosine to a disliked
    anime, off the normalised relevance. Deterministic: ties break by input order."""
    if not cands:
        return []
    s = np.array([c.score for c in cands], np.float64)
    X = np.stack([c.content if c.content is not None else np.zeros_like(_first_content(cands)) for c in cands])
    penalty = None
    if dislikes is not None and len(dislikes):
        X_unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-9)
        D = dislikes / np.maximum(np.linalg.norm(dislikes, axis=1, keepdims=True), 1e-9)
        penalty = dislike_weight * np.clip(X_unit @ D.T, 0, None).max(axis=1)
    sim = cosine_matrix(X) if diversity > 0 else None
    order = mmr_order(s, sim, diversity, penalty=penalty)
    return [cands[i] for i in order if i >= 0]


def _first_content(cands: list[Candidate]) -> np.ndarray:
    for c in cands:
        if c.content is not None:
            return c.content
    return np.zeros(1, np.float32)
