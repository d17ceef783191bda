"""Retraining reads the one PostgreSQL store every ranker replica writes (issue 17): the same events
as from SQLite, in one consistent snapshot while replicas keep writing; an unreachable database is a
RetrainError (exit 2, "cannot start"), never a silent empty read."""

from __future__ import annotations

import threading

import pandas as pd
import pytest

from anime2vec.feedback import FeedbackEvent as E
from anime2vec.feedback import FeedbackStore
from anime2vec.pipeline import TrainConfig
from anime2vec.retrain import RetrainConfig, RetrainError, read_feedback
from anime2vec.runlocal import free_ports
from anime2vec.store.feedback_postgres import PostgresFeedbackStore
from anime2vec.store.postgres import Database
from tests.store.conftest import pg_dsn, postgres  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)


def _cfg(tmp_path, dsn=None) -> RetrainConfig:
    return RetrainConfig(
        train=TrainConfig(sample=True, store=tmp_path / "models"),
        events=(tmp_path / "feedback.sqlite",),
        events_dsn=dsn,
    )


def test_the_postgres_store_reads_as_the_sqlite_one_does(tmp_path, pg_dsn):  # noqa: F811
    events = [E("a", 1, 10, "rated", 9, 100.0), E("b", 2, 11, "completed"), E("c", 1, 12, "added")]
    sqlite_store = FeedbackStore(tmp_path / "feedback.sqlite")
    sqlite_store.record(events)
    sqlite_store.close()
    db = Database(pg_dsn)
    PostgresFeedbackStore(db).record(events)
    db.close()
    from_pg, from_sqlite = read_feedback(_cfg(tmp_path, pg_dsn)), read_feedback(_cfg(tmp_path))
    cols = ["event_id", "user_id", "anime_id", "kind", "score", "occurred_at"]
    pd.testing.assert_frame_equal(from_pg[cols], from_sqlite[cols])
    assert from_pg["received_at"].notna().all()


def test_a_read_while_replicas_write_sees_whole_batches_only(tmp_path, pg_dsn):  # noqa: F811
    db = Database(pg_dsn, max_connections=4)
    writer = PostgresFeedbackStore(db)
    stop = threading.Event()

    def write() -> None:
        b = 0
        while not stop.is_set() and b < 400:
            writer.record([E(f"b{b}-{i}", 1 + b % 7, 10 + i, "completed") for i in range(10)])
            b += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        sizes = []
        for _ in range(15):
            got = read_feedback(_cfg(tmp_path, pg_dsn))
            per_batch = got["event_id"].str.split("-").str[0].value_counts()
            assert (per_batch == 10).all(), "a snapshot holds every event of a batch or none"
            sizes.append(len(got))
    finally:
        stop.set()
        t.join(120)
        db.close()
    assert sizes == sorted(sizes) and sizes[-1] > 0


def test_an_unreachable_store_stops_the_retrain_before_anything_else(tmp_path):
    (port,) = free_ports(1)
    with pytest.raises(RetrainError, match="cannot read the feedback store"):
        read_feedback(_cfg(tmp_path, f"host=127.0.0.1 port={port} dbname=x user=u connect_timeout=2"))
