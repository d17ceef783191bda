"""Versioned SQL migrations, applied at start-up, idempotently, in one transaction.

Each schema is a folder of `NNNN_name.sql` files under anime2vec/store/sql/: `postgres` (one
database: events and added anime), `sqlite_feedback` and `sqlite_added_anime` (the two embedded
files). A file runs once, in version order, and never changes after release: a change is a new file.

PostgreSQL records what ran in `schema_migrations` and migrates under a transaction-scoped advisory
lock, so replicas starting together apply each file once and the others wait and see it applied.
SQLite records the last version in `PRAGMA user_version`; DDL is transactional there too, so a
crash mid-migration leaves the file as it was.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
SQL_DIR = Path(__file__).parent / "sql"
_FILE = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")
# pg_advisory_xact_lock key for migrations: any fixed number our other locks do not use
MIGRATION_LOCK = 0x61326D67  # "a2mg"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(schema: str) -> list[Migration]:
    """The migrations of `schema` in version order; versions must be 1, 2, 3, ... without gaps."""
    found = []
    for path in sorted((SQL_DIR / schema).glob("*.sql")):
        m = _FILE.fullmatch(path.name)
        if not m:
            raise ValueError(f"migration file {path} is not named NNNN_name.sql")
        found.append(Migration(int(m.group(1)), path.stem, path.read_text(encoding="utf-8")))
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations of {schema} must be numbered 1..n without gaps: {[m.name for m in found]}")
    return found


def sqlite_statements(sql: str) -> list[str]:
    """`sql` split into complete statements (sqlite3's own test, so a ';' in a comment or string is safe)."""
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buf.strip()[:80]!r}")
    return out


def migrate_sqlite(db: sqlite3.Connection, schema: str) -> int:
    """Apply the migrations of `schema` that `db` (autocommit mode) lacks; returns its version."""
    todo = migrations(schema)
    (current,) = db.execute("PRAGMA user_version").fetchone()
    if current >= len(todo):
        return current
    db.execute("BEGIN IMMEDIATE")
    try:
        (current,) = db.execute("PRAGMA user_version").fetchone()  # another process may have been first
        for m in todo[current:]:
            for stmt in sqlite_statements(m.sql):
                db.execute(stmt)
            db.execute(f"PRAGMA user_version = {m.version:d}")
            log.info("applied migration %s", m.name, extra={"schema": schema})
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return len(todo)


def migrate_postgres(conn, schema: str = "postgres") -> int:
    """Apply the migrations `conn`'s database lacks (psycopg connection, not in a transaction);
    returns the schema version. A database migrated by newer code keeps working (migrations only
    add), with a warning."""
    todo = migrations(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())""")
        applied = {r[0] for r in conn.execute("SELECT version FROM schema_migrations").fetchall()}
        for m in todo:
            if m.version in applied:
                continue
            conn.execute(m.sql)
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (m.version, m.name))
            log.info("applied migration %s", m.name, extra={"schema": schema})
        newer = sorted(v for v in applied if v > len(todo))
        if newer:
            log.warning(
                "the database has migrations this code does not know (%s): it was migrated by a newer "
                "version; carrying on, migrations only add",
                newer,
            )
    return max([len(todo), *applied]) if applied else len(todo)
