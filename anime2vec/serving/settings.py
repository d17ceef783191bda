"""Service configuration from the environment, validated once at start-up.

Each service subclasses `ServiceSettings` with its own prefix (`A2V_ENCODER_`, `A2V_RANKER_`,
`A2V_GATEWAY_`) and its own defaults, so `A2V_ENCODER_GRPC_PORT=6000` configures one service only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class SettingsError(ValueError):
    """The environment holds an invalid configuration; the message names every bad variable."""


class ServiceSettings(BaseSettings):
    """Settings every gRPC service has. Ports may be 0: the OS picks a free one (it is logged)."""

    model_config = SettingsConfigDict(env_prefix="A2V_", frozen=True, extra="forbid")

    host: str = Field("0.0.0.0", min_length=1, description="address the gRPC and metrics servers bind")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one")
    max_workers: int = Field(8, ge=1, le=1024, description="threads running RPC handlers")
    max_concurrent_rpcs: int = Field(
        64, ge=1, description="RPCs in progress at once; beyond it new RPCs get RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=2**31 - 1, description="largest request or response message")
    log_level: LogLevel = "INFO"
    shutdown_grace_s: float = Field(
        10.0, ge=0, le=300, description="on SIGTERM, how long in-flight RPCs may take to finish")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v):
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _distinct_ports(self):
        if self.grpc_port and self.grpc_port == self.metrics_port:
            raise ValueError(f"grpc_port and metrics_port are both {self.grpc_port}; they must differ")
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
