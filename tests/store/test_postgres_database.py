"""PostgreSQL-only behaviour of anime2vec/store/postgres.py against a real server: migrations applied
once when replicas start together, a database that cannot be reached is UNAVAILABLE (never a crash
or a hang), and a pool outlives a server restart."""

from __future__ import annotations

import threading
import time

import grpc
import psycopg
import pytest

from anime2vec.feedback import FeedbackEvent as E
from anime2vec.runlocal import free_ports
from anime2vec.store.feedback_postgres import PostgresFeedbackStore
from anime2vec.store.migrations import migrations
from anime2vec.store.postgres import Database, DatabaseUnavailable, redacted
from tests.store.postgres_server import PostgresServer

pytestmark = pytest.mark.timeout(300)


def test_replicas_starting_together_apply_each_migration_once(pg_dsn):
    opened, errors = [], []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(Database(pg_dsn))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(opened) == 4
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert rows == [(m.version, m.name) for m in migrations("postgres")]
    for db in opened:
        db.close()


def test_an_unreachable_database_is_unavailable_and_the_password_is_never_shown():
    (port,) = free_ports(1)
    with pytest.raises(DatabaseUnavailable) as err:
        Database(f"host=127.0.0.1 port={port} dbname=x user=u password=s3cret connect_timeout=2")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "s3cret" not in err.value.message
    assert "password=***" in redacted("host=h password=s3cret") and "s3cret" not in redacted(
        "postgresql://u:s3cret@h/d"
    )


def test_a_store_is_unavailable_while_its_server_is_down_and_works_again_after_a_restart():
    server = PostgresServer().start()
    try:
        db = Database(server.create_database(), pool_timeout_s=3)
        store = PostgresFeedbackStore(db)
        store.record([E("before", 1, 10, "completed")])
        server._run(str(server.bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-m", "immediate", "-w", "stop")
        with pytest.raises(DatabaseUnavailable):
            store.record([E("during", 1, 11, "completed")])
        assert not db.ping()
        opts = f"-c listen_addresses=127.0.0.1 -c port={server.port} -c unix_socket_directories={server.root}"
        server._run(
            str(server.bin_dir / "pg_ctl"),
            "-D",
            str(server.data_dir),
            "-l",
            str(server.root / "server.log"),
            "-o",
            opts,
            "-w",
            "start",
        )
        for _ in range(30):  # as a client does on UNAVAILABLE: the pool reconnects with a backoff
            try:
                assert store.record([E("after", 1, 12, "completed")]).applied == 1
                break
            except DatabaseUnavailable:
                time.sleep(1)
        else:
            pytest.fail("the store did not come back after the server restarted")
        assert [e.event_id for e in store.events_for_user(1)] == ["before", "after"] and db.ping()
        db.close()
    finally:
        server.stop()
