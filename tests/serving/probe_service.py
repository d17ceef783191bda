"""A probe service with one method per behaviour the shared server must handle."""

from __future__ import annotations

import threading

import grpc

from anime2vec.serving import errors
from anime2vec.serving.settings import ServiceSettings
from anime2vec.v1 import encoder_pb2

PROBE = "a2v.test.Probe"


class Probe:
    def __init__(self):
        self.release = threading.Event()  # Slow waits for it
        self.entered = threading.Event()  # set when Slow is running

    def Ok(self, request, context):
        return encoder_pb2.EncodeResponse(model_name=f"{len(request.texts)} texts", dim=7)

    def Boom(self, request, context):
        raise ValueError("secret internals: db password=hunter2")

    def Invalid(self, request, context):
        raise errors.invalid_argument({"texts[3]": "too long", "options.limit": "must be <= 100"})

    def Missing(self, request, context):
        raise errors.not_found(
            "anime",
            "Narutoo",
            reason="ANIME_NOT_FOUND",
            suggestions=["Naruto", "Naruto: Shippuuden"],
            field="favourites[0].title",
        )

    def Abort(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    def SetCode(self, request, context):
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("quietly missing")
        return encoder_pb2.EncodeResponse()

    def Slow(self, request, context):
        self.entered.set()
        assert self.release.wait(30)
        return encoder_pb2.EncodeResponse(dim=1)


def add_probe(probe: Probe):
    def add(server: grpc.Server):
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(probe, name),
                request_deserializer=encoder_pb2.EncodeRequest.FromString,
                response_serializer=encoder_pb2.EncodeResponse.SerializeToString,
            )
            for name in ("Ok", "Boom", "Invalid", "Missing", "Abort", "SetCode", "Slow")
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(PROBE, handlers)])

    return add


def settings(**kw) -> ServiceSettings:
    base = dict(host="127.0.0.1", grpc_port=0, metrics_port=0, shutdown_grace_s=5.0)
    return ServiceSettings(**{**base, **kw})


def call(channel: grpc.Channel, method: str, request=None, **kw):
    stub = channel.unary_unary(
        f"/{PROBE}/{method}",
        request_serializer=encoder_pb2.EncodeRequest.SerializeToString,
        response_deserializer=encoder_pb2.EncodeResponse.FromString,
    )
    return stub(request or encoder_pb2.EncodeRequest(), timeout=kw.pop("timeout", 10), **kw)
