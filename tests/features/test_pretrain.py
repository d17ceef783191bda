"""In-domain MLM pre-training (anime2vec/features/pretrain.py) on a tiny random BERT.

The base model is a 2-layer, 32-wide BERT with the real MiniLM tokenizer, saved to a temporary
directory, so the whole path (load → MLM → save → TextEncoder) is the real one, in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from anime2vec.features.encoder import TextEncoder, default_model_dir
from anime2vec.features.pretrain import Corpus, PretrainConfig, build_corpus, chunk, pretrain

SUBJECTS = ["the pirate crew", "a young witch", "the giant robot", "two brothers", "a quiet girl", "the detective"]
VERBS = ["sails across", "searches for", "fights for", "dreams of", "runs through", "protects"]
OBJECTS = [
    "the hidden treasure",
    "the lost city",
    "the old bakery",
    "the endless ocean",
    "the school festival",
    "the ancient sword",
]


def repetitive_corpus(n: int = 240, seed: int = 0) -> Corpus:
    """Sentences from a small grammar: learnable in a few dozen steps, never memorised verbatim."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        parts = [f"{SUBJECTS[rng.integers(6)]} {VERBS[rng.integers(6)]} {OBJECTS[rng.integers(6)]}." for _ in range(3)]
        texts.append(" ".join(p.capitalize() for p in parts))
    return Corpus(texts, ["item"] * n, {"kind": "test grammar"})


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "README.md").write_text("# tiny-test-bert\n")
    return path


def tiny_config(out, base, **kw) -> PretrainConfig:
    # One thread: tiny ops are dominated by thread hand-offs, above all on a shared machine.
    args = dict(
        out=out,
        base=base,
        max_steps=60,
        head_steps=20,
        batch_size=8,
        max_length=32,
        lr=5e-3,
        head_lr=5e-2,
        device="cpu",
        threads=1,
        seed=0,
        eval_frac=0.1,
        eval_max_seqs=32,
        max_minutes=30,
        log_every=20,
    )
    args.update(kw)
    return PretrainConfig(**args)


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "adapted"
    return out, pretrain(repetitive_corpus(), tiny_config(out, tiny_base))


def test_held_out_mlm_loss_decreases(trained):
    _, r = trained
    # The head phase alone improves on the random head; full training improves on the head phase.
    assert r["eval_loss_before"] < r["eval_loss_random_head"] - 0.5
    assert r["eval_loss_after"] < r["eval_loss_before"] - 1.0, r["eval"]
    assert r["steps"] == 60 and r["stopped_by"] == "max_steps"
    assert [e["phase"] for e in r["eval"]] == ["random head", "frozen encoder, trained head", "final"]
    assert r["corpus"]["eval_texts"] == 24 and r["corpus"]["train_texts"] == 216


def test_report_is_written_beside_the_encoder(trained):
    out, r = trained
    saved = json.loads((out / "pretrain.json").read_text())
    assert saved["eval_loss_after"] == r["eval_loss_after"]
    assert saved["loss_curve"] and saved["loss_curve"][-1]["step"] == 60
    assert saved["device"] == "cpu" and saved["config"]["seed"] == 0


def test_adapted_encoder_loads_through_text_encoder(trained, tiny_base):
    out, _ = trained
    adapted = TextEncoder(out, device="cpu")
    again = TextEncoder(out, device="cpu")
    base = TextEncoder(tiny_base, device="cpu")
    v = adapted.encode(["The pirate crew sails across the endless ocean.", "A quiet girl dreams of the old bakery."])
    assert v.shape == (2, 32) and adapted.dim == 32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert adapted.name == "adapted"
    # Complete checkpoint (pooler included): loading twice gives the same fingerprint, so cache hits.
    assert adapted.fingerprint == again.fingerprint
    assert adapted.fingerprint != base.fingerprint
    # The weights really changed: the same text encodes differently from the base.
    b = base.encode(["The pirate crew sails across the endless ocean."])
    assert float(v[0] @ b[0]) < 0.999


def test_same_seed_same_result_different_seed_differs(trained, tiny_base, tmp_path):
    _, first = trained
    again = pretrain(repetitive_corpus(), tiny_config(tmp_path / "again", tiny_base))
    assert again["eval_loss_after"] == first["eval_loss_after"]
    assert [c["loss"] for c in again["loss_curve"]] == [c["loss"] for c in first["loss_curve"]]
    # Seed 1 for the first 20 steps (the head phase) trains on other batches and masks.
    other = pretrain(repetitive_corpus(), tiny_config(tmp_path / "other", tiny_base, seed=1, max_steps=20))
    at_20 = next(c for c in first["loss_curve"] if c["step"] == 20)
    assert other["loss_curve"][-1]["step"] == 20 and other["loss_curve"][-1]["loss"] != at_20["loss"]


def test_existing_output_is_refused_unless_overwrite(trained, tiny_base):
    out, _ = trained
    with pytest.raises(FileExistsError):
        pretrain(repetitive_corpus(), tiny_config(out, tiny_base, max_steps=1))


