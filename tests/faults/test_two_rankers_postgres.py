"""Two ranker processes on one real PostgreSQL server (issue 17): each has its own data directory
and embedded index; the store of record (feedback events, added anime) is the shared database.

- Writes through one replica are read through the other: a user's feedback recorded by A is served
  by B from a vector that reflects it; an anime added through A is listed, findable and
  recommendable through B; an event id recorded by both at the same moment is applied once.
- The replicated crash drill (tests/faults/crash_drill.py run_replicated_drill), bounded: writers
  through both while each in turn is SIGKILLed and restarted; nothing acknowledged lost, nothing
  applied twice, every added anime served by both, no stale user. A2V_DRILL_CYCLES=<n> for more;
  `python -m tests.faults.crash_drill --postgres --rankers 2 --cycles 50` is the long run.
"""

from __future__ import annotations

import os
import threading

import pytest

from anime2vec.v1 import common_pb2 as S
from anime2vec.v1 import ranker_pb2
from tests.faults.crash_drill import anime, run_replicated_drill
from tests.faults.ranker_harness import Ranker, session_bundle_and_encoder
from tests.store.conftest import session_postgres

pytestmark = pytest.mark.faults
CYCLES = int(os.environ.get("A2V_DRILL_CYCLES", "2"))  # 2: each replica killed once, one kill during start-up


@pytest.fixture
def dsn(request) -> str:
    return session_postgres(request.config.add_cleanup).create_database("rankers")


@pytest.fixture
def pair(request, tmp_path_factory, tmp_path, dsn):
    bundle, encoder = session_bundle_and_encoder(tmp_path_factory, request.config.add_cleanup)
    # B sends every search to Qdrant, so that a filter only an anime added through A matches proves B's
    # own index holds it (A answers from memory, the default)
    rankers = [
        Ranker(tmp_path / name, bundle, encoder, env={"STORE_DSN": dsn, "CATALOG_FOLLOW_S": "0.5", **extra})
        for name, extra in (("a", {}), ("b", {"SEARCH_IN_MEMORY": "false"}))
    ]
    for r in rankers:
        r.start()
    yield rankers
    for r in rankers:
        r.stop()


def _catalogue(stub) -> dict[int, ranker_pb2.CatalogEntry]:
    out, token = {}, ""
    while True:
        page = stub.ListCatalog(ranker_pb2.ListCatalogRequest(page_size=5000, page_token=token), timeout=30)
        out.update({e.anime_id: e for e in page.entries})
        token = page.next_page_token
        if not token:
            return out


def _eventually(check, what: str, tries: int = 120):
    """A replica learns of another's write by following the store (every 0.5 s here, or on NOTIFY)."""
    import time

    for _ in range(tries):
        got = check()
        if got:
            return got
        time.sleep(0.5)
    pytest.fail(f"never happened: {what}")


