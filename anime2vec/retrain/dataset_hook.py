"""Feedback interactions added to the base data's split dataset, routed as `build_dataset` routes base pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.dataset import Dataset
from .config import _MATRICES


def extend_dataset(ds: Dataset, interactions: pd.DataFrame) -> Dataset:
    """`ds` plus feedback interactions (user_id, anime_id, confidence; 0 removes a pair), routed by
    the base split (module docstring). Items, item splits and existing users' roles are unchanged;
    new users with a positive join the training users."""
    item_pos = pd.Series(np.arange(ds.n_items), index=ds.item_ids)
    ev = interactions[interactions["anime_id"].isin(item_pos.index)]
    ev = pd.DataFrame(
        {
            "user_id": ev["user_id"].to_numpy(np.int64),
            "item": item_pos.loc[ev["anime_id"].to_numpy()].to_numpy(np.int64),
            "conf": ev["confidence"].to_numpy(np.float32),
        }
    )
    parts = []
    for where, name in enumerate(_MATRICES):
        m = getattr(ds, name).tocoo()
        parts.append(
            pd.DataFrame(
                {
                    "user_id": ds.user_ids[m.row],
                    "item": m.col.astype(np.int64),
                    "conf": m.data.astype(np.float32),
                    "where": np.int8(where),
                }
            )
        )
    base = pd.concat(parts, ignore_index=True)
    ev = ev.merge(base[["user_id", "item", "where"]], on=["user_id", "item"], how="left")

    # routing of pairs the base data does not place: by the user's and the item's role
    item_role = np.full(ds.n_items, -1, np.int8)
    item_role[ds.train_items], item_role[ds.val_items], item_role[ds.test_items] = 0, 1, 2
    heldout_users = set(ds.user_ids[np.concatenate([ds.val_users, ds.test_users])].tolist())
    new = ev["where"].isna().to_numpy()
    role = item_role[ev["item"].to_numpy()]
    is_heldout_user = ev["user_id"].isin(heldout_users).to_numpy()
    to = np.where(is_heldout_user, np.where(role == 0, 5, -1), np.select([role == 1, role == 2], [3, 4], default=0))
    ev["where"] = np.where(new, to, ev["where"].fillna(-1)).astype(np.int8)
    touched = pd.MultiIndex.from_frame(ev[["user_id", "item"]])
    kept = base[~pd.MultiIndex.from_frame(base[["user_id", "item"]]).isin(touched)]
    added = ev[(ev["conf"] > 0) & (ev["where"] >= 0)]
    entries = pd.concat([kept, added[["user_id", "item", "conf", "where"]]], ignore_index=True)

    user_ids = np.union1d(ds.user_ids, added["user_id"].to_numpy(np.int64))
    remap = np.searchsorted(user_ids, ds.user_ids)
    new_users = np.setdiff1d(user_ids, ds.user_ids)
    rows = np.searchsorted(user_ids, entries["user_id"].to_numpy())
    shape = (len(user_ids), ds.n_items)

    def matrix(where: int) -> sp.csr_matrix:
        sel = entries["where"].to_numpy() == where
        m = sp.csr_matrix(
            (entries["conf"].to_numpy(np.float32)[sel], (rows[sel], entries["item"].to_numpy()[sel])),
            shape=shape,
            dtype=np.float32,
        )
        m.sum_duplicates()
        m.sort_indices()
        return m

    mats = {name: matrix(where) for where, name in enumerate(_MATRICES)}
    train_users = np.sort(np.concatenate([remap[ds.train_users], np.searchsorted(user_ids, new_users)]))
    routed = {name: int((added["where"] == where).sum()) for where, name in enumerate(_MATRICES)}
    params = {
        **ds.params,
        "feedback": {
            "pairs": int(len(ev)),
            "added_or_updated": routed,
            "removed": int(((ev["conf"] <= 0) & ~new).sum()),
            "new_users": int(len(new_users)),
        },
    }
    return Dataset(
        item_ids=ds.item_ids,
        user_ids=user_ids,
        train_items=ds.train_items,
        val_items=ds.val_items,
        test_items=ds.test_items,
        train_users=train_users,
        val_users=np.sort(remap[ds.val_users]),
        test_users=np.sort(remap[ds.test_users]),
        seed=ds.seed,
        params=params,
        **mats,
    )
