"""Build a gRPC server the way every anime2vec service runs: bounded concurrency (per server and,
when configured, per connection), bounds on what one call may hold (call_limits.py: its request
message within REQUEST_TIMEOUT_S, a server deadline of MAX_CALL_S, MAX_WORKERS handlers at once), an
observing interceptor (metrics labelled only with served methods, one JSON log line per call, errors
mapped to statuses), standard health checking and reflection (with a small budget of their own:
they need no key), Prometheus metrics over HTTP, TLS or mutual TLS when configured (with an optional
plaintext health-only port for probes), and a graceful SIGTERM shutdown.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from contextlib import nullcontext
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .call_limits import BoundedRequests, CallEnded, CallLimits, GuardedCall
from .errors import ServiceError, invalid_argument, resource_exhausted
from .metrics import Metrics, MetricsHttpServer, create_metrics, start_metrics_server
from .settings import ServiceSettings
from .tls import ServerTLS

log = logging.getLogger("anime2vec.serving")
rpc_log = logging.getLogger("anime2vec.rpc")

_HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"
# Health checking and reflection: callable by anyone (probes, grpcurl), so bounded on their own.
_PROBE_PREFIXES = (
    _HEALTH_PREFIX,
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
_HEALTH_PORT_RPCS = 16  # calls in progress on the plaintext health-only port
_MAX_LOGGED_METHOD = 200  # a made-up method path is caller-chosen text: clip it in logs


@dataclass(frozen=True)
class _MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler wrapper can answer
    INVALID_ARGUMENT (grpc itself would answer INTERNAL, blaming the server)."""

    error: str


class Refusal(grpc.RpcMethodHandler):
    """A handler that answers `error` without reading the request (e.g. a call without a valid API
    key): the caller cannot make it wait for a message it never sends, so it holds no thread or
    concurrency slot beyond the moment of the answer. grpc sees a client-streaming handler, which is
    what lets it run before any message arrived; on the wire a unary call is the same."""

    request_streaming, response_streaming = True, False
    request_deserializer = response_serializer = None
    unary_unary = unary_stream = stream_stream = None

    def __init__(self, error: ServiceError):
        self.error = error

    def stream_unary(self, requests, context):
        context.abort_with_status(self.error.to_status())


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str):
        self.method, self.invocation_metadata = method, ()


class MethodNames:
    """The methods a server really serves, for metric labels: a made-up method path (any caller can
    send one, with or without a key) is labelled "unknown", so callers cannot mint label values and
    grow /metrics without bound. `recording(server)` is the server as add_servicers should see it:
    every registration passes through and is remembered."""

    UNKNOWN = "unknown"

    def __init__(self) -> None:
        self._generic: list[grpc.GenericRpcHandler] = []
        self._registered: set[str] = set()
        self._known: dict[str, str] = {}  # only served methods: bounded by the services

    def recording(self, server: grpc.Server):
        names = self

        class Recorder:
            def add_generic_rpc_handlers(self, handlers):
                names._generic.extend(handlers)
                server.add_generic_rpc_handlers(handlers)

            def add_registered_method_handlers(self, service, handlers):
                names._registered.update(f"/{service}/{m}" for m in handlers)
                server.add_registered_method_handlers(service, handlers)

            def __getattr__(self, name):
                return getattr(server, name)

        return Recorder()

    def label(self, method: str) -> str:
        known = self._known.get(method)
        if known is not None:
            return known
        details = _CallDetails(method)
        if method in self._registered or any(h.service(details) is not None for h in self._generic):
            self._known[method] = method.lstrip("/")
            return self._known[method]
        return self.UNKNOWN


