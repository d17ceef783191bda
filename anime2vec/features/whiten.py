"""Undo the anisotropy of sentence embeddings before cosine similarity.

Sentence-encoder vectors share one dominant direction, so the cosine of two unrelated synopses is
far above 0 and the mean of many liked shows drifts toward that common direction (a generic
"anime" vector). Subtracting the corpus mean removes it ("center"); PCA whitening (Su et al. 2021,
"Whitening sentence representations") also equalises the variance of the remaining directions
and can drop the weakest ones (`dim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("center", "pca_whiten")


@dataclass(frozen=True)
class Whitener:
    """x ↦ normalise((x - mean) @ projection); projection is None for mode "center"."""

    mode: str
    mean: np.ndarray  # (d,)
    projection: np.ndarray | None = None  # (d, k)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        if self.mean.ndim != 1:
            raise ValueError(f"mean has shape {self.mean.shape}, expected (d,)")
        if (self.projection is None) != (self.mode == "center"):
            raise ValueError(f"mode {self.mode!r} {'takes no' if self.mode == 'center' else 'needs a'} projection")
        if self.projection is not None and (
            self.projection.ndim != 2 or self.projection.shape[0] != self.mean.shape[0]
        ):
            raise ValueError(f"projection has shape {self.projection.shape}, expected ({self.mean.shape[0]}, k)")

    @classmethod
    def fit(cls, X: np.ndarray, mode: str = "center", dim: int | None = None, eps: float = 1e-6) -> "Whitener":
        """Fit on the rows of X (n, d): the item vectors of the training catalogue.

        pca_whiten keeps the `dim` leading principal directions (default: all that the data
        spans, at most n - 1) and scales each to unit variance; eps guards near-zero variances.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < 2:
            raise ValueError(f"fit needs a 2-D array of at least 2 rows, got shape {X.shape}")
        mean = X.mean(axis=0)
        if mode == "center":
            if dim is not None:
                raise ValueError("dim applies to mode 'pca_whiten' only")
            return cls(mode, mean.astype(np.float32))
        if mode != "pca_whiten":
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        n, d = X.shape
        max_dim = min(n - 1, d)
        k = max_dim if dim is None else dim
        if not 1 <= k <= max_dim:
            raise ValueError(f"dim={dim} must be in [1, {max_dim}] for {n} rows of dimension {d}")
        _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
        variance = s[:k] ** 2 / (n - 1)
        projection = vt[:k].T / np.sqrt(variance + eps)
        return cls(mode, mean.astype(np.float32), projection.astype(np.float32))

    @property
    def dim(self) -> int:
        """Output dimension."""
        return self.mean.shape[0] if self.projection is None else self.projection.shape[1]

    def transform(self, X: np.ndarray) -> np.ndarray:
        """(n, dim) float32 unit rows (a row equal to the mean maps to zeros)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.mean.shape[0]:
            raise ValueError(f"X has shape {X.shape}, expected (n, {self.mean.shape[0]})")
        Y = X - self.mean
        if self.projection is not None:
            Y = Y @ self.projection
        norms = np.linalg.norm(Y, axis=1, keepdims=True)
        return np.divide(Y, norms, out=np.zeros_like(Y), where=norms > 0)

    def to_dict(self) -> dict:
        """Plain numpy arrays and a str, for a bundle's .npz."""
        d = {"mode": self.mode, "mean": self.mean}
        if self.projection is not None:
            d["projection"] = self.projection
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Whitener":
        projection = d.get("projection")
        return cls(
            str(d["mode"]),
            np.asarray(d["mean"], dtype=np.float32),
            None if projection is None else np.asarray(projection, dtype=np.float32),
        )
