"""Synthetic interactions shaped like the real MAL data, for scale curves beyond it.

Shape, measured on the real positives by `real_shape` (or the constants below when the data is not
there): the item popularity curve (positives by popularity rank, as a fraction of the catalogue;
a power law over most of its range, flatter at the head) and the distribution of positives per
user, both kept as quantile tables and stretched to any catalogue or user count, plus the real
confidences' empirical distribution. Each user draws that many items from the popularity curve
(repeats dropped, as a real list drops re-watches).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

_CURVE_POINTS = 40  # popularity curve: log-spaced rank fractions
_ACTIVITY_POINTS = 101  # activity: percentiles 0..100


@dataclass
class Shape:
    rank_fraction: list[float]  # popularity curve x: rank / items, log-spaced in (0, 1]
    log_share: list[float]  # popularity curve y: log(positives of that rank / all positives × items)
    activity_quantiles: list[float]  # positives per user at percentiles 0, 1, ..., 100
    confidence_values: list[float]
    confidence_probs: list[float]
    popularity_exponent: float  # a of count ∝ rank^-a over the body of the curve (for the report)
    source: str = "constants"
    real: dict = field(default_factory=dict)  # the real data's sizes, for reference

    def to_dict(self) -> dict:
        return asdict(self)

    def item_weights(self, n_items: int) -> np.ndarray:
        """Relative popularity of ranks 1..n_items (the real curve stretched to n_items)."""
        x = np.log((np.arange(n_items) + 0.5) / n_items)
        w = np.exp(np.interp(x, np.log(self.rank_fraction), self.log_share))
        return w / w.sum()

    def activity(self, rng: np.random.Generator, n_users: int) -> np.ndarray:
        q = np.asarray(self.activity_quantiles, np.float64)
        return np.interp(rng.random(n_users) * 100, np.linspace(0, 100, len(q)), q)


def fit_power_law(counts: np.ndarray) -> float:
    """a of count ∝ rank^-a, least squares in log-log over the body of the curve (ranks 10 to the
    last item with at least 2 positives): the head and the singletons' tail bend any power law."""
    c = np.sort(np.asarray(counts, np.float64))[::-1]
    c = c[c > 0]
    last = max(int(np.searchsorted(-c, -2.0, side="right")), 12)
    ranks = np.arange(1, len(c) + 1)[10:last]
    slope = np.polyfit(np.log(ranks), np.log(c[10:last]), 1)[0]
    return float(-slope)


def shape_from_positives(user_idx: np.ndarray, item_idx: np.ndarray, confidence: np.ndarray, source: str) -> Shape:
    per_item = np.sort(np.bincount(item_idx).astype(np.float64))[::-1]
    per_item = per_item[per_item > 0]
    per_user = np.bincount(user_idx)
    per_user = per_user[per_user > 0]
    n = len(per_item)
    ranks = np.unique(np.geomspace(1, n, _CURVE_POINTS).round().astype(int))
    values, counts = np.unique(np.round(confidence.astype(np.float64), 2), return_counts=True)
    return Shape(
        rank_fraction=((ranks - 0.5) / n).tolist(),
        log_share=np.log(per_item[ranks - 1] / per_item.sum() * n).tolist(),
        activity_quantiles=np.percentile(per_user, np.linspace(0, 100, _ACTIVITY_POINTS)).tolist(),
        confidence_values=values.tolist(),
        confidence_probs=(counts / counts.sum()).tolist(),
        popularity_exponent=fit_power_law(per_item),
        source=source,
        real={
            "users": int(len(per_user)),
            "items_with_positive": int(n),
            "positives": int(len(user_idx)),
            "mean_per_user": float(per_user.mean()),
            "median_per_user": float(np.median(per_user)),
        },
    )


def real_shape(data_dir=None) -> Shape:
    """The shape of the real positives (full data), or DEFAULT_SHAPE when it cannot be read."""
    try:
        from anime2vec.data.loader import load_mal

        inter = load_mal(data_dir).interactions
    except Exception:  # no data on this machine: the constants measured on it stand in
        return DEFAULT_SHAPE
    pos = inter[inter["positive"]]
    users = pos["user_id"].astype("category").cat.codes.to_numpy()
    items = pos["anime_id"].astype("category").cat.codes.to_numpy()
    return shape_from_positives(users, items, pos["confidence"].to_numpy(), "full data (measured this run)")


