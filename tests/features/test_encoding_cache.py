from __future__ import annotations

import numpy as np
import pytest

from anime2vec.features.cache import CacheStats, EncodingCache, encode_cached, text_key
from anime2vec.features.encoder import TextEncoder

TEXTS = ["A pirate crew sails for treasure.", "A girl bakes bread.", "A pirate crew sails for treasure.", ""]


class CountingEncoder:
    """Wraps an encoder and records every batch of texts it is asked to encode."""

    def __init__(self, inner: TextEncoder):
        self.inner, self.calls = inner, []
        self.fingerprint, self.dim = inner.fingerprint, inner.dim

    def encode(self, texts, batch_size=None, progress=False):
        self.calls.append(list(texts))
        return self.inner.encode(texts, batch_size=batch_size, progress=progress)


@pytest.fixture(scope="module")
def tiny():
    return TextEncoder.tiny_random(seed=0)


def test_second_call_encodes_nothing(tmp_path, tiny):
    enc = CountingEncoder(tiny)
    with EncodingCache(tmp_path / "c.sqlite") as cache:
        first = encode_cached(enc, TEXTS, cache)
        assert enc.calls == [[TEXTS[0], TEXTS[1], TEXTS[3]]]  # the duplicate is encoded once
        assert cache.last_stats == CacheStats(hits=0, misses=4, encoded=3)
        np.testing.assert_array_equal(first, tiny.encode(TEXTS))

        second = encode_cached(enc, TEXTS, cache)
        assert len(enc.calls) == 1
        assert cache.last_stats == CacheStats(hits=4, misses=0, encoded=0)
        np.testing.assert_array_equal(second, first)


def test_only_new_texts_are_encoded(tmp_path, tiny):
    enc = CountingEncoder(tiny)
    with EncodingCache(tmp_path / "c.sqlite") as cache:
        encode_cached(enc, TEXTS[:2], cache)
        out = encode_cached(enc, ["A new one.", *TEXTS], cache)
        assert enc.calls[1] == ["A new one.", ""]
        assert cache.last_stats == CacheStats(hits=3, misses=2, encoded=2)
        np.testing.assert_array_equal(out, tiny.encode(["A new one.", *TEXTS]))


def test_other_fingerprint_misses(tmp_path, tiny):
    other = CountingEncoder(TextEncoder.tiny_random(seed=1))
    with EncodingCache(tmp_path / "c.sqlite") as cache:
        encode_cached(tiny, TEXTS, cache)
        out = encode_cached(other, TEXTS, cache)
        assert cache.last_stats == CacheStats(hits=0, misses=4, encoded=3)
        np.testing.assert_array_equal(out, other.inner.encode(TEXTS))
        assert cache.count(tiny.fingerprint) == cache.count(other.fingerprint) == 3
        assert cache.count() == 6


def test_cache_survives_reopening(tmp_path, tiny):
    path = tmp_path / "sub" / "c.sqlite"
    with EncodingCache(path) as cache:
        first = encode_cached(tiny, TEXTS, cache)
    enc = CountingEncoder(tiny)
    with EncodingCache(path) as cache:
        again = encode_cached(enc, TEXTS, cache)
    assert enc.calls == []
    np.testing.assert_array_equal(again, first)


def test_empty_input_encodes_nothing(tmp_path, tiny):
    enc = CountingEncoder(tiny)
    with EncodingCache(tmp_path / "c.sqlite") as cache:
        out = encode_cached(enc, [], cache)
    assert out.shape == (0, tiny.dim) and enc.calls == []


def test_wrong_dimension_in_cache_is_an_error(tmp_path, tiny):
    with EncodingCache(tmp_path / "c.sqlite") as cache:
        cache.put_many(tiny.fingerprint, {text_key(TEXTS[0]): np.ones(8, np.float32)})
        with pytest.raises(ValueError, match="holds 8 floats"):
            encode_cached(tiny, TEXTS[:1], cache)


def test_default_path_is_under_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("A2V_CACHE_DIR", str(tmp_path / "cache"))
    with EncodingCache() as cache:
        assert cache.path == tmp_path / "cache" / "encodings.sqlite"
        assert cache.path.is_file()


class FailingEncoder(CountingEncoder):
    """Encodes `ok` batches, then fails as an interrupted run would."""

    def __init__(self, inner: TextEncoder, ok: int):
        super().__init__(inner)
        self.ok = ok

    def encode(self, texts, batch_size=None, progress=False):
        if len(self.calls) >= self.ok:
            raise KeyboardInterrupt
        return super().encode(texts, batch_size, progress)


def test_an_interrupted_encode_resumes_where_it_stopped(tmp_path, tiny):
    texts = [f"Anime number {i} about pirates and bread." for i in range(10)]
    with EncodingCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(KeyboardInterrupt):
            encode_cached(FailingEncoder(tiny, ok=2), texts, cache, chunk=3)
        assert cache.count(tiny.fingerprint) == 6  # two chunks were stored before the stop
        enc = CountingEncoder(tiny)
        out = encode_cached(enc, texts, cache, chunk=3)
        assert [t for call in enc.calls for t in call] == texts[6:]
        assert cache.last_stats == CacheStats(hits=6, misses=4, encoded=4)
        np.testing.assert_allclose(out, tiny.encode(texts), atol=1e-6)
