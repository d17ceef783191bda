"""The Python gRPC ceiling: a server that answers every call with its request bytes.

Same grpcio, same thread pool and concurrency bound as the services (ServiceSettings defaults:
8 workers, 64 concurrent RPCs), but no interceptor, no protobuf parsing and no work, so a closed
loop against it measures what Python gRPC itself costs per call on this machine.

With --forward ADDRESS it is a relay instead: each call is passed on, bytes unchanged, to the echo
server at ADDRESS over one blocking channel, and its answer returned. A relay in front of an echo
server is the gateway → ranker chain with no work in it: the ceiling of two Python gRPC hops.

    python -m bench.echo --port 0 [--max-workers 8] [--max-concurrent-rpcs 64] [--reply-bytes N]
                         [--forward HOST:PORT]
prints "port <n>" once serving and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

METHOD = "/bench.Echo/Echo"


def serve(
    host: str, port: int, max_workers: int, max_concurrent_rpcs: int, reply_bytes: int = 0, forward: str | None = None
) -> tuple[grpc.Server, int]:
    """reply_bytes > 0: answer with that many bytes (the size of the real service's answer), so both
    servers move the same bytes; 0: answer with the request. forward: relay every call to the echo
    server at that address instead (as the gateway calls the ranker: blocking, from the handler)."""
    reply = b"x" * reply_bytes
    if forward:
        from anime2vec.serving.server import time_remaining

        # the channel lives as long as the process, as the gateway's channel to the ranker does
        upstream = grpc.insecure_channel(forward).unary_unary(METHOD)
        behaviour = lambda request, context: upstream(request, timeout=time_remaining(context))  # noqa: E731
    else:
        behaviour = lambda request, context: reply or request  # noqa: E731
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {  # bytes in, bytes out: no protobuf
            "Echo": grpc.unary_unary_rpc_method_handler(behaviour)
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers),
        handlers=[handler],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.so_reuseport", 0)],
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    from anime2vec.serving.settings import ServiceSettings

    defaults = ServiceSettings.model_fields
    ap = argparse.ArgumentParser(
        prog="python -m bench.echo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-workers", type=int, default=defaults["max_workers"].default)
    ap.add_argument("--max-concurrent-rpcs", type=int, default=defaults["max_concurrent_rpcs"].default)
    ap.add_argument("--reply-bytes", type=int, default=0, help="answer size; 0 echoes the request")
    ap.add_argument("--forward", metavar="HOST:PORT", help="relay every call to the echo server there")
    a = ap.parse_args(argv)
    server, port = serve(a.host, a.port, a.max_workers, a.max_concurrent_rpcs, a.reply_bytes, a.forward)
    print(f"port {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
