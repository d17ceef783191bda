"""The offline CLI end to end on the sample: train → report + bundle → inspect-bundle verifies it."""

import json
import os
import subprocess
import sys

import pytest

from anime2vec.bundle import load_bundle

# one of each kind (baselines, graph kNN, text and graph DropoutNets, pre-trained, the blend) keeps
# this under a couple of minutes; the full list is the default of `train`
MODELS = ("popularity", "wmf", "content-knn-tfidf", "content-knn-tfidf-graph", "dropoutnet-tfidf",
          "dropoutnet-minilm", "dropoutnet-minilm-graph", "dropoutnet-pretrained-graph", "anime2vec-hybrid")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "anime2vec.cli", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=900)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    env = {"A2V_CACHE_DIR": str(root / "cache")}
    # serve the graph variant and fit the pre-trained-encoder variants too (a second tiny encoder)
    r = cli("train", "--sample", "--encoder", "tiny-random", "--epochs", "2", "--quiet",
            "--pretrained-encoder", "tiny-random", "--serving-dropoutnet", "dropoutnet-minilm-graph",
            "--models", ",".join(MODELS),
            "--store", str(root / "store"), "--report-dir", str(root / "report"), env=env)
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
    assert "anime2vec train --sample" in md            # the command that produced it
    assert "## DeepAniNet's table on our data" in md
    rows = {r["variant"]: r for r in report["deepaninet_table"]}
    assert rows["static MiniLM + graph"]["model"] == "dropoutnet-minilm-graph"
    assert 0 <= rows["pre-trained MiniLM + graph"]["cold whole R@100"] <= 1
    assert (root / "report" / "recall_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report


def test_train_writes_a_verifiable_bundle_with_metrics(trained):
    root, _ = trained
    (bundle,) = [p for p in (root / "store").iterdir() if not p.name.startswith(".")]
    b = load_bundle(bundle)
    m = b.manifest
    assert m["model"] == "anime2vec-hybrid" and m["data"]["source"] == "sample"
    assert m["dims"]["n_items"] == 800 and b.arrays["item_tower"].shape == (800, m["dims"]["tower_dim"])
    assert "recall@100" in m["metrics"]["cold_whole"] and m["hyperparameters"]["hybrid"]["users"]
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


def test_a_graph_bundle_serves_its_item_vectors(trained):
    """The served DropoutNet reads [text ; graph block]. The ranker rebuilds an item's vector from
    its text with an empty graph block (a new anime has no recommendation pairs): for a cold
    catalogue item without pairs that must reproduce the trained item vector exactly, and for a
    cold item with pairs it must not (the graph block carries its neighbours' factors)."""
    import numpy as np

    from services.ranker.model import ServingModel

    root, _ = trained
    (bundle,) = [p for p in (root / "store").iterdir() if not p.name.startswith(".")]
    b = load_bundle(bundle)
    assert b.manifest["dropoutnet"] == "dropoutnet-minilm-graph"
    graph = b.arrays["graph_content"]
    assert graph.shape == (800, b.manifest["dims"]["graph_dim"]) == (800, b.manifest["dims"]["factors"] + 1)
    m = ServingModel(b, device="cpu")
    cold = ~m.warm
    lonely = np.flatnonzero(cold & ~np.any(graph != 0, axis=1))
    paired = np.flatnonzero(cold & np.any(graph != 0, axis=1))
    assert len(lonely) and len(paired)
    for i in lonely[:3]:
        np.testing.assert_allclose(m.item_vector(None, m.content[i], m.hybrid.psi[i]), m.item_tower[i],
                                   rtol=1e-4, atol=1e-5)
    j = paired[0]
    assert not np.allclose(m.item_vector(None, m.content[j], m.hybrid.psi[j]), m.item_tower[j], atol=1e-4)
