from __future__ import annotations

import numpy as np
import pytest
import torch

from anime2vec.features.encoder import MIN_AGREEMENT, TextEncoder, cpu_has_native_bf16, default_model_dir

PIRATES_A = (
    "Monkey D. Luffy sets out to sea in a small boat to find the legendary treasure of the Pirate King "
    "and gathers a crew of pirates on his voyage across the ocean."
)
PIRATES_B = (
    "A band of pirates sails their ship from island to island, fighting rival pirate crews and the navy "
    "in search of a hidden treasure."
)
COOKING = (
    "A quiet high-school girl helps at her grandmother's bakery, learning to bake bread and cook simple "
    "dinners for the neighbours in a sleepy seaside town."
)
# Deliberately not sorted by length, so bucketing must reorder them.
MIXED_LENGTHS = ["Short.", PIRATES_A + " " + COOKING + " " + PIRATES_B, "", COOKING, "Two words", PIRATES_B]


def test_real_minilm_shape_norm_and_name(real_encoder):
    v = real_encoder.encode([PIRATES_A, PIRATES_B, COOKING])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert real_encoder.dim == 384
    assert real_encoder.name == "all-MiniLM-L6-v2"
    assert len(real_encoder.fingerprint) == 16 and int(real_encoder.fingerprint, 16) >= 0


def test_real_minilm_similar_synopses_score_higher(real_encoder):
    a, b, cook = real_encoder.encode([PIRATES_A, PIRATES_B, COOKING])
    assert a @ b > a @ cook + 0.2
    assert a @ b > b @ cook + 0.2