def test_chunk_windows_texts_with_special_tokens():
    ids = list(range(100, 150))  # 50 tokens, windows of 10 + [CLS]/[SEP]
    pieces = chunk(ids, 12, 1, 2, max_chunks=3, min_tokens=4)
    assert pieces == [[1, *range(100, 110), 2], [1, *range(110, 120), 2], [1, *range(120, 130), 2]]
    assert chunk(list(range(22)), 12, 1, 2, max_chunks=9, min_tokens=4) == [[1, *range(10), 2], [1, *range(10, 20), 2]]
    assert chunk([7, 8], 12, 1, 2, max_chunks=9, min_tokens=4) == [[1, 7, 8, 2]]  # a short text is kept whole


@pytest.fixture(scope="module")
def sample_data():
    from anime2vec.data.loader import load_mal
    from anime2vec.paths import default_data_dir

    if not (default_data_dir() / "sample").is_dir():
        pytest.skip("sample data not found (set A2V_DATA_DIR)")
    return load_mal(sample=True)


def test_corpus_uses_reviews_and_rec_pairs_of_training_items_only(sample_data):
    from anime2vec.data.dataset import build_dataset

    ds = build_dataset(sample_data.catalog, sample_data.interactions, seed=0)
    train = set(ds.item_ids[ds.train_items].tolist())
    cold = set(ds.item_ids.tolist()) - train
    corpus = build_corpus(sample_data, split_seed=0)
    counts = corpus.counts()
    assert counts["item"] == ds.n_items  # every item's content, cold ones included
    reviews = {t for t, s in zip(corpus.texts, corpus.sources) if s == "review"}
    cat = sample_data.catalog
    train_reviews = {" ".join(cat.at[a, "review"].split()) for a in train if cat.at[a, "review"]}
    cold_reviews = {" ".join(cat.at[a, "review"].split()) for a in cold if cat.at[a, "review"]} - train_reviews
    assert reviews == train_reviews and cold_reviews and not reviews & cold_reviews
    recs = [t for t, s in zip(corpus.texts, corpus.sources) if s == "recs"]
    assert recs and all(t.startswith("Title: ") and "Fans also recommend: " in t for t in recs)
    assert corpus.description["rec_pairs_used"] < len(sample_data.recs)
    strict = build_corpus(sample_data, split_seed=0, item_text="train")
    assert strict.counts()["item"] == len(train)


def test_cli_pretrain_then_encode_into_the_cache(tiny_base, tmp_path, capsys, sample_data, request):
    from anime2vec.cli import main

    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))  # `encode --threads` sets it for the process
    out = tmp_path / "enc"
    assert (
        main(
            [
                "pretrain",
                "--sample",
                "--base",
                str(tiny_base),
                "--out",
                str(out),
                "--max-steps",
                "4",
                "--head-steps",
                "2",
                "--batch-size",
                "4",
                "--max-length",
                "32",
                "--eval-max-seqs",
                "8",
                "--device",
                "cpu",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.splitlines()[0])["steps"] == 4
    assert main(["pretrain", "--sample", "--base", str(tiny_base), "--out", str(out)]) == 2  # exists
    cache = tmp_path / "encodings.sqlite"
    args = [
        "encode",
        "--encoder",
        str(out),
        "--sample",
        "--cache",
        str(cache),
        "--quiet",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert first["texts"] == 800 and first["encoded"] > 0 and first["dim"] == 32
    assert first["fingerprint"] == TextEncoder(out, device="cpu").fingerprint
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert second["encoded"] == 0 and second["hits"] == 800


def test_time_bound_stops_and_still_saves(tiny_base, tmp_path):
    out = tmp_path / "timed"
    r = pretrain(repetitive_corpus(), tiny_config(out, tiny_base, max_minutes=0.001))
    assert r["stopped_by"] == "max_minutes" and r["steps"] < 60
    assert TextEncoder(out, device="cpu").dim == 32
    assert json.loads((out / "pretrain.json").read_text())["stopped_by"] == "max_minutes"
    # without held-out texts too (nothing to evaluate; the bound used to be ignored then)
    r = pretrain(
        repetitive_corpus(), tiny_config(tmp_path / "timed-no-eval", tiny_base, max_minutes=0.001, eval_frac=0)
    )
    assert r["stopped_by"] == "max_minutes" and r["steps"] < 60 and r["eval"] == []


def test_schedule_warms_up_decays_and_replans_to_the_time_left():
    from anime2vec.features.pretrain import _Schedule

    s = _Schedule(lr=1.0, max_steps=100, warmup_frac=0.1)
    assert [round(s(k), 2) for k in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert s(10) == 1.0 and 0 < s(55) < 1.0 and s(100) == 0.0
    s.plan(done=5, seconds_left=35.0, seconds_per_step=1.0)  # only 35 more steps fit: decay ends at 40
    assert s.planned == 40 and s.warmup == 4
    assert s(39) > 0.0 and s(40) == 0.0
    s.plan(done=20, seconds_left=1e9, seconds_per_step=1.0)  # never beyond max_steps
    assert s.planned == 100
