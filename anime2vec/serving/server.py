"""Build a gRPC server the way every anime2vec service runs: bounded thread pool and concurrency,
an observing interceptor (metrics, one JSON log line per call, errors mapped to statuses), standard
health checking and reflection, Prometheus metrics over HTTP, TLS or mutual TLS when configured
(with an optional plaintext health-only port for probes), and a graceful SIGTERM shutdown.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import ServiceError, invalid_argument
from .metrics import Metrics, MetricsHttpServer, create_metrics, start_metrics_server
from .settings import ServiceSettings
from .tls import ServerTLS

log = logging.getLogger("anime2vec.serving")
rpc_log = logging.getLogger("anime2vec.rpc")

_HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"


@dataclass(frozen=True)
class _MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler wrapper can answer
    INVALID_ARGUMENT (grpc itself would answer INTERNAL, blaming the server)."""

    error: str


class ObservingInterceptor(grpc.ServerInterceptor):
    """Wraps every unary-unary handler: counts and times the call by final status code, logs one
    JSON line (method, code, duration, peer; never bodies or metadata), turns `ServiceError` into
    its rich status and any other exception into INTERNAL with an error id that matches the log.
    Streaming handlers (health Watch, reflection) are passed through untouched: wrapping them
    would hide grpc's non-blocking Watch implementation."""

    def __init__(self, service: str, metrics: Metrics):
        self.service, self.metrics = service, metrics

    def intercept_service(self, continuation, handler_call_details):
        # Called on every RPC; `handler` may be fresh per call (an auth interceptor's abort), so
        # wrappers are built per call, never cached by handler.
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._observe(handler_call_details.method, handler.unary_unary),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _observe(self, method: str, behaviour: Callable):
        labels = {"service": self.service, "method": method.lstrip("/")}
        level = logging.DEBUG if method.startswith(_HEALTH_PREFIX) else logging.INFO

        def observed(request, context: grpc.ServicerContext):
            start = time.perf_counter()
            code, error_id = grpc.StatusCode.OK, None
            in_flight = self.metrics.rpc_in_flight.labels(**labels)
            in_flight.inc()
            try:
                if isinstance(request, _MalformedRequest):
                    raise invalid_argument({"request": f"not a valid message: {request.error}"})
                response = behaviour(request, context)
                code = context.code() or grpc.StatusCode.OK
                if code == grpc.StatusCode.OK and not context.is_active():
                    code = grpc.StatusCode.CANCELLED   # the caller left (cancel or deadline)
                return response
            except ServiceError as e:
                code = e.code
                context.abort_with_status(e.to_status())
            except Exception:
                if context.code() is not None:     # context.abort(): already a status, pass it on
                    code = context.code()
                    raise
                code, error_id = grpc.StatusCode.INTERNAL, uuid.uuid4().hex[:12]
                log.exception("unhandled exception in %s", method, extra={"error_id": error_id})
                context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id})")
            finally:
                elapsed = time.perf_counter() - start
                in_flight.dec()
                self.metrics.rpc_latency.labels(**labels).observe(elapsed)
                self.metrics.rpc_requests.labels(**labels, code=code.name).inc()
                fields = {"method": method, "code": code.name, "duration_ms": round(elapsed * 1e3, 3),
                          "peer": context.peer()}
                if error_id:
                    fields["error_id"] = error_id
                rpc_log.log(level, "rpc", extra=fields)

        return observed


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds until the caller's deadline, or None when it set none. grpc reports "no deadline"
    as an astronomically large number that overflows `Future.result`, `Event.wait` and friends,
    so pass this, not `context.time_remaining()`, to anything that blocks (or to a downstream
    call's timeout)."""
    remaining = context.time_remaining()
    return remaining if remaining < 86_400 * 365 else None


def _tolerant(deserialize: Callable | None) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:   # protobuf's DecodeError, or anything a custom parser raises
            return _MalformedRequest(str(e) or type(e).__name__)

    return parse


class RunningServer:
    """A started server. `wait_for_termination()` blocks until SIGTERM/SIGINT (or `request_stop`),
    then shuts down gracefully: health NOT_SERVING, in-flight RPCs get `shutdown_grace_s`, then
    the `on_stop` callbacks run and the metrics endpoint closes."""

    def __init__(self, settings: ServiceSettings, service_name: str, server: grpc.Server, port: int,
                 health_servicer: health.HealthServicer, metrics: Metrics, metrics_http: MetricsHttpServer,
                 on_stop: Sequence[Callable[[], None]], health_server: grpc.Server | None = None,
                 health_port: int | None = None):
        self.settings, self.service_name, self.server, self.port = settings, service_name, server, port
        self.health, self.metrics, self._metrics_http = health_servicer, metrics, metrics_http
        self.health_port = health_port   # the plaintext health-only port, if any
        self._health_server = health_server
        self._on_stop = list(on_stop)
        self._stop_requested = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    @property
    def metrics_port(self) -> int:
        return self._metrics_http.port

    def set_serving(self, service: str, serving: bool) -> None:
        """Report one service (full proto name, or "" for the whole server) as (not) serving."""
        self.health.set(service, health_pb2.HealthCheckResponse.SERVING if serving
                        else health_pb2.HealthCheckResponse.NOT_SERVING)

    def request_stop(self) -> None:
        """Ask `wait_for_termination` to shut down; safe from signal handlers and other threads."""
        self._stop_requested.set()

    def wait_for_termination(self, handle_signals: bool = True) -> None:
        received: list[int] = []
        if handle_signals:
            # The handler only records and sets an event: logging from a signal handler can
            # deadlock on the logging lock the interrupted code holds.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _frame: (received.append(signum), self.request_stop()))
        # Short waits keep the main thread responsive to signals.
        while not self._stop_requested.wait(0.5):
            pass
        if received:
            log.info("received %s, shutting down", signal.Signals(received[0]).name)
        self.stop()

    def stop(self) -> None:
        """Graceful shutdown; idempotent, and only the first caller does the work."""
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        self.health.enter_graceful_shutdown()
        log.info("stopping", extra={"grace_s": self.settings.shutdown_grace_s})
        self.server.stop(self.settings.shutdown_grace_s).wait()
        if self._health_server is not None:
            self._health_server.stop(None)
        for callback in self._on_stop:
            callback()
        self._metrics_http.close()
        log.info("stopped")


def build_server(
    settings: ServiceSettings,
    service_name: str,
    add_servicers: Callable[[grpc.Server], None],
    health_services: Sequence[str],
    *,
    metrics: Metrics | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    on_stop: Sequence[Callable[[], None]] = (),
) -> RunningServer:
    """Create, bind and start a server.

    service_name: short name for metrics and logs ("encoder"). add_servicers: registers the
    service implementations on the server. health_services: full proto service names reported
    SERVING in the health service and listed by reflection ("anime2vec.v1.EncoderService").
    interceptors run inside the observing one, so their aborts (e.g. authentication) are counted.
    on_stop: run after in-flight RPCs finished during shutdown (e.g. stop a batching thread).
    """
    metrics = metrics or create_metrics()
    executor = futures.ThreadPoolExecutor(settings.max_workers, thread_name_prefix=f"{service_name}-rpc")
    server = grpc.server(
        executor,
        interceptors=[ObservingInterceptor(service_name, metrics), *interceptors],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),   # a second server on a busy port must fail, not share it
        ],
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in health_services:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*health_services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)

    tls = settings.server_tls()
    port = _bind(server, f"{settings.host}:{settings.grpc_port}", tls)
    health_server = health_port = None
    try:
        if settings.health_port is not None:
            health_server, health_port = _health_only_server(health_servicer, settings)
        metrics_http = start_metrics_server(metrics.registry, settings.host, settings.metrics_port)
    except RuntimeError:
        server.stop(None)   # release the ports bound so far
        if health_server is not None:
            health_server.stop(None)
        raise
    server.start()
    if health_server is not None:
        health_server.start()
    if tls is None:
        log.warning("TLS is off: gRPC is served in plaintext (set %s and %s to serve TLS)",
                    settings.env_name("tls_cert_file"), settings.env_name("tls_key_file"))
    log.info("serving", extra={"grpc_port": port, "metrics_port": metrics_http.port, "health_port": health_port,
                               "tls": "off" if tls is None else tls.mode, "services": list(health_services)})
    return RunningServer(settings, service_name, server, port, health_servicer, metrics, metrics_http, on_stop,
                         health_server=health_server, health_port=health_port)


def _bind(server: grpc.Server, address: str, tls: ServerTLS | None) -> int:
    try:
        port = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls.credentials())
    except RuntimeError as e:
        raise RuntimeError(f"cannot bind gRPC to {address}: {e}") from e
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC to {address}")
    return port


def _health_only_server(health_servicer: health.HealthServicer, settings: ServiceSettings) -> tuple[grpc.Server, int]:
    """A plaintext server with the standard health service only (the same servicer, so it reports
    exactly what the main port does): Kubernetes gRPC probes cannot speak TLS. It exposes no data."""
    server = grpc.server(futures.ThreadPoolExecutor(2, thread_name_prefix="health"), maximum_concurrent_rpcs=16,
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        return server, _bind(server, f"{settings.host}:{settings.health_port}", None)
    except RuntimeError:
        server.stop(None)
        raise