class ObservingInterceptor(grpc.ServerInterceptor):
    """Wraps every handler. Unary calls are counted and timed by final status code (labelled with
    the method when the server serves it, else "unknown"), logged as one JSON line (method, code,
    duration, peer; never bodies or metadata), and run under the server's call limits (the request
    within REQUEST_TIMEOUT_S, a deadline of at most MAX_CALL_S, MAX_WORKERS handlers at once;
    see call_limits.py); `ServiceError` becomes its rich status and any other exception INTERNAL with
    an error id that matches the log. A `Refusal` is counted and answered without reading the request.
    Streaming handlers (health Watch, reflection) only get the time limit on their request messages;
    Watch keeps grpc's non-blocking implementation.

    Health checks and reflection need no key anywhere, so at most `max_probe_calls` of them run at
    once (more: RESOURCE_EXHAUSTED at once, unread): callers without a key can never hold the
    concurrency slots the API needs."""

    def __init__(
        self,
        service: str,
        metrics: Metrics,
        limits: CallLimits | None = None,
        methods: MethodNames | None = None,
        max_probe_calls: int | None = None,
    ):
        self.service, self.metrics, self.limits, self.methods = service, metrics, limits, methods
        self._probe_slots = threading.BoundedSemaphore(max_probe_calls) if max_probe_calls else None

    def _probe_slot(self) -> Callable[[], None]:
        """Take one of the probe calls' slots; its release. ServiceError when none is free."""
        if self._probe_slots is None:
            return lambda: None
        if not self._probe_slots.acquire(blocking=False):
            raise resource_exhausted(
                "too many health checking or reflection calls at once; retry shortly",
                reason="TOO_MANY_PROBE_CALLS",
                retry_after_s=1.0,
            )
        return self._probe_slots.release

    def intercept_service(self, continuation, handler_call_details):
        # Called on every RPC; `handler` may be fresh per call (an auth interceptor's refusal), so
        # wrappers are built per call, never cached by handler.
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        label = self.methods.label(method) if self.methods is not None else method.lstrip("/")
        if isinstance(handler, Refusal):
            return grpc.stream_unary_rpc_method_handler(self._observe(label, method, handler))
        if handler.request_streaming or handler.response_streaming:
            if self.limits is None:
                return handler
            return self._bound_stream(handler, method.startswith(_PROBE_PREFIXES))
        return grpc.stream_unary_rpc_method_handler(
            self._observe(label, method, handler),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _observe(self, label: str, method: str, handler: grpc.RpcMethodHandler):
        labels = {"service": self.service, "method": label}
        probe = method.startswith(_PROBE_PREFIXES)
        level = logging.DEBUG if method.startswith(_HEALTH_PREFIX) else logging.INFO
        logged_method = method if len(method) <= _MAX_LOGGED_METHOD else method[:_MAX_LOGGED_METHOD] + "…"
        refusal = handler.error if isinstance(handler, Refusal) else None
        behaviour = handler.unary_unary

        def observed(requests, context: grpc.ServicerContext):
            start = time.perf_counter()
            code, error_id = grpc.StatusCode.OK, None
            in_flight = self.metrics.rpc_in_flight.labels(**labels)
            in_flight.inc()
            call = self.limits.start(context) if self.limits is not None else None
            release = None
            try:
                if refusal is not None:
                    raise refusal
                if probe:
                    release = self._probe_slot()
                request = _receive(call, requests)
                if isinstance(request, _MalformedRequest):
                    raise invalid_argument({"request": f"not a valid message: {request.error}"})
                if call is None:
                    response = behaviour(request, context)
                else:
                    assert self.limits is not None  # call is only set when there are limits
                    call.watch_deadline()
                    with nullcontext() if probe else self.limits.worker(call):  # probes do no work
                        response = behaviour(request, call.context)
                code = context.code() or grpc.StatusCode.OK
                if code == grpc.StatusCode.OK and not context.is_active():
                    # the caller left (cancel or deadline), or the server's deadline ended the call
                    code = (call.ended if call is not None else None) or grpc.StatusCode.CANCELLED
                return response
            except CallEnded as e:  # over before the handler ran: nothing left to answer
                code = e.code
                if e.error is not None:
                    raise e.error from None
                context.abort(e.code, "ended")  # a status for grpc's books; the caller already has one
            except ServiceError as e:
                code = e.code
                context.abort_with_status(e.to_status())
            except Exception:
                if context.code() is not None:  # context.abort(): already a status, pass it on
                    code = context.code()
                    raise
                code, error_id = grpc.StatusCode.INTERNAL, uuid.uuid4().hex[:12]
                log.exception("unhandled exception in %s", logged_method, extra={"error_id": error_id})
                context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id})")
            finally:
                if release is not None:
                    release()
                if call is not None:
                    call.finish()
                elapsed = time.perf_counter() - start
                in_flight.dec()
                self.metrics.rpc_latency.labels(**labels).observe(elapsed)
                self.metrics.rpc_requests.labels(**labels, code=code.name).inc()
                fields = {
                    "method": logged_method,
                    "code": code.name,
                    "duration_ms": round(elapsed * 1e3, 3),
                    "peer": context.peer(),
                }
                if error_id:
                    fields["error_id"] = error_id
                rpc_log.log(level, "rpc", extra=fields)

        return observed

    def _bound_stream(self, handler: grpc.RpcMethodHandler, probe: bool) -> grpc.RpcMethodHandler:
        """The same streaming handler, its request messages each due within REQUEST_TIMEOUT_S, and
        a probe slot held while it occupies a thread (a non-blocking Watch holds none once started)."""
        limits = self.limits
        if handler.request_streaming:
            inner = handler.stream_stream or handler.stream_unary

            def run(requests, context, *callback):
                return inner(BoundedRequests(requests, limits.start(context, cap=False)), context, *callback)
        else:  # unary request, streamed response (health Watch): read the one message ourselves
            inner = handler.unary_stream

            def run(requests, context, *callback):
                call = limits.start(context, cap=False)
                try:
                    request = next(BoundedRequests(requests, call))
                except StopIteration:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: no request message")
                return inner(request, context, *callback)

        def streamed(requests, context, *callback):
            try:
                release = self._probe_slot() if probe else (lambda: None)
            except ServiceError as e:
                context.abort_with_status(e.to_status())
            try:
                result = run(requests, context, *callback)
            except BaseException:
                release()
                raise
            if handler.response_streaming and not callback and result is not None:
                return _released_at_end(result, release)  # a blocking stream: the thread is held till its end
            release()
            return result

        if getattr(inner, "experimental_non_blocking", False):
            # an attribute grpc reads off the handler function, absent from its stubs
            streamed.experimental_non_blocking = True  # type: ignore[attr-defined]
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                streamed, handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_unary_rpc_method_handler(streamed, handler.request_deserializer, handler.response_serializer)


