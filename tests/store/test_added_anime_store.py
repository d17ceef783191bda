"""The store of added anime's contract, run on SQLite and on a real PostgreSQL server alike: writes
report whether the id was new and carry increasing revisions, `changes_since` is how another replica
follows them, and two replicas adding at once never get one id twice."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pytest

from anime2vec.store.added_anime import ASSIGNED_IDS, MAX_ANIME_ID, AddedAnimeStore, IdsExhausted

pytestmark = pytest.mark.timeout(300)
VEC = np.arange(8, dtype=np.float32) / 10


def test_put_reports_new_ids_and_every_write_gets_a_later_revision(stores):
    store = stores.added()
    assert store.revision() == 0 and store.all() == [] and store.changes_since(0) == []
    a = store.put(500, {"title": "First"}, VEC, "fp")
    b = store.put(501, {"title": "Second", "synopsis": "ü \x00 ok"}, VEC * 2, "fp")
    c = store.put(500, {"title": "First, renamed"}, VEC, "fp2")
    assert (a.created, b.created, c.created) == (True, True, False)
    assert a.revision < b.revision < c.revision == store.revision()
    got = {x.anime_id: x for x in store.all()}
    assert got[500].fields == {"title": "First, renamed"} and got[500].encoder_fingerprint == "fp2"
    assert got[501].fields["synopsis"] == "ü \x00 ok"  # a NUL in a text field survives both backends
    np.testing.assert_array_equal(got[501].raw_vector, VEC * 2)
    assert [x.anime_id for x in store.changes_since(a.revision)] == [501, 500]  # revision order
    assert store.changes_since(c.revision) == [] and store.has(501) and not store.has(502)


def test_add_new_assigns_the_next_id_of_the_reserved_range(stores):
    store = stores.added()
    first = store.add_new({"title": "A"}, VEC, "fp")
    assert first.anime_id == ASSIGNED_IDS.start and first.created
    assert (
        store.add_new({"title": "B"}, VEC, "fp", taken_above=ASSIGNED_IDS.start + 41).anime_id
        == ASSIGNED_IDS.start + 42
    )
    store.put(2**40, {"title": "poisoned (stored before ids were bounded)"}, VEC, "fp")
    assert store.add_new({"title": "C"}, VEC, "fp").anime_id == ASSIGNED_IDS.start + 43
    store.put(MAX_ANIME_ID, {"title": "last"}, VEC, "fp")
    with pytest.raises(IdsExhausted):
        store.add_new({"title": "D"}, VEC, "fp")
    assert not any(x.fields["title"] == "D" for x in store.all())


def test_two_replicas_adding_at_once_never_share_an_id_and_lose_nothing(stores):
    replicas = [stores.added(), stores.added()]
    written: list = []
    errors: list = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        start.wait()
        for i in range(15):
            try:
                written.append((replicas[n % 2].add_new({"title": f"w{n}-{i}"}, VEC, "fp"), f"w{n}-{i}"))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors
    ids = [w.anime_id for w, _ in written]
    assert len(set(ids)) == 60 and all(w.created for w, _ in written)
    stored = {x.anime_id: x.fields["title"] for x in replicas[0].all()}
    assert stored == {w.anime_id: title for w, title in written}
    revisions = [x.revision for x in replicas[1].changes_since(0)]
    assert revisions == sorted(set(revisions)) and len(revisions) == 60


def test_a_follower_that_polls_changes_since_sees_every_write_once(stores):
    """What services/ranker/catalog_follower.py does on another replica: repeatedly ask for the
    changes after the last revision seen while writers keep writing. Nothing may be skipped."""
    writer, follower = stores.added(), stores.added()
    stop = threading.Event()
    seen: dict[int, int] = {}
    last = 0

    def write() -> None:
        for i in range(40):
            writer.put(1000 + i % 25, {"title": f"t{i}"}, VEC, "fp")
        stop.set()

    t = threading.Thread(target=write)
    t.start()
    while True:
        done = stop.is_set()
        for x in follower.changes_since(last):
            assert x.revision > last
            seen[x.anime_id], last = x.revision, x.revision
        if done:
            break
    t.join(60)
    assert sorted(seen) == list(range(1000, 1025))
    assert {x.anime_id: x.revision for x in writer.all()} == seen


def test_wait_for_changes_returns_when_another_replica_writes(stores):
    """PostgreSQL wakes the follower with NOTIFY at commit; SQLite (one ranker) just waits out its
    timeout. Either way a stop request ends the wait."""
    listener, writer = stores.added(), stores.added()
    stop = threading.Event()
    if stores.backend == "postgres":
        listener.wait_for_changes(0.1, stop)  # starts listening
        woke = threading.Event()
        t = threading.Thread(target=lambda: (listener.wait_for_changes(120, stop), woke.set()))
        t.start()
        writer.put(7, {"title": "wake up"}, VEC, "fp")
        t.join(60)
        assert woke.is_set(), "a committed write did not wake the listener"
    stop.set()
    listener.wait_for_changes(120, stop)  # returns at once


def test_an_sqlite_store_written_before_revisions_existed_is_migrated(tmp_path):
    path = tmp_path / "added_anime.sqlite"
    db = sqlite3.connect(path)
    db.execute("""CREATE TABLE added_anime (anime_id INTEGER PRIMARY KEY, fields TEXT NOT NULL,
                  raw_vector BLOB NOT NULL, encoder_fingerprint TEXT NOT NULL, updated_at REAL NOT NULL)""")
    for aid, t in ((9, 3.0), (5, 1.0), (7, 2.0)):
        db.execute("INSERT INTO added_anime VALUES (?, ?, ?, ?, ?)", (aid, '{"title": "old"}', VEC.tobytes(), "fp", t))
    db.commit()
    db.close()
    store = AddedAnimeStore(path)
    assert [x.anime_id for x in store.changes_since(0)] == [5, 7, 9]  # the order they were written
    assert store.put(11, {"title": "new"}, VEC, "fp").revision == 4
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (2,)
    assert len(AddedAnimeStore(path).all()) == 4  # opening again changes nothing
    # a ranker of the previous version (a rolled-back image) still writes the file as it did
    db = sqlite3.connect(path)
    db.execute(
        "INSERT OR REPLACE INTO added_anime VALUES (?, ?, ?, ?, ?)",
        (12, '{"title": "old code"}', VEC.tobytes(), "fp", 9.0),
    )
    db.commit()
    db.close()
    assert {x.anime_id: x.revision for x in AddedAnimeStore(path).all()}[12] == 0
