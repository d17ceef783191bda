"""Gateway process: `python -m services.gateway.server` (settings: services/gateway/settings.py).

The gateway reports NOT_SERVING in health checks until its title index has loaded from the
ranker's catalogue; until then, requests that name anime by title get UNAVAILABLE.
"""

from __future__ import annotations

import logging
import sys

from anime2vec.serving import heap
from anime2vec.serving.encoder_client import EncoderClient
from anime2vec.serving.limits import LearntLimits
from anime2vec.serving.logging import configure_logging
from anime2vec.serving.metrics import Metrics, create_metrics, set_model_info
from anime2vec.serving.server import RunningServer, build_server, handle_stop_signals
from anime2vec.serving.settings import SettingsError
from anime2vec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, ranker_pb2

from .auth import ApiKeyInterceptor, load_api_keys
from .catalog import CatalogueSync
from .downstream import Ranker
from .service import GatewayServicer
from .settings import GatewaySettings

log = logging.getLogger("services.gateway")

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
CATALOG_PAGE_SIZE = 5000


def start(settings: GatewaySettings, metrics: Metrics | None = None) -> tuple[RunningServer, GatewayServicer]:
    """Start serving; the caller owns the returned server (wait_for_termination or stop)."""
    metrics = metrics or create_metrics()
    keys = load_api_keys(settings)
    tls = settings.outbound_tls()
    ranker = Ranker(settings.ranker_address, settings.ranker_timeout_s, settings.max_message_bytes, tls=tls)
    encoder = EncoderClient(settings.encoder_address, settings.encoder_timeout_s, tls=tls)
    running: RunningServer | None = None

    def on_loaded(info: common_pb2.ModelInfo) -> None:
        set_model_info(metrics, "gateway", info.version, info.encoder_name, info.encoder_dim)
        # the title index is built after start-up settled the heap: without this, each full collection
        # walked it with every request waiting (~100 ms every ~10 s under load, measured)
        heap.resettle()
        if running is not None:
            running.set_serving(SERVICE_NAME, True)

    limits = LearntLimits()  # the ranker's request limits: the title-index poll keeps them current
    catalogue = CatalogueSync(
        fetch_info=lambda: limits.learn(ranker.get_model_info()).model,
        fetch_page=lambda token: ranker.list_catalog(
            ranker_pb2.ListCatalogRequest(page_size=CATALOG_PAGE_SIZE, page_token=token),
            timeout_s=settings.catalog_timeout_s,
        ),
        poll_s=settings.catalog_poll_s,
        on_loaded=on_loaded,
    )
    servicer = GatewayServicer(settings, ranker, encoder, catalogue, metrics, limits)

    def close() -> None:
        catalogue.stop()
        encoder.close()
        ranker.close()

    try:
        running = build_server(
            settings,
            "gateway",
            lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server),
            [SERVICE_NAME],
            metrics=metrics,
            interceptors=[ApiKeyInterceptor(keys)],
            on_stop=[close],
        )
    except BaseException:
        encoder.close()
        ranker.close()
        raise
    running.set_serving(SERVICE_NAME, False)
    catalogue.start()
    return running, servicer


def main() -> int:
    try:
        settings = GatewaySettings.from_env()
        load_api_keys(settings)
    except (SettingsError, ValueError, OSError) as e:
        print(e, file=sys.stderr)
        return 2
    configure_logging(settings.log_level, "gateway")
    handle_stop_signals()  # a stop signal while starting stops it once it serves, gracefully
    try:
        running, _ = start(settings)
    except RuntimeError as e:  # a port in use
        log.error("cannot start: %s", e)
        return 1
    heap.settle()  # full collections no longer walk what start-up loaded (anime2vec/serving/heap.py)
    running.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
