"""Online learning over real sockets: RecordFeedback makes a new user known at once, moves their
recommendations toward what they liked, is idempotent by event id, and survives kill -9 of the
ranker right after the acknowledgement."""

from __future__ import annotations

import re
import signal
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from anime2vec.bundle import load_bundle
from anime2vec.feedback import FeedbackEvent, FeedbackStore
from anime2vec.serving.errors import ErrorDetails
from anime2vec.v1 import common_pb2, gateway_pb2
from tests.e2e.support import AUTH, Stack

S = common_pb2
C = grpc.StatusCode
# Two neighbourhoods of the sample catalogue: Key's tear-jerker dramas, and Gundam mecha war.
DRAMA = ["Clannad", "Clannad: After Story", "Air", "Clannad Movie"]
MECHA = [
    "Mobile Suit Gundam SEED",
    "Mobile Suit Gundam SEED Destiny",
    "Mobile Suit Gundam 00",
    "Mobile Suit Gundam 00 Second Season",
]
BASE_USER = 10**12  # far above the sample's user ids: these users exist only through feedback


def new_user() -> int:
    return BASE_USER + uuid.uuid4().int % 10**9


def event(
    user: int,
    title: str | None = None,
    kind=S.FEEDBACK_KIND_COMPLETED,
    score: int = 0,
    event_id: str | None = None,
    anime_id: int | None = None,
) -> gateway_pb2.FeedbackEvent:
    ref = S.AnimeRef(anime_id=anime_id) if anime_id is not None else S.AnimeRef(title=title)
    return gateway_pb2.FeedbackEvent(
        event_id=event_id if event_id is not None else str(uuid.uuid4()),
        user_id=user,
        anime=ref,
        kind=kind,
        score=score,
    )


def record(stack: Stack, *events) -> gateway_pb2.RecordFeedbackResponse:
    return stack.gateway.RecordFeedback(gateway_pb2.RecordFeedbackRequest(events=events), metadata=AUTH, timeout=60)


def for_user(stack: Stack, user: int, limit: int = 10) -> gateway_pb2.RecommendResponse:
    return stack.gateway.RecommendForUser(
        S.RecommendForUserRequest(user_id=user, options=S.RecommendOptions(limit=limit)), metadata=AUTH, timeout=60
    )


def failure(call, request) -> ErrorDetails:
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=AUTH, timeout=30)
    return ErrorDetails.from_rpc_error(info.value)


def likes(user: int, titles: list[str]) -> list[gateway_pb2.FeedbackEvent]:
    """Completed the first, rated the others 9 and 10."""
    return [event(user, titles[0])] + [
        event(user, t, S.FEEDBACK_KIND_RATED, 9 + i % 2) for i, t in enumerate(titles[1:])
    ]


def store_of(stack: Stack) -> FeedbackStore:
    """A second connection to the ranker's feedback store (WAL: readers do not block it)."""
    return FeedbackStore(Path(stack.procs["ranker"].spec.env["DATA_DIR"]) / "feedback.sqlite")


def stored_events(stack: Stack, user: int) -> list[FeedbackEvent]:
    store = store_of(stack)
    try:
        return store.events_for_user(user)
    finally:
        store.close()


def anime_id(stack: Stack, title: str) -> int:
    found = stack.gateway.ResolveTitles(
        gateway_pb2.ResolveTitlesRequest(query=title, limit=1), metadata=AUTH, timeout=30
    )
    assert found.candidates[0].title == title
    return found.candidates[0].anime_id


@pytest.fixture(scope="module")
def content(bundle) -> tuple[dict[int, int], np.ndarray]:
    """The bundle's item content vectors, unit length, by anime id: the yardstick of "neighbourhood"."""
    b = load_bundle(bundle)
    c = np.asarray(b.arrays["content"], np.float64)
    return {int(a): i for i, a in enumerate(b.arrays["item_ids"])}, c / np.linalg.norm(c, axis=1, keepdims=True)


def closeness(content, recs: list[int], liked: list[int]) -> float:
    pos, c = content
    return float(np.mean(c[[pos[a] for a in recs]] @ c[[pos[a] for a in liked]].T))