# Measured on the full data by real_shape() (2026-11-23); stands in when ../shared/data/mal is absent.
DEFAULT_SHAPE = Shape(
    rank_fraction=[
        2.651e-05,
        7.952e-05,
        0.0001325,
        0.0001856,
        0.0002386,
        0.0002916,
        0.0003976,
        0.0005037,
        0.0006097,
        0.0008218,
        0.001087,
        0.001405,
        0.001776,
        0.002306,
        0.002995,
        0.003844,
        0.004957,
        0.006389,
        0.008244,
        0.01063,
        0.01365,
        0.01758,
        0.02266,
        0.02919,
        0.03756,
        0.04832,
        0.06222,
        0.08008,
        0.1031,
        0.1327,
        0.1708,
        0.2199,
        0.283,
        0.3643,
        0.4689,
        0.6036,
        0.7769,
        1,
    ],
    log_share=[
        4.432,
        4.196,
        4.127,
        4.08,
        4.065,
        4.03,
        4.017,
        3.956,
        3.924,
        3.796,
        3.725,
        3.644,
        3.564,
        3.457,
        3.361,
        3.262,
        3.161,
        3.025,
        2.912,
        2.784,
        2.624,
        2.458,
        2.283,
        2.074,
        1.872,
        1.619,
        1.353,
        1.041,
        0.703,
        0.3217,
        -0.09276,
        -0.6126,
        -1.139,
        -1.624,
        -2.317,
        -2.605,
        -3.704,
        -3.704,
    ],
    activity_quantiles=[
        1,
        1,
        1,
        2,
        2,
        2,
        3,
        4,
        4,
        5,
        5,
        6,
        7,
        8,
        8,
        9,
        10,
        11,
        12,
        13,
        13,
        14,
        15,
        17,
        17,
        18,
        20,
        20,
        22,
        23,
        25,
        26,
        27,
        29,
        30,
        32,
        33,
        35,
        36,
        38,
        40,
        41,
        43,
        45,
        46,
        48,
        50,
        52,
        55,
        56,
        59,
        61,
        63,
        66,
        68,
        70,
        73,
        75,
        78,
        80,
        83,
        86,
        89,
        92,
        95,
        99,
        102,
        106,
        109,
        112,
        116,
        121,
        125.8,
        130,
        135,
        140,
        144,
        150,
        156,
        164,
        170,
        178,
        186,
        193,
        201.5,
        212.9,
        222,
        232,
        244,
        256.8,
        272,
        294,
        314,
        338,
        366,
        404.6,
        452,
        503,
        595.3,
        773.1,
        1.23e04,
    ],
    confidence_values=[0.5, 0.9, 1, 1.3, 1.7, 1.8, 2.1, 2.5, 2.6, 3.4, 4.2, 5],
    confidence_probs=[
        0.0108,
        0.0003565,
        0.2237,
        0.0006895,
        0.0004976,
        0.09052,
        0.0002573,
        0.000209,
        0.1821,
        0.2091,
        0.1572,
        0.1246,
    ],
    popularity_exponent=1.569,
    source="constants (full data, measured 2026-11-23)",
    real={
        "users": 6448,
        "items_with_positive": 18862,
        "positives": 765729,
        "mean_per_user": 118.75,
        "median_per_user": 59.0,
    },
)


def interactions(shape: Shape, n_users: int, n_items: int, seed: int = 0) -> sp.csr_matrix:
    """(n_users, n_items) float32 confidence matrix with the shape's statistics."""
    rng = np.random.default_rng(seed)
    per_user = np.clip(np.rint(shape.activity(rng, n_users)), 1, max(1, n_items // 2)).astype(np.int64)
    cdf = np.cumsum(shape.item_weights(n_items))
    cdf /= cdf[-1]
    by_rank = rng.permutation(n_items)  # which item id has popularity rank r
    nnz = int(per_user.sum())
    rows = np.repeat(np.arange(n_users, dtype=np.int64), per_user)
    cols = by_rank[np.minimum(np.searchsorted(cdf, rng.random(nnz)), n_items - 1)]
    keys = np.sort(rows * n_items + cols)  # drop repeated draws (np.unique hashes: slower here)
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    rows, cols = keys // n_items, keys % n_items
    data = rng.choice(
        np.asarray(shape.confidence_values, np.float32),
        size=len(keys),
        p=np.asarray(shape.confidence_probs) / np.sum(shape.confidence_probs),
    )
    indptr = np.zeros(n_users + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
    index_dtype = np.int32 if len(keys) < 2**31 else np.int64
    return sp.csr_matrix((data, cols.astype(index_dtype), indptr.astype(index_dtype)), shape=(n_users, n_items))


def item_vectors(n_items: int, dim: int, seed: int = 0) -> np.ndarray:
    """Served-like item vectors: random directions with a popularity-like spread of norms."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n_items, dim), dtype=np.float32)
    v *= rng.lognormal(0.0, 0.3, (n_items, 1)).astype(np.float32)
    return v
