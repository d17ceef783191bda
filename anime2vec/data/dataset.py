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
    item_ids: np.ndarray          # (n_items,) anime ids; position = item index
    user_ids: np.ndarray          # (n_users,) user ids; position = user index
    train_items: np.ndarray       # item indices (cold split)
    val_items: np.ndarray
    test_items: np.ndarray
    train_users: np.ndarray       # user indices (user split)
    val_users: np.ndarray
    test_users: np.ndarray
    train: sp.csr_matrix          # (n_users, n_items) float32 confidence: train users x train items minus warm holdout
    warm_val: sp.csr_matrix       # held-out positives of train users on train items
    warm_test: sp.csr_matrix
    cold_val: sp.csr_matrix       # positives of train users on val items
    cold_test: sp.csr_matrix      # positives of train users on test items
    heldout: sp.csr_matrix        # positives (confidence) of val/test users on train items
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
            "users": self.n_users, "items": self.n_items,
            "train_items": len(self.train_items), "val_items": len(self.val_items),
            "test_items": len(self.test_items),
            "train_users": len(self.train_users), "val_users": len(self.val_users),
            "test_users": len(self.test_users),
            "train_nnz": int(self.train.nnz), "warm_val_nnz": int(self.warm_val.nnz),
            "warm_test_nnz": int(self.warm_test.nnz), "cold_val_nnz": int(self.cold_val.nnz),
            "cold_test_nnz": int(self.cold_test.nnz), "heldout_nnz": int(self.heldout.nnz),
            **self.params,
        }
