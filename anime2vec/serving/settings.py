"""Service configuration from the environment, validated once at start-up.

Each service subclasses `ServiceSettings` with its own prefix (`A2V_ENCODER_`, `A2V_RANKER_`,
`A2V_GATEWAY_`) and its own defaults, so `A2V_ENCODER_GRPC_PORT=6000` configures one service only.
Services that call others (ranker, gateway) subclass `OutboundTLSSettings`: one TLS group for all
of their downstream channels. Certificate files are parsed here, so a bad one stops the start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .tls import ClientTLS, ServerTLS, check_certificates, check_key_pair

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class SettingsError(ValueError):
    """The environment holds an invalid configuration; the message names every bad variable."""


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has. Ports may be 0: the OS picks a free one (it is logged)."""

    model_config = SettingsConfigDict(env_prefix="A2V_", frozen=True, extra="forbid")

    host: str = Field("0.0.0.0", min_length=1, description="address the gRPC and metrics servers bind")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one")
    max_workers: int = Field(
        8,
        ge=1,
        le=1024,
        description="RPC handlers running at once (an admitted call waits for one once its request message arrived)",
    )
    max_concurrent_rpcs: int = Field(
        64, ge=1, description="RPCs in progress at once; beyond it new RPCs get RESOURCE_EXHAUSTED"
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=2**31 - 1, description="largest request or response message"
    )
    max_concurrent_rpcs_per_connection: int | None = Field(
        None,
        ge=1,
        description="calls one client connection may have in progress (HTTP/2 max concurrent "
        "streams; its further calls wait in the client); unset: no bound beyond "
        "max_concurrent_rpcs",
    )
    max_probe_calls: int = Field(
        8,
        ge=1,
        le=1024,
        description="health checking and reflection calls (which need no API key) in progress "
        "at once; beyond it they get RESOURCE_EXHAUSTED at once, so they can never "
        "hold the slots the API needs",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="how long a call may wait for its request message after its headers; "
        "then DEADLINE_EXCEEDED (a stalled client holds no thread or slot longer)",
    )
    max_call_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="the server's deadline for every call: a caller's longer deadline, or "
        "none, is cut to this; past it the call ends with DEADLINE_EXCEEDED",
    )
    log_level: LogLevel = "INFO"
    shutdown_grace_s: float = Field(
        10.0, ge=0, le=300, description="on SIGTERM, how long in-flight RPCs may take to finish"
    )

    # TLS (off unless a certificate is configured). Fields are validated in this order, so the
    # key's and the client CA's checks can see the certificate that was already accepted.
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain the server presents; with tls_key_file, gRPC is served over TLS"
    )
    tls_key_file: Path | None = Field(
        None, validate_default=True, description="PEM private key of tls_cert_file (unencrypted)"
    )
    tls_client_ca_file: Path | None = Field(
        None,
        validate_default=True,
        description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="a plaintext port serving only grpc.health.v1, for probes that cannot "
        "speak TLS (Kubernetes gRPC probes); unset: none, 0 picks a free one",
    )

    @classmethod
    def env_name(cls, field: str) -> str:
        return f"{cls.model_config.get('env_prefix', '')}{field.upper()}"

    @field_validator("tls_cert_file")
    @classmethod
    def _cert_parses(cls, v: Path | None) -> Path | None:
        return None if v is None else check_certificates(v)

    @field_validator("tls_key_file")
    @classmethod
    def _key_pairs_with_cert(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if "tls_cert_file" not in info.data:  # the certificate itself was refused: reported there
            return v
        cert = info.data["tls_cert_file"]
        if (cert is None) != (v is None):
            raise ValueError(f"{cls.env_name('tls_cert_file')} and {cls.env_name('tls_key_file')} must be set together")
        if cert is not None and v is not None:  # both or neither, checked above
            check_key_pair(cert, v)
        return v

    @field_validator("tls_client_ca_file")
    @classmethod
    def _client_ca_needs_tls(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return v
        if info.data.get("tls_cert_file") is None and "tls_cert_file" in info.data:
            raise ValueError(
                f"mutual TLS needs the server's own {cls.env_name('tls_cert_file')} and {cls.env_name('tls_key_file')}"
            )
        return check_certificates(v)

    def server_tls(self) -> ServerTLS | None:
        """The server's TLS configuration, or None for plaintext."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return ServerTLS(self.tls_cert_file, self.tls_key_file, self.tls_client_ca_file)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v):
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _distinct_ports(self):
        if self.grpc_port and self.grpc_port == self.metrics_port:
            raise ValueError(f"grpc_port and metrics_port are both {self.grpc_port}; they must differ")
        if self.health_port and self.health_port in (self.grpc_port, self.metrics_port):
            raise ValueError(f"health_port {self.health_port} must differ from grpc_port and metrics_port")
        return self

    @classmethod
    def from_env(cls, **overrides):
        """Read the environment (overrides win) or raise SettingsError naming each variable and
        its problem. Values are not echoed: some settings are secrets."""
        try:
            return cls(**overrides)
        except ValidationError as e:
            prefix = cls.model_config.get("env_prefix", "")
            problems = []
            for err in e.errors(include_input=False, include_url=False):
                field = ".".join(str(p) for p in err["loc"])
                where = f"{prefix}{field.upper()}" if field else f"{prefix}*"
                problems.append(f"  {where}: {err['msg']}")
            raise SettingsError(f"invalid configuration for {cls.__name__}:\n" + "\n".join(problems)) from None


class OutboundTLSSettings(ServiceSettings):
    """Settings of a service that calls other services: one TLS group for all of its downstream
    channels (plaintext unless outbound_tls_ca_file is set)."""

    outbound_tls_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle; when set, every downstream service is dialled over TLS and its "
        "certificate verified against it",
    )
    outbound_tls_cert_file: Path | None = Field(
        None, description="PEM client certificate presented to downstream services (mutual TLS)"
    )
    outbound_tls_key_file: Path | None = Field(
        None, validate_default=True, description="PEM private key of outbound_tls_cert_file (unencrypted)"
    )
    outbound_tls_server_name: str = Field(
        "",
        validate_default=True,
        description="name expected in the downstream certificates when it differs from the dialled host",
    )

    @field_validator("outbound_tls_ca_file")
    @classmethod
    def _ca_parses(cls, v: Path | None) -> Path | None:
        return None if v is None else check_certificates(v)

    @field_validator("outbound_tls_cert_file")
    @classmethod
    def _client_cert_parses(cls, v: Path | None) -> Path | None:
        return None if v is None else check_certificates(v)

    @field_validator("outbound_tls_key_file")
    @classmethod
    def _client_key_pairs(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if "outbound_tls_cert_file" not in info.data:
            return v
        cert = info.data["outbound_tls_cert_file"]
        if (cert is None) != (v is None):
            raise ValueError(
                f"{cls.env_name('outbound_tls_cert_file')} and "
                f"{cls.env_name('outbound_tls_key_file')} must be set together"
            )
        if cert is not None and v is not None:  # both or neither, checked above
            check_key_pair(cert, v)
            if info.data.get("outbound_tls_ca_file") is None and "outbound_tls_ca_file" in info.data:
                raise ValueError(
                    f"a client certificate is only sent over TLS: set {cls.env_name('outbound_tls_ca_file')} too"
                )
        return v

    @field_validator("outbound_tls_server_name")
    @classmethod
    def _server_name_needs_tls(cls, v: str, info: ValidationInfo) -> str:
        if v and info.data.get("outbound_tls_ca_file") is None and "outbound_tls_ca_file" in info.data:
            raise ValueError(f"applies to TLS only: set {cls.env_name('outbound_tls_ca_file')} too")
        return v

    def outbound_tls(self) -> ClientTLS | None:
        """How to dial downstream services: None for plaintext."""
        if self.outbound_tls_ca_file is None:
            return None
        return ClientTLS(
            self.outbound_tls_ca_file,
            self.outbound_tls_cert_file,
            self.outbound_tls_key_file,
            self.outbound_tls_server_name,
        )