def _released_at_end(responses, release: Callable[[], None]):
    try:
        yield from responses
    finally:
        release()


def _receive(call: GuardedCall | None, requests):
    """A unary call's one request message (within the call's limit when there is one)."""
    try:
        return call.receive(requests) if call is not None else next(requests)
    except StopIteration:
        raise invalid_argument({"request": "no request message"}) from None


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
        except Exception as e:  # protobuf's DecodeError, or anything a custom parser raises
            return _MalformedRequest(str(e) or type(e).__name__)

    return parse


# SIGTERM and SIGINT from the start of a service's main(): one that arrives while the service loads, or
# settles its heap right after it starts serving, is remembered and stops the server gracefully as soon as
# it waits (`wait_for_termination`). Taken only there, such a signal killed the process outright (exit
# -15, nothing shut down in order), e.g. a pod stopped just as it turned ready.
_signals_received: list[int] = []
_signal_pending = threading.Event()
_signal_target: RunningServer | None = None


def handle_stop_signals() -> None:
    """Take SIGTERM and SIGINT from now on (a service's main(), before it starts; main thread only)."""

    def on_signal(signum: int, _frame: object) -> None:
        # only record and set an event: logging from a signal handler can deadlock on the logging lock
        # the interrupted code holds
        _signals_received.append(signum)
        if _signal_target is not None:
            _signal_target.request_stop()
        else:
            _signal_pending.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


