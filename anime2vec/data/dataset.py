"""Indexed interaction matrices and the evaluation splits (DESIGN: evaluation protocol).

Item universe: catalogue anime with text (a synopsis). User universe: users with positives on it.
Splits, all from one seed:
- cold items: items with at least one positive are split 8:1:1 into train / val / test items;
  val and test items have no interaction in `train`. Items with text but no positive at all are
  in none of the three but stay candidates in whole-catalogue rankings (they are real cold items).
- users: 80% train users, 10% val users, 10% test users. Val/test users are absent from `train`
  (their rows are empty) and are the favourites / cold-user queries (`heldout`).
- warm: of each train user's positives on train items, 10% go to `warm_val` and 20% to
  `warm_test`; the rest is `train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class Dataset:
    item_ids: np.ndarray  # (n_items,) anime ids; position = item index
    user_ids: np.ndarray  # (n_users,) user ids; position = user index
    train_items: np.ndarray  # item indices (cold split)
    val_items: np.ndarray
    test_items: np.ndarray
    train_users: np.ndarray  # user indices (user split)
    val_users: np.ndarray
    test_users: np.ndarray
    train: sp.csr_matrix  # (n_users, n_items) float32 confidence: train users x train items minus warm holdout
    warm_val: sp.csr_matrix  # held-out positives of train users on train items
    warm_test: sp.csr_matrix
    cold_val: sp.csr_matrix  # positives of train users on val items
    cold_test: sp.csr_matrix  # positives of train users on test items
    heldout: sp.csr_matrix  # positives (confidence) of val/test users on train items
    seed: int = 0
    params: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def popularity(self) -> np.ndarray:
        """Training positives per item (0 for val/test items by construction)."""
        return np.asarray((self.train > 0).sum(axis=0)).ravel().astype(np.float32)

    def item_index(self) -> dict[int, int]:
        return {int(a): i for i, a in enumerate(self.item_ids)}

    def describe(self) -> dict:
        return {
            "seed": self.seed,
            "users": self.n_users,
            "items": self.n_items,
            "train_items": len(self.train_items),
            "val_items": len(self.val_items),
            "test_items": len(self.test_items),
            "train_users": len(self.train_users),
            "val_users": len(self.val_users),
            "test_users": len(self.test_users),
            "train_nnz": int(self.train.nnz),
            "warm_val_nnz": int(self.warm_val.nnz),
            "warm_test_nnz": int(self.warm_test.nnz),
            "cold_val_nnz": int(self.cold_val.nnz),
            "cold_test_nnz": int(self.cold_test.nnz),
            "heldout_nnz": int(self.heldout.nnz),
            **self.params,
        }


def _csr(users, items, vals, shape) -> sp.csr_matrix:
    m = sp.csr_matrix((np.asarray(vals, np.float32), (users, items)), shape=shape, dtype=np.float32)
    m.sum_duplicates()
    m.sort_indices()
    return m


@dataclass
class ExternalSplit:
    """A split supplied from outside (another protocol, a benchmark's fixed split): anime ids for the
    cold-item split and user ids for the user split. Items with positives that no list names take
    no part (neither trained on nor evaluated); users likewise. The warm holdout of training users
    is still drawn with the seed. `from_json`: {"train_items": [...], "val_items": [...],
    "test_items": [...], "train_users": [...], "val_users": [...], "test_users": [...]}."""

    train_items: np.ndarray
    val_items: np.ndarray
    test_items: np.ndarray
    train_users: np.ndarray
    val_users: np.ndarray
    test_users: np.ndarray

    @classmethod
    def from_json(cls, path) -> "ExternalSplit":
        import json
        from pathlib import Path

        d = json.loads(Path(path).read_text())
        missing = [k for k in cls.__dataclass_fields__ if k not in d]
        if missing:
            raise ValueError(f"{path}: the split lacks {missing}")
        return cls(**{k: np.asarray(d[k], np.int64) for k in cls.__dataclass_fields__})

    def validate(self) -> None:
        for kind in ("items", "users"):
            parts = [set(np.asarray(getattr(self, f"{s}_{kind}")).tolist()) for s in ("train", "val", "test")]
            if parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]:
                raise ValueError(f"external split: train/val/test {kind} overlap")


def build_dataset(
    catalog,
    interactions,
    seed: int = 0,
    split: ExternalSplit | None = None,
    item_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    user_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    warm_fractions: tuple[float, float] = (0.1, 0.2),
    min_user_positives: int = 2,
) -> Dataset:
    """Index the positives and cut every split from one seeded generator (see module docstring)."""
    rng = np.random.default_rng(seed)
    has_text = catalog["synopsis"].astype(str).str.strip().str.len() > 0
    item_ids = np.asarray(catalog.index[has_text], dtype=np.int64)
    item_ids.sort()
    item_pos = {int(a): i for i, a in enumerate(item_ids)}

    pos = interactions[interactions["positive"]]
    pos = pos[pos["anime_id"].isin(item_pos)]
    counts = pos.groupby("user_id").size()
    keep_users = counts.index[counts >= min_user_positives]
    pos = pos[pos["user_id"].isin(keep_users)]
    user_ids = np.sort(np.asarray(keep_users, dtype=np.int64))
    u = np.searchsorted(user_ids, pos["user_id"].to_numpy())
    i = np.fromiter((item_pos[int(a)] for a in pos["anime_id"].to_numpy()), np.int64, len(pos))
    c = pos["confidence"].to_numpy(np.float32)
    n_users, n_items = len(user_ids), len(item_ids)

    # cold-item split over items that have at least one positive
    observed = np.unique(i)
    if split is None:
        perm = rng.permutation(observed)
        n_tr = int(round(item_fractions[0] * len(perm)))
        n_va = int(round(item_fractions[1] * len(perm)))
        train_items, val_items, test_items = (
            np.sort(perm[:n_tr]),
            np.sort(perm[n_tr : n_tr + n_va]),
            np.sort(perm[n_tr + n_va :]),
        )
    else:
        split.validate()
        train_items, val_items, test_items = (
            np.sort(np.asarray([item_pos[int(a)] for a in ids if int(a) in item_pos], np.int64))
            for ids in (split.train_items, split.val_items, split.test_items)
        )
    item_role = np.full(n_items, -1, np.int8)  # -1 unobserved, 0 train, 1 val, 2 test
    item_role[train_items], item_role[val_items], item_role[test_items] = 0, 1, 2

    # user split
    if split is None:
        uperm = rng.permutation(n_users)
        n_tru = int(round(user_fractions[0] * n_users))
        n_vau = int(round(user_fractions[1] * n_users))
        train_users, val_users, test_users = (
            np.sort(uperm[:n_tru]),
            np.sort(uperm[n_tru : n_tru + n_vau]),
            np.sort(uperm[n_tru + n_vau :]),
        )
    else:

        def users_of(ids: np.ndarray) -> np.ndarray:
            ids = np.asarray(ids, np.int64)
            at = np.searchsorted(user_ids, ids)
            ok = (at < n_users) & (user_ids[np.minimum(at, n_users - 1)] == ids)
            return np.sort(at[ok])

        train_users, val_users, test_users = (
            users_of(x) for x in (split.train_users, split.val_users, split.test_users)
        )
    user_is_train = np.zeros(n_users, bool)
    user_is_train[train_users] = True
    user_is_eval = np.zeros(n_users, bool)
    user_is_eval[val_users] = user_is_eval[test_users] = True

    role = item_role[i]
    tr_u = user_is_train[u]
    # warm holdout: per train user, a random 10% / 20% of their positives on train items
    warm_mask = tr_u & (role == 0)
    draw = rng.random(len(u))
    wv, wt = warm_fractions
    to_val = warm_mask & (draw < wv)
    to_test = warm_mask & (draw >= wv) & (draw < wv + wt)
    to_train = warm_mask & ~to_val & ~to_test

    shape = (n_users, n_items)
    sel = lambda m: _csr(u[m], i[m], c[m], shape)  # noqa: E731
    return Dataset(
        item_ids=item_ids,
        user_ids=user_ids,
        train_items=train_items,
        val_items=val_items,
        test_items=test_items,
        train_users=train_users,
        val_users=val_users,
        test_users=test_users,
        train=sel(to_train),
        warm_val=sel(to_val),
        warm_test=sel(to_test),
        cold_val=sel(tr_u & (role == 1)),
        cold_test=sel(tr_u & (role == 2)),
        heldout=sel(user_is_eval[u] & (role == 0)),
        seed=seed,
        params={
            "item_fractions": list(item_fractions) if split is None else "external",
            "user_fractions": list(user_fractions) if split is None else "external",
            "warm_fractions": list(warm_fractions),
            "min_user_positives": min_user_positives,
        },
    )
