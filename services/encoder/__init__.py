"""The encoder service: text → anime2vec vectors, micro-batched across concurrent requests."""
