"""Damaged state on the ranker's disk (issue 14, item 6): the ranker comes back SERVING, from the
bundle, with one clear log line, and moves what it cannot read aside instead of deleting it.

A seed data directory is made once: a ranker serves the tiny bundle, gets an added anime and a
feedback event (so the added-anime store, the feedback store, the items collection with the added
anime and a users collection all exist), and is stopped. Each case copies it, damages one thing,
starts a ranker on it and asserts:
- it reaches SERVING (before the fix it exited with a traceback, every time it was restarted);
- exactly one ERROR log line names the problem and where the damaged thing was moved to, and the
  log holds no traceback;
- recommendations are served from the bundle's version;
- derived data (the Qdrant collections, the alias) is rebuilt: the added anime is served again
  (replayed from its store into the rebuilt collection);
- stores of record (added_anime.sqlite, feedback.sqlite) are never deleted: the damaged file sits
  in <data dir>/quarantine/ byte for byte, and the ranker runs on an empty store that takes writes.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from anime2vec.v1 import common_pb2, ranker_pb2
from tests.faults.ranker_harness import Ranker, session_bundle_and_encoder

pytestmark = pytest.mark.faults

S = common_pb2
TIMEOUT_S = 60
GARBAGE = b"\x00\xffnot what was written\x13" * 300


def halve(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def truncate_segments(shard: Path) -> None:
    """Every segment file cut to half its length (a disk that lost the tail of each write)."""
    for p in (shard / "segments").rglob("*"):
        if p.is_file():
            halve(p)


def lose_points(shard: Path) -> None:
    """Half of the sealed segment's id-tracker versions: the engine opens it without an error and
    silently counts about half of the points (measured: 401 of 801)."""
    (tracker,) = (shard / "segments").rglob("id_tracker.versions")
    halve(tracker)


def overwrite_a_length(shard: Path) -> None:
    """A length field of the sealed segment's id tracker overwritten with 2**40: opening the shard
    makes the engine allocate a terabyte and abort the whole process (SIGABRT), which no `except`
    can catch; the ranker's check runs in a child process for this."""
    (mappings,) = (shard / "segments").rglob("id_tracker.mappings")
    with open(mappings, "r+b") as f:
        f.write(struct.pack("<Q", 2**40))


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    return session_bundle_and_encoder(tmp_path_factory, request.config.add_cleanup)


@pytest.fixture(scope="module")
def seed(tiny, tmp_path_factory):
    """A stopped ranker's data directory with every kind of state in it; (data dir, added id, liked ids)."""
    bundle, encoder = tiny
    r = Ranker(tmp_path_factory.mktemp("seed"), bundle, encoder)
    r.start()
    try:
        stub = r.stub()
        liked = [
            e.anime_id for e in stub.ListCatalog(ranker_pb2.ListCatalogRequest(page_size=3), timeout=TIMEOUT_S).entries
        ]
        added = stub.UpsertAnime(
            ranker_pb2.UpsertAnimeRequest(
                anime=S.AnimeInput(
                    title="Quarantine Lighthouse",
                    type="TV",
                    genres=["Mystery"],
                    synopsis="A lighthouse keeper on a quarantined island decodes signals from ships that never arrive.",
                )
            ),
            timeout=TIMEOUT_S,
        ).anime_id
        stub.RecordFeedback(
            ranker_pb2.FeedbackBatch(
                events=[
                    ranker_pb2.ResolvedFeedbackEvent(
                        event_id="seed-1", user_id=424242, anime_id=liked[0], kind=S.FEEDBACK_KIND_RATED, score=9
                    )
                ]
            ),
            timeout=TIMEOUT_S,
        )
    finally:
        assert r.stop() == 0
    assert (r.data_dir / "qdrant" / "users" / bundle.name / "shard").is_dir()
    return r.data_dir, added, liked


