"""anime2vec: DropoutNet over WMF factors and BERT-family text encodings, for anime."""

__version__ = "0.1.0"
