"""The ranker killed (SIGKILL) under load right after it acknowledged an added anime, then started
again on the same port and data directory (one kill and one restart: they are the slow part).

- While it is down the gateway answers every ranker-backed call with UNAVAILABLE, ErrorInfo reason
  RANKER_UNAVAILABLE and RetryInfo — never INTERNAL, never a hang (each client call has a deadline
  far beyond the gateway's ranker timeout, so a hang would show as DEADLINE_EXCEEDED) — and title
  autocomplete, which the gateway answers alone, keeps working.
- Once the ranker is back the same gateway process serves again: its channel reconnects.
- The anime whose AddAnime was acknowledged just before the kill is still there and recommendable
  (the added-anime store commits, synchronous=FULL, before the ranker answers).
"""

from __future__ import annotations

import grpc
import pytest

from anime2vec.v1 import common_pb2, gateway_pb2
from tests.e2e.support import AUTH, Stack
from tests.load.support import ClosedLoop, Outcome, gateway_mix, kill9

pytestmark = pytest.mark.faults

S = common_pb2
OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE
GUARD_S = 90  # hang guards for each phase, not timing assertions
RANKER_BACKED = ("recommend", "similar")
LANTERNS = S.AnimeInput(
    title="Lanternfall Couriers",
    genres=["Fantasy", "Adventure"],
    type="TV",
    year=2025,
    episodes=12,
    synopsis=(
        "Two young couriers carry glowing lanterns across a floating archipelago of sky islands, "
        "delivering letters between lonely towns while dodging storms and airship pirates."
    ),
)


def ok_since(outcomes: list[Outcome], start: int, kinds=RANKER_BACKED) -> int:
    return sum(o.code == OK and o.kind in kinds for o in outcomes[start:])


def test_a_ranker_killed_under_load_is_reported_precisely_recovers_and_keeps_acknowledged_anime(stack: Stack):
    gateway = stack.procs["gateway"].proc
    n_before = stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30).model.n_items
    kinds, make = gateway_mix(stack.gateway, kinds=("recommend", "similar", "resolve"), timeout_s=30)
    with ClosedLoop(kinds, make, concurrency=3, pause_s=0.05) as load:
        load.wait_for(lambda o: ok_since(o, 0) >= 6, GUARD_S, "load under way")
        added = stack.gateway.AddAnime(gateway_pb2.AddAnimeRequest(anime=LANTERNS), metadata=AUTH, timeout=60)
        kill9(stack.procs["ranker"])  # right after the acknowledgement: no shutdown, nothing flushed on exit
        down = len(load.snapshot())
        load.wait_for(
            lambda o: (
                sum(x.reason == "RANKER_UNAVAILABLE" for x in o[down:]) >= 6
                and sum(x.kind == "resolve" and x.code == OK for x in o[down:]) >= 3
            ),
            GUARD_S,
            "the gateway reports the outage",
        )
        stack.start("ranker")  # same port, same data directory
        back = len(load.snapshot())
        load.wait_for(lambda o: ok_since(o, back) >= 6, GUARD_S, "the gateway serves again")
    outcomes = load.snapshot()

    odd = {
        (o.kind, o.code.name, o.reason, o.message[:100])
        for o in outcomes
        if o.code != OK and (o.code, o.reason) != (UNAVAILABLE, "RANKER_UNAVAILABLE")
    }
    assert not odd, f"statuses other than OK and UNAVAILABLE/RANKER_UNAVAILABLE: {odd}"
    assert all(o.retry_after_s for o in outcomes if o.code == UNAVAILABLE), "UNAVAILABLE without RetryInfo"
    assert all(o.code == OK for o in outcomes if o.kind == "resolve"), "title autocomplete needs no ranker"
    assert any(o.code == UNAVAILABLE for o in outcomes[down:back])
    assert gateway.poll() is None and stack.procs["gateway"].proc is gateway  # the same gateway process

    # the acknowledged anime survived the kill: counted, usable as a query, found from its text
    assert added.created and added.anime_id >= 100_000_000
    info = stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30).model
    assert info.n_items == n_before + 1
    similar = stack.gateway.Similar(
        gateway_pb2.SimilarRequest(anime=S.AnimeRef(anime_id=added.anime_id)), metadata=AUTH, timeout=30
    )
    assert similar.favourites[0].anime_id == added.anime_id and len(similar.recommendations) == 10
    found = stack.gateway.SearchText(
        gateway_pb2.SearchTextRequest(
            query="couriers carry lanterns between floating sky islands", options=S.RecommendOptions(limit=10)
        ),
        metadata=AUTH,
        timeout=60,
    )
    assert added.anime_id in [r.anime_id for r in found.recommendations]
