"""Measure the MMR accuracy/diversity trade-off of a trained bundle, as served, without training.

    python -m experiments.bundle_tradeoff [--bundle models/<version>] [--out reports/tradeoff]

The bundle's split is rebuilt from the data (build_dataset with the bundle's seed: the split it
was evaluated on; the item and user ids are checked against the bundle's). Queries are scored
with the ranker's own ServingModel: the stored user vectors' path for known users
(`user_vector`) and the favourites path (`favourites_vector`) for favourites queries, against the
served item vectors (`item_tower`, what Qdrant ranks), then re-ranked by anime2vec.models.mmr,
exactly as the ranker does, in the bundle's content space.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from anime2vec.bundle import list_bundles, load_bundle
from anime2vec.data.dataset import build_dataset
from anime2vec.data.loader import load_mal
from anime2vec.evaluation.protocol import scenarios
from anime2vec.evaluation.tradeoff import LAMBDAS, POOL, run_tradeoff
from anime2vec.models.base import Queries, Recommender
from anime2vec.paths import default_model_store
from anime2vec.serving_model.model import ServingModel

log = logging.getLogger("measure_tradeoff")


class Served(Recommender):
    """The ranker's scoring path as a Recommender: one query vector per query · item_tower."""

    def __init__(self, model: ServingModel):
        super().__init__()
        self.m, self.name, self.train = model, f"served {model.manifest.get('model', 'model')}", model.train

    def fit(self, train):
        return self

    def score(self, queries: Queries, items: np.ndarray) -> np.ndarray:
        m = self.m
        if queries.users is not None:
            vecs = [m.user_vector(int(m.user_ids[u])) for u in queries.users]
        else:
            w = queries.liked_weights or [None] * len(queries.liked)
            vecs = [
                m.favourites_vector([int(m.item_ids[i]) for i in liked], None if wt is None else wt.tolist())
                for liked, wt in zip(queries.liked, w)
            ]
        return np.asarray(np.stack(vecs) @ m.item_tower[items].T, np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: the newest in the model store)")
    ap.add_argument("--data-dir", type=Path, help="MAL data directory (default: A2V_DATA_DIR or ../shared/data/mal)")
    ap.add_argument("--out", type=Path, default=Path("reports/tradeoff"))
    ap.add_argument("--scenarios", default="warm,fav_k5,cold_whole")
    ap.add_argument("--pool", type=int, default=POOL)
    ap.add_argument("--max-queries", type=int, default=None, help="subsample each family (default: all)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = a.bundle or list_bundles(default_model_store())[-1]
    t0 = time.perf_counter()
    model = ServingModel(load_bundle(path))
    seed = int(model.manifest.get("split", {}).get("seed", 0))
    data = load_mal(a.data_dir) if a.data_dir else load_mal()
    ds = build_dataset(data.catalog, data.interactions, seed=seed)
    if not (np.array_equal(ds.item_ids, model.item_ids) and np.array_equal(ds.user_ids, model.user_ids)):
        raise SystemExit(f"{path}: the data's split does not match the bundle's items/users (other data?)")
    if (ds.train != model.train).nnz:
        raise SystemExit(f"{path}: the data's training matrix differs from the bundle's")
    log.info("bundle %s and split (seed %d) ready in %.0f s", model.version, seed, time.perf_counter() - t0)
    wanted = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    scs = [s for s in scenarios(ds, "test", seed=seed, max_queries=a.max_queries) if s.name in wanted]
    t0 = time.perf_counter()
    df = run_tradeoff(
        Served(model),
        scs,
        model.content,
        out_dir=a.out,
        lambdas=LAMBDAS,
        pool=a.pool,
        popularity=ds.popularity,
        seed=seed,
        command=f"python -m experiments.bundle_tradeoff --bundle {path} --pool {a.pool}",
        notes=[
            f"bundle {model.version}, test split (seed {seed}), every query of each scenario"
            if a.max_queries is None
            else f"at most {a.max_queries} queries per family",
            "accuracy: recall@100 and recall@10; diversity: intra-list diversity@10 "
            "(mean pairwise cosine distance in the bundle's centred MiniLM space, the "
            "space MMR uses); coverage@10: share of the scenario's candidates shown "
            "to anyone; popularity_pct@10: mean training-popularity percentile",
        ],
    )
    log.info("measured in %.0f s", time.perf_counter() - t0)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