class RunningServer:
    """A started server. `wait_for_termination()` blocks until SIGTERM/SIGINT (or `request_stop`),
    then shuts down gracefully: health NOT_SERVING, in-flight RPCs get `shutdown_grace_s`, then
    the `on_stop` callbacks run and the metrics endpoint closes."""

    def __init__(
        self,
        settings: ServiceSettings,
        service_name: str,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        metrics: Metrics,
        metrics_http: MetricsHttpServer,
        on_stop: Sequence[Callable[[], None]],
        health_server: grpc.Server | None = None,
        health_port: int | None = None,
    ):
        self.settings, self.service_name, self.server, self.port = settings, service_name, server, port
        self.health, self.metrics, self._metrics_http = health_servicer, metrics, metrics_http
        self.health_port = health_port  # the plaintext health-only port, if any
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
        self.health.set(
            service, health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    def request_stop(self) -> None:
        """Ask `wait_for_termination` to shut down; safe from signal handlers and other threads."""
        self._stop_requested.set()

    def wait_for_termination(self, handle_signals: bool = True) -> None:
        """Serve until `request_stop`, or with `handle_signals` a SIGTERM or SIGINT (also one taken by
        `handle_stop_signals` before this server existed), then stop gracefully."""
        global _signal_target
        if handle_signals:
            _signal_target = self  # before the check below: a signal now stops this server directly
            handle_stop_signals()
            if _signal_pending.is_set():
                self.request_stop()
        # Short waits keep the main thread responsive to signals.
        while not self._stop_requested.wait(0.5):
            pass
        if handle_signals and _signals_received:
            log.info("received %s, shutting down", signal.Signals(_signals_received[0]).name)
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
    interceptors run inside the observing one, so their aborts (e.g. authentication) are counted;
    one that refuses a call should return a `Refusal`, which is answered without reading the request.
    on_stop: run after in-flight RPCs finished during shutdown (e.g. stop a batching thread).
    """
    metrics = metrics or create_metrics()
    # A thread for every admitted call, so a call waiting for its request message never keeps another
    # from running; at most max_workers of them run handlers at once (CallLimits.worker).
    executor = futures.ThreadPoolExecutor(
        max(settings.max_workers, settings.max_concurrent_rpcs), thread_name_prefix=f"{service_name}-rpc"
    )
    limits = CallLimits(service_name, settings.request_timeout_s, settings.max_call_s, settings.max_workers)
    methods = MethodNames()
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
    ]
    if settings.max_concurrent_rpcs_per_connection is not None:
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: a connection's further calls wait in its own client.
        # grpc's "overload protection" would instead let clients overshoot and then refuse the excess
        # streams (UNAVAILABLE to well-behaved callers in a burst); off, the limit is the advertised one.
        options += [
            ("grpc.max_concurrent_streams", settings.max_concurrent_rpcs_per_connection),
            ("grpc.http.overload_protection", 0),
        ]
    server = grpc.server(
        executor,
        interceptors=[
            ObservingInterceptor(service_name, metrics, limits, methods, settings.max_probe_calls),
            *interceptors,
        ],
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    registry = methods.recording(server)
    add_servicers(registry)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registry)
    for name in health_services:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*health_services, health.SERVICE_NAME, reflection.SERVICE_NAME), registry)

    tls = settings.server_tls()
    port = _bind(server, f"{settings.host}:{settings.grpc_port}", tls)
    health_server = health_port = None
    try:
        if settings.health_port is not None:
            observer = ObservingInterceptor(service_name, metrics, limits, None, _HEALTH_PORT_RPCS)
            health_server, health_port = _health_only_server(health_servicer, settings, observer)
        metrics_http = start_metrics_server(metrics.registry, settings.host, settings.metrics_port)
    except RuntimeError:
        server.stop(None)  # release the ports bound so far
        if health_server is not None:
            health_server.stop(None)
        raise
    server.start()
    if health_server is not None:
        health_server.start()
    if tls is None:
        log.warning(
            "TLS is off: gRPC is served in plaintext (set %s and %s to serve TLS)",
            settings.env_name("tls_cert_file"),
            settings.env_name("tls_key_file"),
        )
    log.info(
        "serving",
        extra={
            "grpc_port": port,
            "metrics_port": metrics_http.port,
            "health_port": health_port,
            "tls": "off" if tls is None else tls.mode,
            "services": list(health_services),
        },
    )
    return RunningServer(
        settings,
        service_name,
        server,
        port,
        health_servicer,
        metrics,
        metrics_http,
        [*on_stop, limits.stop],
        health_server=health_server,
        health_port=health_port,
    )


def _bind(server: grpc.Server, address: str, tls: ServerTLS | None) -> int:
    try:
        port = server.add_insecure_port(address) if tls is None else server.add_secure_port(address, tls.credentials())
    except RuntimeError as e:
        raise RuntimeError(f"cannot bind gRPC to {address}: {e}") from e
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC to {address}")
    return port


def _health_only_server(
    health_servicer: health.HealthServicer, settings: ServiceSettings, observer: ObservingInterceptor
) -> tuple[grpc.Server, int]:
    """A plaintext server with the standard health service only (the same servicer, so it reports
    exactly what the main port does): Kubernetes gRPC probes cannot speak TLS. It exposes no data.
    Its calls run under the same limits as the main port's (a stalled probe is ended) and are
    counted with them."""
    server = grpc.server(
        futures.ThreadPoolExecutor(_HEALTH_PORT_RPCS, thread_name_prefix="health"),
        maximum_concurrent_rpcs=_HEALTH_PORT_RPCS,
        interceptors=[observer],
        options=[("grpc.so_reuseport", 0)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        return server, _bind(server, f"{settings.host}:{settings.health_port}", None)
    except RuntimeError:
        server.stop(None)
        raise
