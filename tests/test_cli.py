"""The offline CLI end to end on the sample: train → report + bundle → inspect-bundle verifies it."""

import json
import os
import subprocess
import sys

import pytest

from anime2vec.bundle import load_bundle

# one of each kind (baselines, the served hybrid's parts, graph kNN, text and graph DropoutNets,
# pre-trained, the hybrid) keeps this under a couple of minutes; the full list is the default of `train`
MODELS = (
    "popularity",
    "wmf",
    "ease",
    "rp3beta",
    "content-knn-tfidf",
    "content-knn-tfidf-graph",
    "content-bilinear",
    "dropoutnet-tfidf",
    "dropoutnet-minilm",
    "dropoutnet-minilm-graph",
    "dropoutnet-pretrained-graph",
    "anime2vec-hybrid",
)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "anime2vec.cli", *args],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=900,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    env = {"A2V_CACHE_DIR": str(root / "cache")}
    # fit the pre-trained-encoder variants too (a second tiny encoder); the hybrid with a 5% floor
    r = cli(
        "train",
        "--sample",
        "--encoder",
        "tiny-random",
        "--epochs",
        "2",
        "--quiet",
        "--pretrained-encoder",
        "tiny-random",
        "--hybrid-tolerance",
        "0.05",
        "--models",
        ",".join(MODELS),
        "--store",
        str(root / "store"),
        "--report-dir",
        str(root / "report"),
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return root, r


def test_help_lists_the_commands():
    r = cli("--help")
    assert r.returncode == 0
    for cmd in ("train", "evaluate", "inspect-bundle"):
        assert cmd in r.stdout


def test_train_writes_a_report_comparing_every_model(trained):
    root, _ = trained
    report = json.loads((root / "report" / "report.json").read_text())
    md = (root / "report" / "report.md").read_text()
    for model in MODELS:
        assert f"| {model} |" in md
    assert "anime2vec train --sample" in md  # the command that produced it
    assert "## DeepAniNet's table on our data" in md
    rows = {r["variant"]: r for r in report["deepaninet_table"]}
    assert rows["static MiniLM + graph"]["model"] == "dropoutnet-minilm-graph"
    assert 0 <= rows["pre-trained MiniLM + graph"]["cold whole R@100"] <= 1
    assert (root / "report" / "recall_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report


def test_train_writes_a_verifiable_bundle_with_metrics(trained):
    from anime2vec.models.hybrid import GROUPS, Hybrid

    root, _ = trained
    (bundle,) = [p for p in (root / "store").iterdir() if not p.name.startswith(".")]
    b = load_bundle(bundle)
    m = b.manifest
    assert m["model"] == "anime2vec-hybrid" and m["data"]["source"] == "sample"
    assert m["dims"]["n_items"] == 800 and b.arrays["item_tower"].shape == (800, m["dims"]["tower_dim"])
    # the served hybrid's arrays, no DropoutNet ones
    assert set(b.prefixed("hybrid")) == set(Hybrid.STATE) and not b.prefixed("dropoutnet") and "dropoutnet" not in m
    assert b.arrays["hybrid.C"].shape == (800, m["dims"]["hybrid_content_dim"])
    assert m["metadata"]["types"] and m["metadata"]["genres"]  # a new anime's metadata is encoded the same way
    # offline metrics of the served model, brand-new anime (what AddAnime serves) included
    for scenario in ("warm", "cold_whole", "new_whole", "new_test_items"):
        assert 0.0 <= m["metrics"][scenario]["recall@100"] <= 1.0, scenario
    # its weights and how they were tuned: the 5% floor held
    hp = m["hyperparameters"]["hybrid"]
    assert set(hp["weights"]) == {"users", "favourites", "text"} and set(hp["items"]["beta_content"]) == set(GROUPS)
    for request in ("users", "favourites"):
        t = m["selection"]["anime2vec-hybrid"]["tuning"][request]
        assert t["tolerance"] == 0.05 and t["own"] >= t["floor"] - 1e-9 and isinstance(t["saturated"], list)
        assert t["weights"] == hp["weights"][request]
    r = cli("inspect-bundle", str(bundle))
    assert r.returncode == 0 and m["version"] in r.stdout and "verified" in r.stdout


def test_inspect_refuses_a_corrupt_bundle(trained, tmp_path):
    root, _ = trained
    (bundle,) = [p for p in (root / "store").iterdir() if not p.name.startswith(".")]
    copy = tmp_path / bundle.name
    subprocess.run(["cp", "-r", str(bundle), str(copy)], check=True)
    target = copy / "arrays" / "wmf_V.npy"
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x55
    target.write_bytes(bytes(data))
    r = cli("inspect-bundle", str(copy))
    assert r.returncode == 2 and "checksum mismatch for arrays/wmf_V.npy" in r.stderr


def test_unknown_model_names_are_refused():
    r = cli("evaluate", "--sample", "--models", "wmf,nonsense")
    assert r.returncode != 0 and "nonsense" in (r.stderr + r.stdout)


def test_the_bundle_serves_what_was_trained(trained):
    """The ranker's ServingModel rebuilds the hybrid from the bundle: its item vectors are the
    exported ones, its query vectors score like the model, and an anime's content row rebuilt from
    the bundle's own TF-IDF, MiniLM and metadata of that anime is the row the hybrid was trained
    on. As a brand-new anime (AddAnime) that row gives exactly a text-group anime's item vector;
    a paired anime given as new loses the audience it borrowed from its neighbours, unless it is
    given as the catalogue anime it is (its text replaced)."""
    import numpy as np

    from anime2vec.models.base import Queries
    from anime2vec.models.hybrid import PAIRED, TEXT, WARM
    from anime2vec.serving_model.model import ServingModel

    root, _ = trained
    (bundle,) = [p for p in (root / "store").iterdir() if not p.name.startswith(".")]
    b = load_bundle(bundle)
    m = ServingModel(b, device="cpu")
    assert m.has_vectors and m.has_dropoutnet
    hy = m.hybrid
    np.testing.assert_allclose(m.item_tower, b.arrays["item_tower"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(m.warm, hy.group == WARM)
    # query vectors: a known user and a favourites list, against the model's own score
    u = int(np.flatnonzero(m.train.getnnz(axis=1))[0])
    score = hy.score(Queries.of_users([u]), np.arange(800))[0]
    assert np.abs(m.user_vector(int(m.user_ids[u])) @ m.item_tower.T - score).max() < 1e-4
    liked = np.flatnonzero(m.warm)[:3]
    score = hy.score(Queries.of_liked([liked], [np.array([1.0, 2.0, 3.0])]), np.arange(800))[0]
    served = m.favourites_vector([int(m.item_ids[i]) for i in liked], [1.0, 2.0, 3.0]) @ m.item_tower.T
    assert np.abs(served - score).max() < 1e-4

    def row(i):
        """Anime i's content row from what the bundle keeps of it (as AddAnime builds one)."""
        fields = m.catalog.iloc[i][["type", "year", "episodes", "genres"]].to_dict()
        return m.content_row(m.content[i], b.arrays["tfidf_content"][i], fields)

    groups = {g: np.flatnonzero(hy.group == g) for g in (WARM, PAIRED, TEXT)}
    assert all(len(v) for v in groups.values())
    for i in np.r_[groups[TEXT][:3], groups[PAIRED][:3], groups[WARM][:3]]:
        np.testing.assert_allclose(row(i), hy.C[i], rtol=1e-5, atol=1e-6)
    for i in groups[TEXT][:3]:
        np.testing.assert_allclose(m.item_vector(row(i)), m.item_tower[i], rtol=1e-4, atol=1e-5)
    for i in np.r_[groups[PAIRED][:3], groups[WARM][:3]]:
        np.testing.assert_allclose(m.item_vector(row(i), i), m.item_tower[i], rtol=1e-4, atol=1e-5)
    j = groups[PAIRED][0]
    assert not np.allclose(m.item_vector(row(j)), m.item_tower[j], atol=1e-4)


# ---- the quick bundle (`train --quick`: what `make run` serves while the full bundle trains) -------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("quick")
    # a cache that stays empty: the quick preset must not encode anything
    r = cli(
        "train",
        "--quick",
        "--sample",
        "--quiet",
        "--store",
        str(root / "store"),
        "--report-dir",
        str(root / "report"),
        env={"A2V_CACHE_DIR": str(root / "cache")},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (root / "store").iterdir()
    return root, load_bundle(path)


def test_the_quick_bundle_encodes_nothing_and_says_what_it_is(quick):
    root, b = quick
    m = b.manifest
    assert m["preset"] == "quick" and m["content"] == {"blocks": ["tfidf", "meta"], "space": "tfidf"}
    assert not any(k.startswith("encode") for k in m["timings"]) and not (root / "cache" / "encodings.sqlite").exists()
    assert not b.prefixed("whitener")
    # it still names the encoder that serves beside it: added anime are encoded by it, and stay
    # servable when the full bundle (same encoder) replaces this one
    from anime2vec.features.encoder import TextEncoder

    assert m["encoder"]["fingerprint"] == TextEncoder().fingerprint
    assert m["hyperparameters"]["train_config"]["encoder_block"] is False
    rows = {
        (r["model"], r["scenario"], r["metric"]): r["value"]
        for r in json.loads((root / "report" / "report.json").read_text())["metrics"]
    }
    for sc in ("warm", "fav_k5", "cold_test_items"):  # a real model: above the popularity floor
        assert rows["anime2vec-hybrid", sc, "recall@100"] > rows["popularity", sc, "recall@100"] + 0.05, sc
    report = (root / "report" / "report.md").read_text()
    assert "| anime2vec-hybrid |" in report and "none (quick preset" in report


def test_the_quick_bundle_serves_what_was_trained(quick):
    """Content rows rebuilt from the bundle (TF-IDF + metadata, no encoder) are the trained ones,
    and an encoding passed along changes nothing (it has no MiniLM block)."""
    import numpy as np

    from anime2vec.models.hybrid import PAIRED, TEXT, WARM
    from anime2vec.serving_model.model import ServingModel

    _, b = quick
    m = ServingModel(b)
    hy = m.hybrid
    assert m.whiten(np.ones(384, np.float32)) is None and m.content_space == "tfidf"
    np.testing.assert_array_equal(m.content, b.arrays["tfidf_content"])
    for g in (WARM, PAIRED, TEXT):
        for i in np.flatnonzero(hy.group == g)[:3]:
            fields = m.catalog.iloc[i][["type", "year", "episodes", "genres"]].to_dict()
            row = m.content_row(None, b.arrays["tfidf_content"][i], fields)
            np.testing.assert_allclose(row, hy.C[i], rtol=1e-5, atol=1e-6)
            if g == TEXT:
                np.testing.assert_allclose(m.item_vector(row), m.item_tower[i], rtol=1e-4, atol=1e-5)
    rng = np.random.default_rng(0)
    a, c = (rng.normal(size=384).astype(np.float32) for _ in range(2))
    q = m.text_vector(a, "two brothers search for a stone")
    np.testing.assert_array_equal(q, m.text_vector(c, "two brothers search for a stone"))
    assert np.linalg.norm(q) > 0
    t = m.tfidf_vector("two brothers search for a stone")
    np.testing.assert_array_equal(m.semantic_vector(None, t), t)  # explanations measure in TF-IDF


def test_quick_refuses_models_that_need_encodings(tmp_path):
    r = cli(
        "train",
        "--quick",
        "--sample",
        "--quiet",
        "--models",
        "popularity,dropoutnet-minilm",
        "--store",
        str(tmp_path / "s"),
        "--report-dir",
        str(tmp_path / "r"),
    )
    assert r.returncode != 0 and "need MiniLM encodings" in r.stderr
