"""Measure the MMR accuracy/diversity trade-off of a trained bundle, as served, without training.

    python -m experiments.bundle_tradeoff [--bundle models/<version>] [--out reports/tradeoff]

The bundle's split is rebuilt from the data (build_dataset with the bundle's seed: the split it
was evaluated on; the item and user ids are checked against the bundle's). Queries are scored
as the ranker serves them (`ServedRecommender`: the known-user and favourites paths of the ranker's
ServingModel against the served item vectors, what Qdrant ranks), then re-ranked by
anime2vec.models.mmr, exactly as the ranker does, in the bundle's content space.
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
from anime2vec.paths import default_model_store
from anime2vec.serving_model.model import ServingModel
from anime2vec.serving_model.recommender import ServedRecommender

log = logging.getLogger("measure_tradeoff")


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
        ServedRecommender(
            model, ds.item_ids, ds.user_ids, ds.train, name=f"served {model.manifest.get('model', 'model')}"
        ),
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
