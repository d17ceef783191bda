"""Ranker process: `python -m services.ranker.server` (settings: A2V_RANKER_*, QDRANT_URL)."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import torch

from anime2vec.bundle import BundleError, load_bundle
from anime2vec.index.backends import open_index
from anime2vec.index.base import IndexUnavailable
from anime2vec.index.edge import EdgeItemIndex
from anime2vec.serving import heap
from anime2vec.serving.encoder_client import EncoderClient
from anime2vec.serving.logging import configure_logging
from anime2vec.serving.metrics import Metrics, create_metrics
from anime2vec.serving.server import RunningServer, build_server, handle_stop_signals
from anime2vec.serving.settings import SettingsError
from anime2vec.serving_model.model import ServingModel
from anime2vec.v1 import ranker_pb2, ranker_pb2_grpc

from .catalog_follower import CatalogFollower
from .lifecycle import pick_bundles
from .recovery import StoreUnavailable, recover_alias, recover_collections
from .service import RankerServicer
from .settings import RankerSettings
from .stores import open_stores

log = logging.getLogger("services.ranker")
SERVICE_NAME = ranker_pb2.DESCRIPTOR.services_by_name["RankerService"].full_name


def start(settings: RankerSettings, metrics: Metrics | None = None) -> tuple[RunningServer, RankerServicer]:
    metrics = metrics or create_metrics()
    index = open_index(
        settings.data_dir / "qdrant",
        settings.qdrant_url or None,
        settings.qdrant_api_key or None,
        on_query=lambda op, sec: metrics.qdrant_query.labels(operation=op).observe(sec),
        search_batch=settings.search_batch,
        on_batch=metrics.search_batch_size.observe,
    )
    # without a Qdrant URL the index is embedded: its state is ours to check and repair (services/ranker/recovery.py)
    embedded = index if isinstance(index, EdgeItemIndex) else None
    if embedded is not None:
        recover_alias(embedded, settings.data_dir)
    stores = open_stores(settings, metrics)  # PostgreSQL when A2V_RANKER_STORE_DSN is set, else SQLite files
    encoder = EncoderClient(settings.encoder_address, settings.encoder_timeout_s, tls=settings.outbound_tls())
    servicer = RankerServicer(settings, index, stores.added, metrics, encoder=encoder, feedback=stores.feedback)
    model = ServingModel(
        first_valid_bundle(pick_bundles(settings, servicer.lifecycle.alias_target)), device=settings.device or None
    )
    if embedded is not None:
        recover_collections(embedded, model.version, settings.data_dir)
    servicer.lifecycle.activate(model)
    if index.alias_target() is None:
        index.set_alias(model.version)
    stop = threading.Event()

    def follow():
        while not stop.wait(settings.alias_poll_s):
            servicer.lifecycle.maybe_follow_alias()

    if settings.alias_poll_s > 0:
        threading.Thread(target=follow, name="alias-follower", daemon=True).start()
    catalog = CatalogFollower(servicer, stores, metrics, settings.catalog_follow_s)
    catalog.start()

    def close():
        stop.set()
        catalog.stop()
        servicer.encoder.close()
        index.close()
        stores.close()

    running = build_server(
        settings,
        "ranker",
        lambda server: ranker_pb2_grpc.add_RankerServiceServicer_to_server(servicer, server),
        [SERVICE_NAME],
        metrics=metrics,
        on_stop=[close],
    )
    return running, servicer


def first_valid_bundle(paths: list[Path]):
    """The first of `paths` that loads and verifies; when none does, the first one's error."""
    first_error: BundleError | None = None
    for path in paths:
        try:
            return load_bundle(path)
        except BundleError as e:
            first_error = first_error or e
            if len(paths) > 1:
                log.error("not serving %s: %s; trying an older bundle", path.name, e)
    assert first_error is not None, "no bundle to load"  # pick_bundles never gives an empty list
    raise first_error


def one_thread_per_request() -> None:
    """Torch and BLAS on one thread each, for the whole process. A request's math is one query
    through a tower and one matrix-vector product over the served vectors (memory_scan.py):
    concurrency comes from the RPC threads (BLAS runs outside the GIL), and intra-op threads only
    contend with them. Measured with BLAS left at its default (a thread per core, spinning): 23x the
    int8 floor in CPU per request instead of 10x, and throughput falling from 130 to 48 req/s at 16
    requests in flight (bench/gateway.py); torch likewise stalled (5 ms vs up to 190 ms)."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1)  # process-wide: kept after the call returns


def main() -> int:
    try:
        settings = RankerSettings.from_env()
    except SettingsError as e:
        print(e, file=sys.stderr)
        return 2
    configure_logging(settings.log_level, "ranker")
    handle_stop_signals()  # a stop signal while starting stops it once it serves, gracefully
    one_thread_per_request()
    try:
        running, _ = start(settings)
    except (BundleError, IndexUnavailable, StoreUnavailable) as e:
        log.error("cannot start: %s", e)
        return 1
    heap.settle()  # the bundle loaded: full collections no longer walk it (anime2vec/serving/heap.py)
    running.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
