"""Fixtures for the store tests: a real PostgreSQL server per test session (tests/store/postgres_server.py,
started on first use, stopped at the end), a fresh database per test, and `backend`, which runs a
test once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import pytest

from tests.store.postgres_server import PostgresServer

_SERVER: dict[str, PostgresServer] = {}


def session_postgres(add_cleanup) -> PostgresServer:
    """The session's server (started once; add_cleanup(fn) stops it when the session ends)."""
    if "server" not in _SERVER:
        try:
            server = PostgresServer().start()
        except RuntimeError as e:
            pytest.fail(str(e))
        _SERVER["server"] = server

        def stop() -> None:
            _SERVER.pop("server").stop()

        add_cleanup(stop)
    return _SERVER["server"]


@pytest.fixture
def postgres(request) -> PostgresServer:
    return session_postgres(request.config.add_cleanup)


@pytest.fixture
def pg_dsn(postgres) -> str:
    """An empty database of this test's own."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def stores(backend, tmp_path, request):
    """An Opener for this test's backend: SQLite files under tmp_path, or a fresh PostgreSQL database."""
    from tests.store.backends import Opener

    where = tmp_path if backend == "sqlite" else session_postgres(request.config.add_cleanup).create_database()
    opener = Opener(backend, where)
    yield opener
    opener.close()
