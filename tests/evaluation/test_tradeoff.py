"""MMR (the one implementation the ranker serves) on hand-made vectors, and the trade-off curve on a
small synthetic dataset: λ = 0 reproduces the Experiment's numbers, more λ buys diversity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from anime2vec.data.dataset import build_dataset
from anime2vec.evaluation.protocol import Experiment, scenarios
from anime2vec.evaluation.tradeoff import run_tradeoff, tradeoff_curve
from anime2vec.models.content_knn import ContentKNN
from anime2vec.models.mmr import cosine_matrix, mmr_order, relevance

# Four candidates, best score first. 0 and 1 are near-duplicates (cosine 0.99), 3 is close to
# them (0.98), 2 is orthogonal to all of them.
VECS = np.array([[1, 0], [0.99, 0.14], [0, 1], [0.98, 0.2]], np.float32)
SCORES = np.array([4.0, 3.9, 3.0, 2.0])  # relevance after min-max: 1, 0.95, 0.5, 0


def test_lambda_zero_is_the_score_order():
    assert mmr_order(SCORES, cosine_matrix(VECS), 0.0).tolist() == [0, 1, 2, 3]
    assert relevance(SCORES).ravel() == pytest.approx([1, 0.95, 0.5, 0])


def test_a_high_lambda_picks_the_dissimilar_item_second():
    sim = cosine_matrix(VECS)
    # λ = 0.5 after picking 0: item 1 scores 0.5·0.95 − 0.5·0.99 < 0; item 2: 0.5·0.5 − 0 = 0.25
    assert mmr_order(SCORES, sim, 0.5).tolist() == [0, 2, 1, 3]
    # a small λ keeps the near-duplicate: item 1: 0.9·0.95 − 0.1·0.99 = 0.756 > item 2: 0.45
    assert mmr_order(SCORES, sim, 0.1).tolist()[:2] == [0, 1]
    # 2-d input is a batch of independent rows; padding (-inf) is never picked: without item 2,
    # item 1 (0.5·0.95 − 0.5·0.99 = −0.02) beats item 3 (0 − 0.5·0.98); k truncates
    batch = np.vstack([SCORES, [4.0, 3.9, -np.inf, 2.0]])
    order = mmr_order(batch, np.stack([sim, sim]), 0.5, k=4)
    assert order.tolist() == [[0, 2, 1, 3], [0, 1, 3, -1]]
    assert mmr_order(SCORES, sim, 0.5, k=2).tolist() == [0, 2]


def test_a_penalty_demotes_before_diversity():
    # the ranker's dislike penalty: item 0 pushed below item 1 even at λ = 0
    assert mmr_order(SCORES, None, 0.0, penalty=np.array([0.2, 0, 0, 0])).tolist() == [1, 0, 2, 3]


def synthetic():
    """300 items in 6 topics (2-d content: topic direction plus noise); 200 users who each like
    items of two topics, mostly one. A content-kNN model ranks the favourite topic first, so its
    lists are narrow and MMR has something to spread out."""
    rng = np.random.default_rng(0)
    n_items, n_topics = 300, 6
    topic = rng.integers(0, n_topics, n_items)
    angle = topic * (2 * np.pi / n_topics) + rng.normal(0, 0.25, n_items)
    content = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)
    rows = []
    for u in range(200):
        main, other = rng.choice(n_topics, 2, replace=False)
        for t, n in ((main, 12), (other, 5)):
            for i in rng.choice(np.flatnonzero(topic == t), n, replace=False):
                rows.append((u, int(i), True, 1.0))
    inter = pd.DataFrame(rows, columns=["user_id", "anime_id", "positive", "confidence"])
    catalog = pd.DataFrame({"synopsis": ["text"] * n_items}, index=np.arange(n_items))
    return build_dataset(catalog, inter, seed=0), content


def test_the_curve_reproduces_the_evaluation_at_zero_and_buys_diversity(tmp_path):
    ds, content = synthetic()
    model = ContentKNN(content, name="content-knn").fit(ds.train)
    warm = next(s for s in scenarios(ds, "test") if s.name == "warm")
    df = run_tradeoff(
        model,
        [warm],
        content,
        out_dir=tmp_path,
        lambdas=(0.0, 0.3, 0.9),
        pool=60,
        k_recall=20,
        k_list=5,
        popularity=ds.popularity,
    )
    assert df["lambda"].tolist() == [0.0, 0.3, 0.9] and set(df["scenario"]) == {"warm"}

    exp = Experiment(
        ds, [ContentKNN(content, name="content-knn").fit(ds.train)], split="test", ks=(5, 20), diversity_space=content
    ).run(progress=False)
    zero = df.iloc[0]
    for metric in ("recall@20", "recall@5", "diversity@5", "coverage@5", "popularity_pct@5"):
        assert zero[metric] == pytest.approx(exp.value("content-knn", "warm", metric), abs=1e-9), metric

    ild = df["diversity@5"].to_numpy()
    assert ild[-1] > ild[0] + 0.05  # the diverse end really is more diverse
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    md = (tmp_path / "tradeoff.md").read_text()
    assert "| lambda | recall@20 | recall@5 | diversity@5 | coverage@5 | popularity_pct@5 |" in md
    assert len(pd.read_csv(tmp_path / "tradeoff.csv")) == 3


def test_bad_arguments_are_refused():
    ds, content = synthetic()
    model = ContentKNN(content).fit(ds.train)
    warm = next(s for s in scenarios(ds, "test") if s.name == "warm")
    with pytest.raises(ValueError, match="lambdas"):
        tradeoff_curve(model, warm, content, lambdas=(0.0, 1.5))
    with pytest.raises(ValueError, match="pool"):
        tradeoff_curve(model, warm, content, pool=10, k_recall=100)