def test_feedback_makes_a_new_user_known_and_moves_their_recommendations(stack: Stack, content):
    drama_fan, mecha_fan = new_user(), new_user()
    err = failure(stack.gateway.RecommendForUser, S.RecommendForUserRequest(user_id=drama_fan))
    assert err.code == C.NOT_FOUND and err.reason == "USER_NOT_FOUND"  # unknown before any event

    resp = record(stack, *likes(drama_fan, DRAMA), *likes(mecha_fan, MECHA))
    assert (resp.applied, resp.duplicates) == (8, 0)
    assert list(resp.updated_user_ids) == sorted([drama_fan, mecha_fan])
    assert resp.model_version == stack.bundle.name
    drama_ids, mecha_ids = [r.anime_id for r in resp.anime[:4]], [r.anime_id for r in resp.anime[4:]]
    assert [r.title for r in resp.anime] == DRAMA + MECHA

    recs = {}
    for user, liked in ((drama_fan, drama_ids), (mecha_fan, mecha_ids)):
        page = for_user(stack, user)
        assert page.served_by.strategy == S.STRATEGY_DROPOUTNET and not page.served_by.degraded
        recs[user] = [r.anime_id for r in page.recommendations]
        assert len(recs[user]) == 10 and not set(recs[user]) & set(liked)  # liked anime are not recommended back
    # each fan's list is closer to what they liked than the other fan's list is
    assert closeness(content, recs[drama_fan], drama_ids) > closeness(content, recs[mecha_fan], drama_ids)
    assert closeness(content, recs[mecha_fan], mecha_ids) > closeness(content, recs[drama_fan], mecha_ids)
    # and it is the feedback that did it: the drama fan now drops the drama and likes mecha
    later = [event(drama_fan, t, S.FEEDBACK_KIND_DROPPED) for t in DRAMA] + likes(drama_fan, MECHA)
    assert record(stack, *later).updated_user_ids == [drama_fan]
    moved = [r.anime_id for r in for_user(stack, drama_fan).recommendations]
    assert closeness(content, moved, mecha_ids) > closeness(content, recs[drama_fan], mecha_ids)
    assert not set(moved) & set(drama_ids + mecha_ids)  # dropped anime stay excluded too


def test_a_duplicate_event_id_is_applied_once(stack: Stack):
    user = new_user()
    events = likes(user, MECHA[:3])
    first = record(stack, *events)
    before = for_user(stack, user)
    again = record(stack, *events, events[0])  # a retry of the whole batch, one event twice
    assert (first.applied, first.duplicates, list(first.updated_user_ids)) == (3, 0, [user])
    assert (again.applied, again.duplicates, list(again.updated_user_ids)) == (0, 4, [])
    assert len(stored_events(stack, user)) == 3
    after = for_user(stack, user)
    assert [(r.anime_id, r.score) for r in after.recommendations] == [
        (r.anime_id, r.score) for r in before.recommendations
    ]
    with urllib.request.urlopen(stack.metrics_url("ranker"), timeout=10) as r:
        text = r.read().decode()
    assert 'a2v_feedback_events_total{kind="rated",outcome="duplicate"}' in text
    assert "a2v_user_fold_in_seconds_count" in text


def test_acknowledged_feedback_survives_kill_9_of_the_ranker(stack: Stack):
    user = new_user()
    events = likes(user, DRAMA)
    ack = record(stack, *events)
    assert ack.applied == 4
    liked = {r.anime_id for r in ack.anime}
    ranker = stack.procs["ranker"]
    ranker.proc.send_signal(signal.SIGKILL)  # right after the acknowledgement: no clean shutdown
    ranker.proc.wait(30)
    stack.start("ranker")
    stack.wait_answering()
    assert {e.anime_id for e in stored_events(stack, user)} == liked
    page = for_user(stack, user)
    assert len(page.recommendations) == 10 and not {r.anime_id for r in page.recommendations} & liked
    # the retry a client makes when it did not see the acknowledgement changes nothing
    retry = record(stack, *events)
    assert (retry.applied, retry.duplicates) == (0, 4) and len(stored_events(stack, user)) == 4


def test_events_in_the_store_without_a_user_vector_are_folded_in_on_the_next_read(stack: Stack):
    """What a crash between the commit and the users-collection upsert leaves behind: the events
    are the truth, and the next request recomputes the user from them."""
    user, clannad, air = new_user(), anime_id(stack, "Clannad"), anime_id(stack, "Air")
    store = store_of(stack)
    try:
        store.record(
            [
                FeedbackEvent(str(uuid.uuid4()), user, clannad, "rated", 10),
                FeedbackEvent(str(uuid.uuid4()), user, air, "completed"),
            ]
        )
    finally:
        store.close()
    page = for_user(stack, user)
    assert len(page.recommendations) == 10 and not {clannad, air} & {r.anime_id for r in page.recommendations}


