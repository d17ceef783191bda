"""Gateway configuration (environment prefix `A2V_GATEWAY_`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from anime2vec.serving.settings import OutboundTLSSettings


class GatewaySettings(OutboundTLSSettings):
    model_config = SettingsConfigDict(env_prefix="A2V_GATEWAY_", frozen=True, extra="forbid")

    grpc_port: int = Field(50050, ge=0, le=65535)
    metrics_port: int = Field(9100, ge=0, le=65535)
    # A MAL export of a long list is a few MB; the XML limit below is what callers meet first.
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=2**31 - 1)
    # Callers are many applications: one connection may hold half of MAX_CONCURRENT_RPCS (64).
    max_concurrent_rpcs_per_connection: int | None = Field(32, ge=1)

    ranker_address: str = Field(
        "127.0.0.1:50052",
        min_length=1,
        description="ranker service host:port; or several ranker processes as a comma-separated list of "
        "IP:port (127.0.0.1:50052,127.0.0.1:50053: `make run`), called in turn (gRPC round robin)",
    )
    encoder_address: str = Field("127.0.0.1:50051", min_length=1, description="encoder service host:port (free text)")
    ranker_timeout_s: float = Field(
        5.0, gt=0, le=120, description="deadline of one ranker call (capped by the caller's)"
    )
    encoder_timeout_s: float = Field(
        5.0, gt=0, le=120, description="deadline of one encoder call (capped by the caller's)"
    )
    catalog_timeout_s: float = Field(
        30.0, gt=0, le=600, description="deadline of one ListCatalog page while (re)building the title index"
    )
    catalog_poll_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="how often to ask the ranker whether its model version or item count "
        "changed (then the title index is rebuilt, off the request path)",
    )

    api_keys: SecretStr = Field(
        SecretStr(""),
        description="comma-separated API keys callers may present, each "
        "'<key>' (scopes read, feedback) or '<key>:<scope>+...'",
    )
    api_keys_file: Path | None = Field(
        None,
        description="file with one API key per line, as in api_keys ('#' comments), e.g. a mounted Kubernetes Secret",
    )

    max_favourites: int = Field(
        100, ge=1, le=500, description="most favourites (and, separately, disliked) per request"
    )
    max_feedback_events: int = Field(
        500,
        ge=1,
        le=1000,
        description="most events per RecordFeedback call (more: INVALID_ARGUMENT); the ranker's "
        "A2V_RANKER_MAX_FEEDBACK_EVENTS applies when lower",
    )
    max_title_chars: int = Field(256, ge=1, le=256, description="longest title in an AnimeRef or ResolveTitles query")
    max_query_chars: int = Field(2000, ge=1, le=20_000, description="longest free-text query")
    max_synopsis_chars: int = Field(
        20_000, ge=1, le=20_000, description="AddAnime: longest synopsis (at most the ranker's own limit, 20,000)"
    )
    max_mal_xml_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest MAL export, after gzip decompression")
    default_min_score: int = Field(
        7, ge=1, le=10, description="ImportMalList: lowest MAL score that counts as a favourite"
    )
    text_cache_size: int = Field(
        1024, ge=0, description="free-text query vectors kept, so the pages of one search rank the same vector"
    )

    @field_validator("ranker_address")
    @classmethod
    def _ranker_list(cls, v: str) -> str:
        balanced_target(v)  # a list must be IP literals of one family
        return v

    @model_validator(mode="after")
    def _keys_configured(self):
        if not self.api_keys.get_secret_value().strip() and self.api_keys_file is None:
            raise ValueError("no API keys: set A2V_GATEWAY_API_KEYS (comma list) or A2V_GATEWAY_API_KEYS_FILE")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"api_keys_file {self.api_keys_file} is not a readable file")
        return self


def balanced_target(address: str) -> str | None:
    """The gRPC target for a comma-separated list of ranker addresses, `ipv4:a:p,b:q` (or `ipv6:[a]:p,...`),
    which a round-robin channel spreads calls over; None for one address (dialled as it is). ValueError
    for a list whose entries are not IP:port of one address family (gRPC's ipv4:/ipv6: targets take
    literals only; one DNS name that resolves to every ranker is the other way)."""
    entries = [e.strip() for e in address.split(",")]
    if len(entries) == 1:
        return None
    families = set()
    for e in entries:
        host, sep, port = e.rpartition(":")
        try:
            ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
            if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"a list of rankers takes IP:port entries (e.g. 127.0.0.1:50052,127.0.0.1:50053; IPv6 as "
                f"[::1]:50052), got {e!r}"
            ) from None
        if ip.version == 6 and not host.startswith("["):
            raise ValueError(f"write an IPv6 ranker address in brackets, [{host}]:{port}, got {e!r}")
        families.add(ip.version)
    if len(families) > 1:
        raise ValueError("a list of rankers must be all IPv4 or all IPv6 addresses")
    return f"ipv{families.pop()}:" + ",".join(entries)
