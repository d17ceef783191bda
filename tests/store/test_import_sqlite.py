"""Moving a ranker's SQLite stores into PostgreSQL (anime2vec/store/import_sqlite.py) loses nothing and
applies nothing twice: run twice, the database holds each event once with its original arrival order
and time; an id stored with other content is reported, not overwritten; a newer anime is kept."""

from __future__ import annotations

import numpy as np

from anime2vec.feedback import FeedbackEvent as E
from anime2vec.feedback import FeedbackStore
from anime2vec.store.added_anime import AddedAnimeStore, PostgresAddedAnimeStore
from anime2vec.store.feedback_postgres import PostgresFeedbackStore
from anime2vec.store.import_sqlite import main
from anime2vec.store.postgres import Database

VEC = np.arange(4, dtype=np.float32)


def test_import_twice_copies_everything_once(tmp_path, pg_dsn, capsys):
    fb = FeedbackStore(tmp_path / "feedback.sqlite")
    fb.record([E("a", 1, 10, "rated", 9, 100.0), E("b", 2, 11, "completed")])
    fb.record([E("c", 1, 12, "removed")])
    fb.close()
    added = AddedAnimeStore(tmp_path / "added_anime.sqlite")
    added.put(100_000_000, {"title": "Old title"}, VEC, "fp")
    added.put(100_000_001, {"title": "Kept"}, VEC, "fp")
    added.close()
    db = Database(pg_dsn)
    pg_feedback, pg_added = PostgresFeedbackStore(db), PostgresAddedAnimeStore(db)
    pg_feedback.record([E("b", 2, 11, "dropped")])  # the same id, other content: reported
    newer = pg_added.put(100_000_001, {"title": "Renamed later"}, VEC, "fp")  # newer than the file's row

    args = [
        "--dsn",
        pg_dsn,
        "--feedback",
        str(tmp_path / "feedback.sqlite"),
        "--added",
        str(tmp_path / "added_anime.sqlite"),
    ]
    assert main(args) == 1 and '"events_conflicting": [\n    "b"\n  ]' in capsys.readouterr().out
    assert main(args) == 1  # again: nothing new
    got = pg_feedback.all_events()
    assert list(got["event_id"]) == ["b", "a", "c"] and got.loc[got.event_id == "b", "kind"].item() == "dropped"
    sqlite_times = FeedbackStore(tmp_path / "feedback.sqlite").all_events().set_index("event_id")["received_at"]
    assert got.set_index("event_id").loc[["a", "c"], "received_at"].tolist() == sqlite_times.loc[["a", "c"]].tolist()
    anime = {a.anime_id: a for a in pg_added.all()}
    assert anime[100_000_000].fields == {"title": "Old title"} and anime[100_000_001].fields == {
        "title": "Renamed later"
    }
    assert anime[100_000_001].revision == newer.revision and pg_added.revision() == 2
    np.testing.assert_array_equal(anime[100_000_000].raw_vector, VEC)
    db.close()
