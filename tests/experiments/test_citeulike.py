"""The CiteULike cold-start experiment: loader (formats, 1-based split, checks), the validation
carve, the paper's recall@100 on a hand-computed case, and an end-to-end run on a tiny fixture."""

import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from anime2vec.data.types import DataError
from anime2vec.models.base import Recommender
from experiments.citeulike import (
    ColdSplit,
    carve_validation,
    cold_recall_curve,
    expected_random_curve,
    load_citeulike,
    main,
    published_split,
    tag_features,
)

# 6 users, 10 items (0-based), 5 tags; items 7, 8, 9 are the cold test items.
USERS = [[0, 1, 2, 7], [1, 2, 3, 8], [0, 3, 4, 9], [4, 5, 6, 7], [5, 6, 8, 9], [0, 2, 5, 6, 9]]
ITEM_TAGS = [[0, 1], [1], [0, 2], [2, 3], [3], [3, 4], [4, 0], [0, 1, 2], [], [3]]
TAGS = ["genomics", "networks", "review", "ecology", "statistics"]
COLD = [7, 8, 9]


def _write(path: Path, text: str, xz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if xz:
        with lzma.open(path.with_name(path.name + ".xz"), "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _counted(rows) -> str:
    return "".join(" ".join(str(x) for x in [len(r), *r]) + "\n" for r in rows)


def make_fixture(root: Path, train_extra: str = "", users=USERS) -> Path:
    """The staged layout: .dat files and the split, ids in the split 1-based, some files as .xz."""
    _write(root / "users.dat", _counted(users), xz=True)
    _write(root / "item-tag.dat", _counted(ITEM_TAGS))
    _write(root / "tags.dat", "\n".join(TAGS) + "\n", xz=True)
    train = [(u, i) for u, items in enumerate(USERS) for i in items if i not in COLD]
    test = [(u, i) for u, items in enumerate(USERS) for i in items if i in COLD]
    split = root / "dropoutnet_split" / "cold"
    _write(split / "train.csv", "".join(f"{u + 1},{i + 1},1\n" for u, i in train) + train_extra, xz=True)
    _write(split / "test.csv", "".join(f"{u + 1},{i + 1},1\n" for u, i in test))
    _write(split / "test_item_ids.csv", "".join(f"{i + 1}\n" for i in COLD))
    return root


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("citeulike"))


def test_loader_reads_the_formats_and_the_split_exactly(fixture_dir):
    d = load_citeulike(fixture_dir)
    assert (d.n_users, d.n_items, d.item_tags.shape[1]) == (6, 10, 5)
    np.testing.assert_array_equal(d.cold_items, COLD)
    # 1-based split ids became the users.dat line / item index
    for u, items in enumerate(USERS):
        assert set(d.train[u].indices) == {i for i in items if i not in COLD}
        assert set(d.test[u].indices) == {i for i in items if i in COLD}
    assert d.train.nnz == 18 and d.test.nnz == 7
    assert d.train[:, COLD].nnz == 0  # cold items never in training
    np.testing.assert_array_equal(d.test_users, [0, 1, 2, 3, 4, 5])
    for i, tags in enumerate(ITEM_TAGS):
        assert set(d.item_tags[i].indices) == set(tags)
    desc = d.describe()
    assert desc["cold_items_without_tags"] == 1 and desc["items_without_tags"] == 1
    assert desc["test_users_without_training"] == 0


def test_loader_refuses_a_cold_item_in_training(tmp_path):
    make_fixture(tmp_path, train_extra="2,8,1\n")  # user 2 / item 8 (1-based) is a cold item
    with pytest.raises(DataError, match="cold test item 8 has a training pair"):
        load_citeulike(tmp_path)


def test_loader_refuses_a_split_that_does_not_rebuild_users_dat(tmp_path):
    make_fixture(tmp_path, users=[*USERS[:5], [0, 2, 5, 9]])  # users.dat lost one pair
    with pytest.raises(DataError, match="do not rebuild users.dat"):
        load_citeulike(tmp_path)


def test_loader_names_the_file_and_row_of_a_bad_count(tmp_path):
    make_fixture(tmp_path)
    (tmp_path / "item-tag.dat").write_text(_counted(ITEM_TAGS).replace("3 0 1 2\n", "4 0 1 2\n"))
    with pytest.raises(DataError, match=r"item-tag.dat, row 8: says 4 ids but lists 3"):
        load_citeulike(tmp_path)


def test_validation_holds_out_training_items_with_all_their_pairs(fixture_dir):
    d = load_citeulike(fixture_dir)
    v = carve_validation(d.train, fraction=0.3, seed=0)
    assert len(v.candidates) == round(0.3 * 7)
    assert not set(v.candidates) & set(COLD)
    assert v.train[:, v.candidates].nnz == 0
    assert v.truth.nnz == d.train[:, v.candidates].nnz
    assert (v.train + v.truth != d.train).nnz == 0  # nothing lost, nothing added
    assert all(v.truth[u].nnz and v.train[u].nnz for u in v.users)


class RankedByIndex(Recommender):
    """Scores item i as -i: the ranking of any candidate set is by item index."""

    def fit(self, train):
        self.train = train
        return self

    def score(self, queries, items):
        return np.tile(-np.asarray(items, np.float32), (len(queries), 1))


def test_cold_recall_at_100_is_hits_over_relevant_averaged_over_users():
    # 200 candidates (items 10..209, ranked by index); item 10 + r - 1 is at rank r
    n_users, n_items = 4, 210
    at = lambda r: 9 + r  # noqa: E731
    truth = {
        0: [at(5), at(150)],  # 1 of 2 in the top 100 → 0.5
        1: [at(1), at(2), at(3)],  # 3 of 3 → 1.0
        2: [at(101)],  # just outside → 0.0
        3: [at(100), at(200)],
    }  # the 100th counts → 0.5
    rows = [u for u, items in truth.items() for _ in items]
    cols = [i for items in truth.values() for i in items]
    t = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    split = ColdSplit(
        "hand", sp.csr_matrix((n_users, n_items), dtype=np.float32), t, np.arange(10, 210), np.arange(n_users)
    )
    curve = cold_recall_curve(RankedByIndex().fit(split.train), split, max_k=300)
    # per user then mean: (0.5 + 1 + 0 + 0.5) / 4; pooling the pairs would give 5/8
    assert curve[99] == pytest.approx(0.5)
    assert curve[0] == pytest.approx((0 + 1 / 3 + 0 + 0) / 4)
    assert curve[199] == pytest.approx(1.0) and curve[299] == pytest.approx(1.0)


def test_expected_random_recall_is_k_over_the_candidates():
    np.testing.assert_allclose(expected_random_curve(400, 500)[[0, 99, 399, 499]], [1 / 400, 0.25, 1.0, 1.0])


def test_tag_features_give_untagged_items_zero_rows(fixture_dir):
    d = load_citeulike(fixture_dir)
    tfidf, dense = tag_features(d.item_tags, svd_dim=300, seed=0)
    assert tfidf.shape == (10, 5) and dense.shape == (10, 4)  # SVD rank capped by the tiny matrix
    assert tfidf[8].nnz == 0
    np.testing.assert_allclose(dense[8], 0.0, atol=1e-6)
    norms = np.sqrt(np.asarray(tfidf.multiply(tfidf).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms[[0, 1, 9]], 1.0, rtol=1e-5)


def test_end_to_end_run_on_the_fixture_writes_the_report(fixture_dir, tmp_path):
    out = tmp_path / "report"
    assert main(["--data-dir", str(fixture_dir), "--out", str(out), "--max-epochs", "2"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["test"]) == {"random", "wmf", "content-knn-tags", "content-knn-tags-svd", "dropoutnet-wmf-tags"}
    # 3 cold candidates: every method finds every relevant item within the top 100
    for name, row in doc["test"].items():
        assert row["recall@100"] == pytest.approx(1.0), name
    assert len(doc["selection"]) == 2 and doc["selected"]["best_epoch"] in (1, 2)
    assert doc["data"]["cold_test_items"] == 3 and doc["paper"]["recall@100"] == 0.636
    md = (out / "report.md").read_text()
    assert "dropoutnet-wmf-tags" in md and "0.636" in md and "tags" in md
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


STAGED = Path(__file__).resolve().parents[3] / "shared" / "data" / "citeulike-a"


@pytest.mark.skipif(not STAGED.exists(), reason="staged citeulike-a not present")
def test_the_staged_data_has_the_published_split():
    d = load_citeulike(STAGED)
    desc = d.describe()
    assert (desc["users"], desc["items"], desc["tags"]) == (5551, 16980, 46391)
    assert (desc["train_pairs"], desc["test_pairs"], desc["cold_test_items"]) == (164210, 40776, 3396)
    assert desc["test_users"] == 5410
    s = published_split(d)
    assert s.train[:, s.candidates].nnz == 0
