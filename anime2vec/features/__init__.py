"""Content features of anime text: the MiniLM encoder ("anime2vec"), its encoding cache, TF-IDF
(+SVD) features, and whitening against embedding anisotropy.

Names are imported lazily so that `from anime2vec.features import Whitener` does not pay for
importing torch and transformers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TextEncoder": "encoder",
    "default_model_dir": "encoder",
    "EncodingCache": "cache",
    "CacheStats": "cache",
    "encode_cached": "cache",
    "TfidfFeatures": "tfidf",
    "Whitener": "whiten",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
