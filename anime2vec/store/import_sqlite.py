"""Copy a ranker's SQLite stores of record into the PostgreSQL store (moving to replicas on PostgreSQL).

    python -m anime2vec.store.import_sqlite --dsn "host=... dbname=anime2vec user=anime2vec" \\
        --feedback var/ranker/feedback.sqlite --added var/ranker/added_anime.sqlite

Safe to run again and while rankers serve: events are inserted with ON CONFLICT (event_id) DO
NOTHING (an event id is its idempotency key; the same id with other content is reported, not
overwritten), in their original arrival order and with their original received_at; an added anime
is written unless the database already holds a newer write of that id (updated_at). The SQLite
files are opened read-only and never changed.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .added_anime import WRITE_LOCK, PostgresAddedAnimeStore
from .postgres import Database

BATCH = 1000


@dataclass
class ImportReport:
    events_read: int = 0
    events_inserted: int = 0
    events_conflicting: list[str] = field(default_factory=list)  # ids stored with other content
    anime_read: int = 0
    anime_written: int = 0


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)


def import_feedback(db: Database, path: Path, report: ImportReport) -> None:
    src = _read_only(path)
    try:
        rows = src.execute(
            "SELECT event_id, user_id, anime_id, kind, score, occurred_at, received_at FROM events ORDER BY rowid"
        ).fetchall()
    finally:
        src.close()
    report.events_read += len(rows)
    for i in range(0, len(rows), BATCH):
        chunk = rows[i : i + BATCH]

        def write(conn, chunk=chunk):
            cols = [list(c) for c in zip(*chunk)]
            inserted = {
                r[0]
                for r in conn.execute(
                    "INSERT INTO events (event_id, user_id, anime_id, kind, score, occurred_at, received_at) "
                    "SELECT e, u, a, k, s, o, r FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], "
                    "%s::integer[], %s::float8[], %s::float8[]) WITH ORDINALITY AS t(e, u, a, k, s, o, r, n) ORDER BY n "
                    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
                    cols,
                ).fetchall()
            }
            others = [r for r in chunk if r[0] not in inserted]
            stored = (
                {
                    r[0]: r[1:6]
                    for r in conn.execute(
                        "SELECT event_id, user_id, anime_id, kind, score, occurred_at FROM events WHERE event_id = ANY(%s)",
                        ([r[0] for r in others],),
                    ).fetchall()
                }
                if others
                else {}
            )
            return len(inserted), [r[0] for r in others if tuple(stored.get(r[0], ())) != tuple(r[1:6])]

        n, conflicting = db.transact("feedback", "import", write)
        report.events_inserted += n
        report.events_conflicting += conflicting


def import_added(db: Database, path: Path, report: ImportReport) -> None:
    src = _read_only(path)
    try:
        rows = src.execute(
            "SELECT anime_id, fields, raw_vector, encoder_fingerprint, updated_at "
            "FROM added_anime ORDER BY updated_at, anime_id"
        ).fetchall()
    finally:
        src.close()
    report.anime_read += len(rows)
    store = PostgresAddedAnimeStore(db)
    for aid, fields, raw, fingerprint, updated_at in rows:

        def write(conn, aid=aid, fields=fields, raw=raw, fingerprint=fingerprint, updated_at=updated_at):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            newer = conn.execute(
                "SELECT 1 FROM added_anime WHERE anime_id = %s AND updated_at >= %s", (int(aid), float(updated_at))
            ).fetchone()
            if newer:
                return 0
            # through the store's own write: a revision in commit order and a NOTIFY, so serving replicas follow
            store._insert(conn, int(aid), json.loads(fields), _vector(raw), fingerprint)
            return 1

        report.anime_written += db.transact("added_anime", "import", write)


def _vector(raw: bytes):
    import numpy as np

    return np.frombuffer(raw, np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anime2vec.store.import_sqlite", description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", required=True, help="the PostgreSQL store (libpq DSN; PGPASSWORD etc. apply)")
    p.add_argument("--feedback", type=Path, help="a ranker's feedback.sqlite")
    p.add_argument("--added", type=Path, help="a ranker's added_anime.sqlite")
    a = p.parse_args(argv)
    if not a.feedback and not a.added:
        p.error("give --feedback and/or --added")
    for path in (a.feedback, a.added):
        if path is not None and not path.is_file():
            p.error(f"no such file: {path}")
    db = Database(a.dsn, max_connections=2, application_name="anime2vec-import")
    report = ImportReport()
    try:
        if a.feedback:
            import_feedback(db, a.feedback, report)
        if a.added:
            import_added(db, a.added, report)
    finally:
        db.close()
    print(json.dumps(report.__dict__, indent=2))
    return 1 if report.events_conflicting else 0


if __name__ == "__main__":
    sys.exit(main())
