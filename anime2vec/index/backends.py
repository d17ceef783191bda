"""Which backend serves an index: a Qdrant server when a URL is configured, else the embedded engine.

Kept apart from base.py (the interface both backends implement) so that the backends depend on the
interface and nothing depends back on them; each backend is imported only when chosen (qdrant-client
is a slow import the embedded default never needs).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from anime2vec.index.base import ItemIndex, QueryHook


def open_index(
    root: Path | None,
    url: str | None,
    api_key: str | None = None,
    *,
    on_query: QueryHook | None = None,
    timeout_s: float = 5.0,
    search_batch: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> ItemIndex:
    """A Qdrant server index when `url` is set (checked reachable now: IndexUnavailable within
    about `timeout_s` otherwise), else the embedded index stored under `root`, where up to
    `search_batch` concurrent searches share one engine call, each call's size passed to `on_batch`
    (the server backend's calls release the GIL and overlap on their own)."""
    if url:
        from anime2vec.index.client import QdrantItemIndex

        return QdrantItemIndex.connect(url, api_key=api_key, timeout_s=timeout_s, on_query=on_query)
    if root is None:
        raise ValueError("open_index needs a root directory when no Qdrant URL is given")
    from anime2vec.index.edge import EdgeItemIndex

    return EdgeItemIndex(Path(root), on_query=on_query, max_batch=search_batch, on_batch=on_batch)
