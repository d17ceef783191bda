"""TF-IDF content features: DropoutNet's original item content (Volkovs et al. 2017 fed
TruncatedSVD-reduced TF-IDF of article text to the item tower), and the TF-IDF cosine baseline.

Persisted as one .npz of plain arrays plus a JSON string of parameters, so loading a model bundle
never unpickles (runs) anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

_FORMAT = "anime2vec.tfidf/1"


class TfidfFeatures:
    """Fit on a corpus, then: sparse L2-normalised TF-IDF rows (`transform`) and their SVD
    projection (`dense`). `max_df` drops boilerplate that most synopses share
    ("[Written by MAL Rewrite]" is in ~78% of them)."""

    def __init__(
        self,
        max_features: int = 8000,
        min_df: int = 2,
        max_df: float = 0.5,
        sublinear_tf: bool = True,
        svd_dim: int = 300,
        seed: int = 0,
    ):
        self.params: dict[str, Any] = dict(
            max_features=max_features,
            min_df=min_df,
            max_df=max_df,
            sublinear_tf=sublinear_tf,
            svd_dim=svd_dim,
            seed=seed,
        )
        self._vectorizer = self._make_vectorizer()
        self._svd: TruncatedSVD | None = None
        self.terms: np.ndarray | None = None  # (n_terms,) str, column order of `transform`

    def _make_vectorizer(self) -> TfidfVectorizer:
        p = self.params
        return TfidfVectorizer(
            max_features=p["max_features"],
            min_df=p["min_df"],
            max_df=p["max_df"],
            sublinear_tf=p["sublinear_tf"],
            stop_words="english",
            strip_accents="unicode",
            lowercase=True,
            norm="l2",
            dtype=np.float32,
        )

    @property
    def dim(self) -> int:
        return self.params["svd_dim"]

    def fit_transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """Learn vocabulary, idf and the SVD basis from `texts`; return their TF-IDF rows."""
        x = self._vectorizer.fit_transform(_as_texts(texts)).tocsr()
        self.terms = self._vectorizer.get_feature_names_out().astype(str)
        if self.dim >= len(self.terms):
            raise ValueError(
                f"svd_dim={self.dim} needs more than {self.dim} terms; the corpus of {x.shape[0]} texts "
                f"gave {len(self.terms)} (lower svd_dim or min_df)"
            )
        self._svd = TruncatedSVD(
            n_components=self.dim, algorithm="randomized", n_iter=7, random_state=self.params["seed"]
        )
        self._svd.fit(x)
        return x

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """(n, n_terms) float32 TF-IDF rows, each of L2 norm 1 (0 for a text with no known term)."""
        self._check_fitted()
        return self._vectorizer.transform(_as_texts(texts)).tocsr()

    def dense(self, x: sp.spmatrix) -> np.ndarray:
        """(n, svd_dim) float32 projection of TF-IDF rows onto the fitted SVD basis."""
        svd, _ = self._check_fitted()
        return svd.transform(x).astype(np.float32)

    def top_terms(self, x_row: sp.spmatrix | np.ndarray, k: int = 10) -> list[tuple[str, float]]:
        """The k highest-weighted terms of one TF-IDF row, best first (ties by term)."""
        _, terms = self._check_fitted()
        if sp.issparse(x_row) and not isinstance(x_row, np.ndarray):
            if x_row.shape[0] != 1:
                raise ValueError(f"top_terms takes one row, got shape {x_row.shape}")
            row = x_row.tocsr(copy=True)
            row.sum_duplicates()
            n_cols, cols, vals = row.shape[1], row.indices, row.data
        else:
            dense = np.asarray(x_row).reshape(-1)
            n_cols, cols = len(dense), np.flatnonzero(dense)
            vals = dense[cols]
        if n_cols != len(terms):
            raise ValueError(f"row has {n_cols} columns, the vocabulary {len(terms)}")
        keep = vals > 0
        pairs = sorted(zip(terms[cols[keep]], vals[keep].tolist()), key=lambda p: (-p[1], p[0]))
        return [(str(t), float(w)) for t, w in pairs[:k]]

    def save(self, file: str | Path | BinaryIO) -> None:
        """Write vocabulary, idf, SVD basis and parameters as one .npz of plain arrays."""
        svd, terms = self._check_fitted()
        np.savez(
            file,
            format=np.array(_FORMAT),
            params=np.array(json.dumps(self.params, sort_keys=True)),
            terms=terms,
            idf=self._vectorizer.idf_,
            components=svd.components_,
        )

    @classmethod
    def load(cls, file: str | Path | BinaryIO) -> "TfidfFeatures":
        with np.load(file, allow_pickle=False) as z:
            if "format" not in z or str(z["format"]) != _FORMAT:
                raise ValueError(f"{file}: not an {_FORMAT} file")
            self = cls(**json.loads(str(z["params"])))
            terms, idf, components = z["terms"], z["idf"], z["components"]
        if not (len(terms) == len(idf) == components.shape[1]) or components.shape[0] != self.dim:
            raise ValueError(
                f"{file}: inconsistent arrays (terms {len(terms)}, idf {len(idf)}, "
                f"components {components.shape}, svd_dim {self.dim})"
            )
        self.terms = terms.astype(str)
        self._vectorizer.vocabulary_ = {str(t): i for i, t in enumerate(self.terms)}
        self._vectorizer.idf_ = idf
        self._svd = TruncatedSVD(n_components=self.dim)
        self._svd.components_ = components
        self._svd.n_features_in_ = components.shape[1]
        return self

    def _check_fitted(self) -> tuple[TruncatedSVD, np.ndarray]:
        """The fitted SVD and vocabulary (`terms`)."""
        if self._svd is None or self.terms is None:
            raise RuntimeError("TfidfFeatures is not fitted: call fit_transform() or load() first")
        return self._svd, self.terms


def _as_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a sequence of texts, not one str")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
    return texts
