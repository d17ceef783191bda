"""Call any RPC of a running service with JSON, finding its messages through server reflection
(what grpcurl does; every anime2vec service serves reflection without a key).

    services(channel)                      → ["anime2vec.v1.GatewayService", "grpc.health.v1.Health", ...]
    describe(channel, "GatewayService")    → its methods with their request and response types
    call(channel, "Recommend", '{...}')    → the response as JSON

A method may be named in full ("anime2vec.v1.GatewayService/Recommend", also with a leading "/" or a
"." before the method, as grpcurl accepts), by service and method ("GatewayService/Recommend") or by
method alone when exactly one service has it. Request JSON is proto3 JSON: field names as in the
.proto or in lowerCamelCase, bytes as base64, enums by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")


class CallError(Exception):
    """The method or the request JSON is wrong, found before anything was sent."""


class Reflection:
    """The services and message types one server describes, looked up lazily."""

    def __init__(self, channel: grpc.Channel):
        self._db = ProtoReflectionDescriptorDatabase(channel)
        self._pool = descriptor_pool.DescriptorPool(self._db)
        self._services: list[str] | None = None

    def services(self) -> list[str]:
        if self._services is None:
            self._services = sorted(s for s in self._db.get_services() if s not in REFLECTION_SERVICES)
        return self._services

    def service(self, name: str) -> ServiceDescriptor:
        matches = [s for s in self.services() if s == name or s.rsplit(".", 1)[-1] == name]
        if len(matches) != 1:
            raise CallError(
                f"no service {name!r} here" if not matches else f"{name!r} is ambiguous: {', '.join(matches)}"
            )
        return self._pool.FindServiceByName(matches[0])

    def method(self, name: str) -> MethodDescriptor:
        path = name.strip().lstrip("/")
        service_name, sep, method_name = path.rpartition("/")
        if not sep and "." in path and path.rsplit(".", 1)[0] in self.services():  # grpcurl's Service.Method
            service_name, method_name = path.rsplit(".", 1)
        if service_name:
            service = self.service(service_name)
            method = service.methods_by_name.get(method_name)
            if method is None:
                raise CallError(
                    f"{service.full_name} has no method {method_name!r}; it has: {', '.join(service.methods_by_name)}"
                )
            return method
        found = [m for s in self.services() for m in [self._pool.FindServiceByName(s).methods_by_name.get(path)] if m]
        if len(found) != 1:
            raise CallError(
                f"no service here has a method {path!r} (services: {', '.join(self.services())})"
                if not found
                else f"{path!r} is a method of several services: "
                f"{', '.join(m.containing_service.full_name for m in found)}; name one"
            )
        return found[0]


def services(channel: grpc.Channel) -> list[str]:
    return Reflection(channel).services()


def describe(channel: grpc.Channel, service_name: str) -> str:
    """One line per method: `rpc Name(Request) returns (Response)`, streaming marked."""
    service = Reflection(channel).service(service_name)
    lines = [f"service {service.full_name}"]
    for m in service.methods:
        stream_in = "stream " if getattr(m, "client_streaming", False) else ""
        stream_out = "stream " if getattr(m, "server_streaming", False) else ""
        lines.append(
            f"  rpc {m.name}({stream_in}{m.input_type.full_name}) returns ({stream_out}{m.output_type.full_name})"
        )
    return "\n".join(lines)


def call(
    channel: grpc.Channel,
    method_name: str,
    request_json: str,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float | None = None,
    indent: int = 2,
) -> str:
    """Send one unary request given as JSON; the response as JSON (fields with default values
    left out, names in lowerCamelCase as grpcurl prints them). grpc.RpcError from the call."""
    method = Reflection(channel).method(method_name)
    if getattr(method, "client_streaming", False) or getattr(method, "server_streaming", False):
        raise CallError(f"{method.full_name} is a streaming method; only unary methods can be called")
    request_class, response_class = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
    try:
        request = json_format.Parse(request_json or "{}", request_class())
    except json_format.ParseError as e:
        raise CallError(f"request JSON for {method.input_type.full_name}: {e}") from None
    stub = channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    response = stub(request, metadata=list(metadata), timeout=timeout)
    return json_format.MessageToJson(response, indent=indent)
