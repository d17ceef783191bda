"""Ranker configuration (`A2V_RANKER_*`; `QDRANT_URL` / `QDRANT_API_KEY` also honoured)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from anime2vec.index.base import DEFAULT_OVERSAMPLING
from anime2vec.paths import REPO_ROOT, default_model_store
from anime2vec.serving.limits import DEFAULTS as LIMITS
from anime2vec.serving.limits import RequestLimits
from anime2vec.serving.settings import OutboundTLSSettings


class RankerSettings(OutboundTLSSettings):
    model_config = SettingsConfigDict(env_prefix="A2V_RANKER_", frozen=True, extra="forbid")

    grpc_port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    model_store: Path = Field(default_factory=default_model_store, description="directory of model bundles")
    bundle: str = Field(
        "", description="bundle version or path to serve first; empty: the alias target, else the newest"
    )
    data_dir: Path = Field(
        REPO_ROOT / "var" / "ranker", description="embedded Qdrant, the store of added anime and the feedback store"
    )
    store_dir: Path | None = Field(
        None,
        description="without a DSN: the directory of the SQLite stores of record (added_anime.sqlite, "
        "feedback.sqlite); empty: data_dir. Several ranker processes on one machine (`make run`) name one "
        "directory, as replicas name one PostgreSQL database",
    )
    alias_data_dir: Path | None = Field(
        None,
        description="embedded index: follow the collection alias of the ranker whose data dir this is "
        "(<dir>/qdrant/aliases.json) instead of this one's own, building this process's copy of each version's "
        "collection itself; empty: its own. Several ranker processes on one machine all follow the first one's",
    )
    qdrant_url: str = Field("", description="Qdrant server URL; empty: embedded Qdrant under data_dir")
    qdrant_api_key: str = Field("", description="API key for the Qdrant server", repr=False)
    encoder_address: str = Field("127.0.0.1:50051", description="encoder service host:port (UpsertAnime)")
    encoder_timeout_s: float = Field(10.0, gt=0, le=120)
    # request limits: defaults in anime2vec/serving/limits.py; GetModelInfo reports them, the gateway follows
    default_limit: int = Field(LIMITS.default_limit, ge=1, le=100)
    max_limit: int = Field(LIMITS.max_limit, ge=1, le=1000)
    rerank_pool: int = Field(
        500, ge=50, le=5000, description="candidates re-ranked for diversity / dislikes; also the deepest page then"
    )
    max_page_depth: int = Field(1000, ge=100, le=100000, description="offset + limit beyond which paging stops")
    max_ids: int = Field(LIMITS.max_ids, ge=1, description="most liked / disliked / excluded ids per request")
    max_feedback_events: int = Field(
        LIMITS.max_feedback_events, ge=1, le=100000, description="most events per RecordFeedback call"
    )
    alias_poll_s: float = Field(2.0, ge=0, description="how often to check whether the alias moved (0: never)")
    next_model_file: Path | None = Field(
        None,
        description="JSON file in which a trainer reports the bundle that "
        "will replace the served one (`make run` writes it); "
        "GetModelInfo.next_model shows its `status`",
    )
    device: str = Field("", description="torch device for the towers; empty: cuda when present")
    # exact by default since the hybrid serves (2026-12): its vectors mix blocks of very different
    # range (cf factors, content, a one-hot group), and the int8 scan missed top anime that exact
    # search ranks first (tests/e2e/test_served_equals_offline.py); the catalogue is small enough
    # that a float32 scan costs a few ms
    search_mode: Literal["quantized", "exact"] = Field(
        "exact",
        description="exact: scan every float32 vector (the ranking the evaluation measured); quantized: scan "
        "int8 copies of the item vectors, rescore the best in float32 (anime2vec/index/base.py)",
    )
    search_oversampling: float = Field(
        DEFAULT_OVERSAMPLING, ge=1.0, le=32.0, description="quantized mode: candidates rescored per result wanted"
    )
    search_in_memory: bool = Field(
        True,
        description="exact mode: answer searches from the served vectors in memory (services/ranker/"
        "memory_scan.py: the same exact ranking, faster than the engine's scan and outside the GIL); Qdrant "
        "stays the store of record. false: every search goes to Qdrant",
    )
    search_precision: Literal["auto", "float32", "int8"] = Field(
        "auto",
        description="the in-memory search's product over every row: float32, or an int8 copy (a quarter of the "
        "bytes, summed exactly in int32) whose candidates within a proven error bound are rescored in float32, so "
        "the ranking stays exact (services/ranker/memory_scan.py); auto: the faster of the two, timed on the "
        "served vectors when a bundle is loaded",
    )
    search_batch: int = Field(
        16,
        ge=1,
        le=256,
        description="embedded index: at most this many concurrent searches share one engine "
        "call (1: each runs alone); a search never waits for others to arrive",
    )

    store_dsn: str = Field(
        "",
        repr=False,
        description="PostgreSQL DSN (libpq key=value or postgresql:// URI) of the store of record shared by every "
        "replica: feedback events and added anime; empty: SQLite files under store_dir (one machine). "
        "libpq's PG* variables (PGPASSWORD, PGSSLMODE, PGSSLROOTCERT, ...) fill what it leaves out",
    )
    store_pool_size: int = Field(8, ge=1, le=100, description="most connections to PostgreSQL per replica")
    store_connect_timeout_s: float = Field(5.0, gt=0, le=60, description="PostgreSQL connect timeout")
    catalog_follow_s: float = Field(
        2.0,
        ge=0.1,
        le=300,
        description="at least this often each replica asks the store for anime added through other replicas "
        "(PostgreSQL: a NOTIFY at commit wakes it sooner; SQLite stores shared by processes on one machine: this poll)",
    )

    @field_validator("store_dsn")
    @classmethod
    def _dsn_parses(cls, v: str) -> str:
        if v:
            from psycopg import ProgrammingError
            from psycopg.conninfo import conninfo_to_dict

            try:
                conninfo_to_dict(v)
            except ProgrammingError:  # its message may quote the DSN, password included: not repeated
                raise ValueError(
                    "not a valid PostgreSQL connection string (key=value pairs or a postgresql:// URI)"
                ) from None
        return v

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_limit=self.max_limit,
            default_limit=self.default_limit,
            max_ids=self.max_ids,
            max_feedback_events=self.max_feedback_events,
        )

    @model_validator(mode="after")
    def _qdrant_env(self):
        # QDRANT_URL is the conventional variable (Kubernetes manifests set it)
        if not self.qdrant_url and os.environ.get("QDRANT_URL"):
            object.__setattr__(self, "qdrant_url", os.environ["QDRANT_URL"])
        if not self.qdrant_api_key and os.environ.get("QDRANT_API_KEY"):
            object.__setattr__(self, "qdrant_api_key", os.environ["QDRANT_API_KEY"])
        if self.default_limit > self.max_limit:
            raise ValueError("default_limit must not exceed max_limit")
        if self.store_dir is not None and self.store_dsn:
            raise ValueError("store_dir names SQLite stores; with store_dsn the store of record is PostgreSQL: set one")
        if self.alias_data_dir is not None and self.qdrant_url:
            raise ValueError(
                "alias_data_dir is for the embedded index; on a Qdrant server every ranker shares its alias"
            )
        return self

    @property
    def sqlite_dir(self) -> Path:
        """Where the SQLite stores of record are (without a DSN): store_dir, else data_dir."""
        return self.store_dir if self.store_dir is not None else self.data_dir