CASES = {
    # case: (damage(data dir, version), what the ERROR line says, path moved aside, pin the bundle)
    "segments truncated": (
        lambda d, v: truncate_segments(d / "qdrant" / "versions" / v / "shard"),
        "Qdrant collection of {v} is damaged",
        "qdrant/versions/{v}",
        True,
    ),
    "points silently missing": (
        lambda d, v: lose_points(d / "qdrant" / "versions" / v / "shard"),
        "Qdrant collection of {v} is damaged",
        "qdrant/versions/{v}",
        True,
    ),
    "a length overwritten (engine aborts)": (
        lambda d, v: overwrite_a_length(d / "qdrant" / "versions" / v / "shard"),
        "Qdrant collection of {v} is damaged",
        "qdrant/versions/{v}",
        True,
    ),
    "meta.json garbage": (
        lambda d, v: (d / "qdrant" / "versions" / v / "meta.json").write_bytes(GARBAGE),
        "Qdrant collection of {v} is damaged",
        "qdrant/versions/{v}",
        True,
    ),
    "users segments truncated": (
        lambda d, v: truncate_segments(d / "qdrant" / "users" / v / "shard"),
        "Qdrant users collection of {v} is damaged",
        "qdrant/users/{v}",
        True,
    ),
    "aliases.json garbage": (
        lambda d, v: (d / "qdrant" / "aliases.json").write_bytes(GARBAGE),
        "collection alias is unreadable",
        "qdrant/aliases.json",
        False,
    ),
    "aliases.json names no version": (
        lambda d, v: (d / "qdrant" / "aliases.json").write_text('{"anime2vec_items": "../../etc"}'),
        "collection alias is unreadable",
        "qdrant/aliases.json",
        False,
    ),
    "added_anime.sqlite garbage": (
        lambda d, v: (d / "added_anime.sqlite").write_bytes(GARBAGE),
        "the store of added anime at",
        "added_anime.sqlite",
        True,
    ),
    "feedback.sqlite garbage": (
        lambda d, v: (d / "feedback.sqlite").write_bytes(GARBAGE),
        "the feedback store at",
        "feedback.sqlite",
        True,
    ),
}


HEAL_CHECKED = {"segments truncated", "aliases.json garbage", "added_anime.sqlite garbage"}  # one per kind


@pytest.mark.parametrize("case", list(CASES))
def test_the_ranker_recovers_from_damaged_state_and_says_so_once(case, tiny, seed, tmp_path):
    bundle, encoder = tiny
    seed_dir, added, liked = seed
    damage, says, moved, pin = CASES[case]
    v = bundle.name
    r = Ranker(tmp_path, bundle, encoder, pin_bundle=pin)
    shutil.copytree(seed_dir, r.data_dir, symlinks=True)
    damage(r.data_dir, v)
    before = r.data_dir / moved.format(v=v)
    damaged_bytes = before.read_bytes() if before.is_file() else None

    r.start()  # before the fix: the process exited (traceback) and wait_serving raised
    try:
        stub = r.stub()
        page = stub.RecommendFromFavourites(
            ranker_pb2.RecommendFromFavouritesRequest(liked_ids=liked[:2]), timeout=TIMEOUT_S
        )
        assert len(page.recommendations) == 10 and page.served_by.model_version == v

        records = r.log_records()
        errors = [x for x in records if x["level"] in ("ERROR", "CRITICAL")]
        assert len(errors) == 1, [x["msg"] for x in errors]
        msg = errors[0]["msg"]
        assert says.format(v=v) in msg, msg
        quarantined = Path(errors[0]["quarantined"])
        assert str(quarantined) in msg and quarantined.exists()
        assert quarantined.relative_to(r.data_dir / "quarantine").parts[1:] == Path(moved.format(v=v)).parts
        if damaged_bytes is not None:  # kept byte for byte, never deleted or "repaired"
            assert quarantined.read_bytes() == damaged_bytes
        assert "Traceback" not in r.log_text()

        served_ids = {
            e.anime_id
            for e in stub.ListCatalog(ranker_pb2.ListCatalogRequest(page_size=5000), timeout=TIMEOUT_S).entries
        }
        if case == "added_anime.sqlite garbage":
            assert added not in served_ids  # its record is in quarantine, not served from nowhere
            new = stub.UpsertAnime(
                ranker_pb2.UpsertAnimeRequest(
                    anime=S.AnimeInput(title="After Quarantine", synopsis="A new store takes new anime.")
                ),
                timeout=TIMEOUT_S,
            )
            assert new.created
        else:  # derived data rebuilt: the added anime is replayed into the new collection and served
            assert added in served_ids
            similar = stub.SimilarItems(ranker_pb2.SimilarItemsRequest(anime_id=added), timeout=TIMEOUT_S)
            assert len(similar.recommendations) == 10
        if case == "feedback.sqlite garbage":
            stub.RecordFeedback(
                ranker_pb2.FeedbackBatch(
                    events=[
                        ranker_pb2.ResolvedFeedbackEvent(
                            event_id="after-1", user_id=7, anime_id=liked[1], kind=S.FEEDBACK_KIND_COMPLETED
                        )
                    ]
                ),
                timeout=TIMEOUT_S,
            )
        user = (
            stub.RecommendForUser(S.RecommendForUserRequest(user_id=424242), timeout=TIMEOUT_S)
            if case != "feedback.sqlite garbage"
            else None
        )
        assert user is None or len(user.recommendations) == 10
    finally:
        assert r.stop() == 0, r.proc.log_tail()

    if case not in HEAL_CHECKED:
        return
    # and it stays healed: the next start finds nothing to repair
    offset = r.log_size()
    r.start()
    try:
        assert not [x for x in r.log_records(offset) if x["level"] in ("ERROR", "CRITICAL")]
    finally:
        assert r.stop() == 0
    assert os.listdir(r.data_dir / "quarantine") and len(list((r.data_dir / "quarantine").iterdir())) == 1