def test_real_minilm_matches_sentence_transformers(real_encoder):
    """The reference implementation of all-MiniLM-L6-v2 (mean pooling, normalise, 256 tokens)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(default_model_dir()), device="cpu")
    assert st.max_seq_length == real_encoder.max_length
    ref = st.encode(MIXED_LENGTHS, batch_size=4, convert_to_numpy=True)
    np.testing.assert_allclose(real_encoder.encode(MIXED_LENGTHS, batch_size=4), ref, atol=1e-5)


def test_bf16_agrees_with_fp32_on_real_texts_and_auto_picks_it_only_where_native(real_encoder, sample_anime):
    """The encoder service's default (precision auto) on a CPU: bf16 where the CPU has native bf16
    units and the start-up probe agrees with fp32, checked here on real catalogue texts."""
    texts = [f"{t}. {s}" for t, s in zip(sample_anime["title"], sample_anime["synopsis"]) if s.strip()][:48]
    auto = TextEncoder(device="cpu", precision="auto")
    if not cpu_has_native_bf16():
        assert auto.precision == "fp32" and auto.precision_check == {"native_bf16": False}
        with pytest.raises(ValueError, match="no native bf16"):
            TextEncoder.tiny_random(precision="bf16")
        pytest.skip("no native bf16 on this CPU: fp32 chosen, bf16 refused")
    assert auto.precision == "bf16" and auto.precision_check["min_cosine_vs_fp32"] >= MIN_AGREEMENT
    got, want = auto.encode(texts), real_encoder.encode(texts)
    assert real_encoder.precision == "fp32" and auto.fingerprint == real_encoder.fingerprint
    cosines = np.sum(got * want, axis=1)
    assert cosines.min() >= 0.999 and not np.array_equal(got, want)  # bf16 really ran, and agrees
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_precision_is_checked_and_auto_falls_back_to_fp32_without_native_bf16(monkeypatch):
    import anime2vec.features.encoder as enc

    with pytest.raises(ValueError, match="precision='int4'"):
        TextEncoder.tiny_random(precision="int4")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        TextEncoder.tiny_random(device="cpu", precision="fp16")
    monkeypatch.setattr(enc, "cpu_has_native_bf16", lambda: False)
    tiny = TextEncoder.tiny_random(device="cpu", precision="auto")
    assert tiny.precision == "fp32" and tiny.precision_check == {"native_bf16": False}
    np.testing.assert_array_equal(
        tiny.encode(["A boy becomes a ninja."]),
        TextEncoder.tiny_random(device="cpu").encode(["A boy becomes a ninja."]),
    )


def test_real_minilm_order_preserved_under_bucketing(real_encoder):
    batched = real_encoder.encode(MIXED_LENGTHS, batch_size=2)
    one_by_one = np.stack([real_encoder.encode([t])[0] for t in MIXED_LENGTHS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    # Distinct texts get distinct rows, so a permutation would have shown above.
    assert np.abs(batched[0] - batched[3]).max() > 0.1


def test_tiny_random_is_deterministic_per_seed():
    a, b, c = TextEncoder.tiny_random(seed=3), TextEncoder.tiny_random(seed=3), TextEncoder.tiny_random(seed=4)
    va, vb, vc = (e.encode(MIXED_LENGTHS) for e in (a, b, c))
    assert va.shape == (len(MIXED_LENGTHS), 32) and va.dtype == np.float32
    np.testing.assert_array_equal(va, vb)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert np.abs(va - vc).max() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-5)


def test_tiny_random_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TextEncoder.tiny_random(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_padding_does_not_change_vectors():
    """Mean pooling must ignore padding: a short text batched with a long one equals it alone."""
    enc = TextEncoder.tiny_random(hidden=64, layers=1)
    together = enc.encode(["Short.", PIRATES_A], batch_size=2)
    alone = enc.encode(["Short."])
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)


def test_fingerprint_depends_on_max_length_and_weights():
    base = TextEncoder.tiny_random(seed=0)
    assert TextEncoder.tiny_random(seed=0, max_length=128).fingerprint != base.fingerprint
    assert TextEncoder.tiny_random(seed=0, layers=1).fingerprint != base.fingerprint


def test_empty_and_bad_input():
    enc = TextEncoder.tiny_random()
    assert enc.encode([]).shape == (0, enc.dim)
    with pytest.raises(TypeError, match="not one str"):
        enc.encode("a single string")
    with pytest.raises(TypeError, match=r"texts\[1\] is float"):
        enc.encode(["ok", float("nan")])
    with pytest.raises(ValueError, match="max_length=600"):
        TextEncoder.tiny_random(max_length=600)


def test_encode_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    enc = TextEncoder.tiny_random()
    expected = enc.encode(MIXED_LENGTHS)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: enc.encode(MIXED_LENGTHS, batch_size=2), range(8)))
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-5)


def test_defaults_to_cpu_without_cuda():
    enc = TextEncoder.tiny_random()
    assert enc.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_threaded_tokenization_is_the_tokenizers_own(sample_anime, monkeypatch):
    """More texts than one chunk are tokenized in chunks on threads: the ids, their order and the
    truncation must be exactly what the tokenizer's own call returns, and so must the vectors."""
    import anime2vec.features.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "TOKENIZE_THREADS", 4)  # the threaded path even on a 1-core runner
    enc = TextEncoder.tiny_random(max_length=64)
    synopses = [s for s in sample_anime["synopsis"] if s.strip()]
    texts = (
        (synopses * 3)[: 3 * encoder_module.TOKENIZE_CHUNK + 17] + MIXED_LENGTHS + ["日本語のあらすじ", "word " * 500]
    )
    expected = enc._tokenizer(
        texts, truncation=True, max_length=64, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]
    assert enc._tokenize(texts) == expected
    assert max(len(x) for x in expected) == 64 and min(len(x) for x in expected) == 2  # truncated; "" is [CLS][SEP]
    in_small_calls = np.concatenate([enc.encode(texts[i : i + 100]) for i in range(0, len(texts), 100)])
    np.testing.assert_allclose(enc.encode(texts), in_small_calls, atol=1e-5)


def test_a_forked_child_tokenizes_on_its_own_threads():
    """The tokenizing threads are not inherited by fork: a child that encodes must not wait forever
    on the parent's pool, it starts its own."""
    import os
    import signal
    import time

    import anime2vec.features.encoder as encoder_module

    enc = TextEncoder.tiny_random(max_length=32)
    texts = [f"text {i} about pirates and mecha" for i in range(3 * encoder_module.TOKENIZE_CHUNK)]
    expected = enc._tokenize(texts)  # the parent's pool now exists
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it tokenized the same ids
        os._exit(0 if enc._tokenize(texts) == expected else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung tokenizing")