def test_writes_through_one_ranker_are_served_by_the_other(pair):
    a, b = (r.stub() for r in pair)
    catalogue = sorted(_catalogue(b))
    liked = catalogue[:6]

    # feedback through A, the user served by B, from a vector that reflects it
    events = [
        ranker_pb2.ResolvedFeedbackEvent(
            event_id=f"two-{i}", user_id=4_000_001, anime_id=aid, kind=S.FEEDBACK_KIND_RATED, score=10
        )
        for i, aid in enumerate(liked)
    ]
    assert a.RecordFeedback(ranker_pb2.FeedbackBatch(events=events), timeout=60).applied == len(events)
    page = b.RecommendForUser(S.RecommendForUserRequest(user_id=4_000_001), timeout=60)
    assert page.recommendations and not {r.anime_id for r in page.recommendations} & set(liked), (
        "B must know the user's list (its liked anime are excluded from their recommendations)"
    )
    # a second batch through B; A serves the user from both batches
    more = [
        ranker_pb2.ResolvedFeedbackEvent(
            event_id="two-more", user_id=4_000_001, anime_id=catalogue[10], kind=S.FEEDBACK_KIND_COMPLETED
        )
    ]
    assert b.RecordFeedback(ranker_pb2.FeedbackBatch(events=more), timeout=60).applied == 1
    page = a.RecommendForUser(S.RecommendForUserRequest(user_id=4_000_001), timeout=60)
    assert catalogue[10] not in {r.anime_id for r in page.recommendations}

    # an anime added through A: listed, findable by title and recommendable through B
    added = a.UpsertAnime(
        ranker_pb2.UpsertAnimeRequest(
            anime=S.AnimeInput(
                title="Lanternfish Relay",
                type="TV",
                genres=["Twofold Genre"],
                synopsis="Deep-sea couriers pass glowing messages between sleeping submarine towns.",
            )
        ),
        timeout=60,
    )
    assert added.created
    entry = _eventually(lambda: _catalogue(b).get(added.anime_id), "B lists the anime added through A")
    assert entry.title == "Lanternfish Relay"
    similar = b.SimilarItems(ranker_pb2.SimilarItemsRequest(anime_id=added.anime_id), timeout=60)
    assert similar.recommendations  # B knows it as an anime of its own
    only_twofold = ranker_pb2.RecommendFromFavouritesRequest(
        liked_ids=liked[:2], options=S.RecommendOptions(filters=S.Filters(include_genres=["twofold genre"]))
    )
    only_it = b.RecommendFromFavourites(only_twofold, timeout=60)
    assert [r.anime_id for r in only_it.recommendations] == [added.anime_id], (
        "B's own index must hold the anime (a payload filter that only it matches)"
    )
    from_memory = a.RecommendFromFavourites(only_twofold, timeout=60)  # A: the same answer from memory
    assert [r.anime_id for r in from_memory.recommendations] == [added.anime_id]
    assert from_memory.recommendations[0].score == pytest.approx(only_it.recommendations[0].score, rel=1e-5)
    # and the next id assigned through B does not collide with A's
    second = b.UpsertAnime(ranker_pb2.UpsertAnimeRequest(anime=anime("Second Through B")), timeout=60)
    assert second.anime_id > added.anime_id

    # one event id recorded through both replicas at the same moment is applied once
    results, start = [], threading.Barrier(2)

    def record(stub) -> None:
        start.wait()
        batch = [
            ranker_pb2.ResolvedFeedbackEvent(
                event_id=f"race-{i}", user_id=4_000_002, anime_id=catalogue[i], kind=S.FEEDBACK_KIND_COMPLETED
            )
            for i in range(20)
        ]
        results.append(stub.RecordFeedback(ranker_pb2.FeedbackBatch(events=batch), timeout=60))

    threads = [threading.Thread(target=record, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(r.applied for r in results) in ([0, 20], [20, 0]) or sum(r.applied for r in results) == 20
    assert sum(r.applied for r in results) == 20 and sum(r.duplicates for r in results) == 20


def test_a_ranker_whose_database_is_unreachable_does_not_start(request, tmp_path_factory, tmp_path):
    from anime2vec.runlocal import free_ports

    bundle, encoder = session_bundle_and_encoder(tmp_path_factory, request.config.add_cleanup)
    (port,) = free_ports(1)
    r = Ranker(
        tmp_path,
        bundle,
        encoder,
        env={"STORE_DSN": f"host=127.0.0.1 port={port} dbname=x user=u password=hunter2 connect_timeout=2"},
    )
    r.start(wait=False)
    assert r.proc.proc.wait(120) == 1
    log = r.log_text()
    assert "cannot start" in log and "PostgreSQL" in log and "hunter2" not in log


def test_two_rankers_killed_in_turn_under_writes_lose_nothing_and_apply_nothing_twice(
    request, tmp_path_factory, tmp_path, dsn
):
    bundle, encoder = session_bundle_and_encoder(tmp_path_factory, request.config.add_cleanup)
    report = run_replicated_drill(tmp_path, bundle, encoder, dsn, cycles=CYCLES, writers=3, seed=CYCLES)
    print("\n" + report.as_json())
    assert report.cycles == CYCLES and report.restarts >= CYCLES + 2
    assert report.anime_acknowledged > 0 and report.events_acknowledged > 0, "the writers got nothing through"
    assert report.acknowledged_lost == 0, report.problems
    assert report.failed_restarts == 0, report.problems
    assert report.duplicates_applied == 0, report.problems
    assert report.users_checked > 0 and report.stale_users == 0, report.problems
    assert not report.unexpected_statuses, report.unexpected_statuses