def test_a_re_solved_user_matches_the_serving_path(bundle):
    """An online user is recomputed as ServingModel.user_vector computes a training user, from a
    history (the hybrid needs no re-solve): with no events, the two vectors are the same, and
    events move them."""
    from anime2vec.serving_model.model import ServingModel
    from anime2vec.serving_model.users import compute_user

    m = ServingModel(load_bundle(bundle))
    trained_users = [int(m.user_ids[u]) for u in np.flatnonzero(m.train.getnnz(axis=1))[:5]]
    for uid in trained_users:
        trained, resolved = m.user_vector(uid), compute_user(m, {}, uid, []).vector
        np.testing.assert_allclose(resolved, trained, rtol=1e-5, atol=1e-6)
    uid = trained_users[0]
    history = {int(m.item_ids[i]) for i in m.train[m.user_pos[uid]].indices}
    dropped = [FeedbackEvent(f"d{a}", uid, a, "dropped") for a in history]
    liked = [FeedbackEvent("l", uid, int(next(a for a in m.item_ids if int(a) not in history)), "rated", 10)]
    user = compute_user(m, {}, uid, dropped + liked)
    assert user.liked == {liked[0].anime_id: pytest.approx(5.0)} and set(user.listed) == history | {liked[0].anime_id}
    moved, trained = user.vector, m.user_vector(uid)
    # what the vectors rank, not their cosine (their offset and prior coordinates are shared)
    top = lambda v: set(np.argsort(-(m.item_tower @ v))[:20].tolist())  # noqa: E731
    assert len(top(moved) & top(trained)) <= 10


def test_bad_feedback_gets_precise_statuses_and_records_nothing(stack: Stack):
    user = new_user()
    call = stack.gateway.RecordFeedback

    def bad(*events) -> ErrorDetails:
        return failure(call, gateway_pb2.RecordFeedbackRequest(events=events))

    err = bad(event(user, "Clannad"), event(user, "Air", event_id=""))
    assert err.code == C.INVALID_ARGUMENT and list(err.field_violations) == ["events[1].event_id"]
    err = bad(
        event(user, "Clannad", kind=99),
        event(user, "Air", S.FEEDBACK_KIND_RATED, score=11),
        event(user, "Air", S.FEEDBACK_KIND_RATED),
        event(user, "Air", event_id="x" * 129),
    )
    assert err.code == C.INVALID_ARGUMENT
    assert list(err.field_violations) == ["events[0].kind", "events[1].score", "events[2].score", "events[3].event_id"]
    err = bad(event(user, "Clannad"), event(user, "Clanad: Afterr Storyy Zzz"))
    assert err.code == C.NOT_FOUND and err.reason == "ANIME_NOT_FOUND"
    assert list(err.field_violations) == ["events[1].anime.title"] and err.suggestions
    err = bad(event(user, anime_id=987654321))  # an id no model knows: the ranker's answer, in the gateway's terms
    assert err.code == C.NOT_FOUND and list(err.field_violations) == ["events[0].anime.anime_id"]
    err = failure(call, gateway_pb2.RecordFeedbackRequest())
    assert err.code == C.INVALID_ARGUMENT and list(err.field_violations) == ["events"]
    with pytest.raises(grpc.RpcError) as info:  # like every gateway RPC: an API key first
        call(gateway_pb2.RecordFeedbackRequest(events=[event(user, "Air")]), timeout=30)
    assert info.value.code() == C.UNAUTHENTICATED
    err = failure(call, gateway_pb2.RecordFeedbackRequest(events=[event(user, "Air")] * 501))
    assert err.code == C.INVALID_ARGUMENT and list(err.field_violations) == ["events"]
    # an event id reused for a different event: ALREADY_EXISTS, and the rest of the batch is not recorded
    record(stack, event(user, "Clannad", event_id=f"{user}-1"))
    err = bad(event(user, "Air", event_id=f"{user}-2"), event(user, "Air", event_id=f"{user}-1"))
    assert err.code == C.ALREADY_EXISTS and err.reason == "EVENT_ID_REUSED"
    assert list(err.field_violations) == ["events[1].event_id"]
    assert [e.event_id for e in stored_events(stack, user)] == [f"{user}-1"]


def test_client_feedback_subcommand_records_and_retries_safely(stack: Stack, capsys):
    from anime2vec import client
    from tests.e2e.support import API_KEYS

    user = new_user()
    args = [
        "--address",
        stack.procs["gateway"].spec.address,
        "--api-key",
        API_KEYS[0],
        "feedback",
        "--user",
        str(user),
        "--completed",
        "Clannad",
        "--rated",
        "Air=9",
        "--event-id",
        f"{user}-a",
        "--event-id",
        f"{user}-b",
    ]
    assert client.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(rf"{user}-a\s+completed\s+Clannad\s+\d+\s+-", out) and re.search(
        rf"{user}-b\s+rated\s+Air\s+\d+\s+9", out
    )
    assert f"applied 2, duplicates 0; users updated: {user}" in out
    assert client.main(args) == 0  # the same event ids again: nothing new
    assert "applied 0, duplicates 2; users updated: none" in capsys.readouterr().out
    assert client.main(args[:4] + ["feedback", "--user", str(user), "--rated", "Air"]) == 2  # a rating needs a score
    assert "TITLE=SCORE" in capsys.readouterr().err
