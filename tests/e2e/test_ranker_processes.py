"""`make run` with two ranker processes (issue 16): the runner as `make run` starts it, on the e2e sample
bundle, `--ranker-processes 2`; real processes over real sockets.

- The gateway's round-robin channel reaches both (each process's own request counter, on its own
  metrics port, after the first ranker's ports).
- They share the store of record as PostgreSQL replicas do (tests/faults/test_two_rankers_postgres.py),
  here the first one's SQLite files: an anime added through the gateway lands in one process and the
  other serves it after its follower's poll; feedback recorded through either is served by the other.
- A promotion of the alias the rankers follow (what `make run`'s quality gate does) moves both, the
  second building its own copy of the new collection.
- One process dying stops the run, the others gracefully, exit status 1.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from anime2vec.runlocal import OFFLINE_ENV
from anime2vec.v1 import common_pb2 as S
from anime2vec.v1 import gateway_pb2, gateway_pb2_grpc, ranker_pb2, ranker_pb2_grpc
from tests.load.support import metric, scrape
from tests.processes import Output, descendants, free_port_runs, start_runlocal, still_running

START_TIMEOUT_S = 600  # hang guards, never timing assertions
FOLLOW_TIMEOUT_S = 60
RANKER = "anime2vec.v1.RankerService"


@dataclass
class Run:
    runner: subprocess.Popen
    out: Output
    state: Path
    store: Path
    grpc_base: int
    metrics_base: int
    gateway: gateway_pb2_grpc.GatewayServiceStub
    rankers: list[ranker_pb2_grpc.RankerServiceStub]
    auth: list[tuple[str, str]]
    channels: list[grpc.Channel]

    def metrics(self, i: int) -> str:
        return scrape(f"http://127.0.0.1:{self.metrics_base + 2 + i}/metrics")

    def calls(self, i: int, method: str) -> float:
        """Ranker process i's OK calls of `method`."""
        return metric(self.metrics(i), "a2v_rpc_requests_total", method=f"{RANKER}/{method}", code="OK")

    def pid(self, label: str) -> int:
        m = re.search(rf"^  {label} +127\.0\.0\.1:\d+ .*pid (\d+)\)$", self.out.text(), re.M)
        assert m, self.out.text()
        return int(m.group(1))


def _eventually(check, what: str, timeout_s: float = FOLLOW_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"never happened within {timeout_s:.0f} s: {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def run(bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranker-processes")
    store, state = root / "models", root / "state"
    store.mkdir()
    (store / bundle.name).symlink_to(bundle, target_is_directory=True)  # the shared bundle is never written to
    grpc_base, metrics_base = free_port_runs(4)
    env = {
        k: v
        for k, v in (os.environ | OFFLINE_ENV).items()
        if k not in ("A2V_GATEWAY_API_KEYS", "A2V_GATEWAY_API_KEYS_FILE", "A2V_RANKER_PROCESSES")
    }
    runner = start_runlocal(
        store,
        state,
        "--no-full",
        "--base-port",
        str(grpc_base),
        "--metrics-base-port",
        str(metrics_base),
        "--ranker-processes",
        "2",
        env=env,
    )
    out = Output(runner.stdout)
    seen: dict = {}
    channels: list[grpc.Channel] = []
    try:
        running = out.wait_for(lambda ls: any("anime2vec is running" in x for x in ls), START_TIMEOUT_S, runner)
        seen.update((p.pid, p) for p in descendants(runner.pid))
        assert running, out.text()
        channels = [grpc.insecure_channel(f"127.0.0.1:{grpc_base + k}") for k in (0, 2, 3)]
        yield Run(
            runner,
            out,
            state,
            store,
            grpc_base,
            metrics_base,
            gateway_pb2_grpc.GatewayServiceStub(channels[0]),
            [ranker_pb2_grpc.RankerServiceStub(c) for c in channels[1:]],
            [("authorization", f"Bearer {(state / 'api-key').read_text().strip()}")],
            channels,
        )
    finally:
        for c in channels:
            c.close()
        seen.update((p.pid, p) for p in descendants(runner.pid))
        if runner.poll() is None:
            runner.send_signal(signal.SIGTERM)
            try:
                runner.wait(90)
            except subprocess.TimeoutExpired:
                runner.kill()
        leftovers = still_running(set(seen), {p.session for p in seen.values()} - {os.getsid(0)})
        for p in leftovers:  # never leave services running on the shared machine
            os.kill(p.pid, signal.SIGKILL)
        assert not leftovers, f"still running after the runner stopped: {leftovers}"


def _catalogue(stub) -> list[int]:
    ids, token = [], ""
    while True:
        page = stub.ListCatalog(ranker_pb2.ListCatalogRequest(page_size=5000, page_token=token), timeout=30)
        ids += [e.anime_id for e in page.entries]
        token = page.next_page_token
        if not token:
            return ids


def test_the_ranker_processes_have_their_own_ports_and_the_gateway_calls_each(run):
    text = run.out.text()
    assert "with 2 ranker processes" in text
    for i, label in enumerate(("ranker", "ranker-1")):  # the first where a lone ranker is, the second after it
        port, metrics_port = run.grpc_base + 2 + i, run.metrics_base + 2 + i
        assert re.search(
            rf"^  {label} +127\.0\.0\.1:{port} +\(metrics http://127\.0\.0\.1:{metrics_port}/metrics", text, re.M
        ), text
    liked = _catalogue(run.rankers[0])[:3]
    request = gateway_pb2.RecommendRequest(favourites=[S.AnimeRef(anime_id=a) for a in liked])
    before = [run.calls(i, "RecommendFromFavourites") for i in (0, 1)]

    def both_answered() -> bool:
        for _ in range(4):
            assert run.gateway.Recommend(request, metadata=run.auth, timeout=30).recommendations
        return all(run.calls(i, "RecommendFromFavourites") > before[i] for i in (0, 1))

    _eventually(both_answered, "calls through the gateway reached both ranker processes")


def test_an_anime_added_through_one_process_is_served_by_the_other(run):
    added = run.gateway.AddAnime(
        gateway_pb2.AddAnimeRequest(
            anime=S.AnimeInput(
                title="Lanternfish Relay",
                type="TV",
                genres=["Twofold Genre"],
                synopsis="Deep-sea couriers pass glowing messages between sleeping submarine towns.",
            )
        ),
        metadata=run.auth,
        timeout=60,
    )
    assert added.created

    # one process took the call (its counter moves as the call completes: read until it has)
    def upserts() -> list[float] | None:
        n = [run.calls(i, "UpsertAnime") for i in (0, 1)]
        return n if sum(n) else None

    took = _eventually(upserts, "the UpsertAnime call is counted")
    assert sorted(took) == [0, 1], f"one process takes the call: {took}"
    other = run.rankers[took.index(0)]

    # the other process learns of it from the shared store (its follower polls every 2 s)
    _eventually(lambda: added.anime_id in _catalogue(other), "the other process lists the anime")
    similar = other.SimilarItems(ranker_pb2.SimilarItemsRequest(anime_id=added.anime_id), timeout=60)
    assert similar.recommendations  # it knows the anime as one of its own
    liked = _catalogue(other)[:2]
    only_twofold = ranker_pb2.RecommendFromFavouritesRequest(
        liked_ids=liked, options=S.RecommendOptions(filters=S.Filters(include_genres=["twofold genre"]))
    )
    assert [r.anime_id for r in other.RecommendFromFavourites(only_twofold, timeout=60).recommendations] == [
        added.anime_id
    ]

    # through the gateway, calls in turn to both processes answer with it
    ok_in_a_row = 0

    def answered_by_both_in_turn() -> bool:
        nonlocal ok_in_a_row
        try:
            page = run.gateway.Similar(
                gateway_pb2.SimilarRequest(anime=S.AnimeRef(anime_id=added.anime_id)), metadata=run.auth, timeout=30
            )
            ok_in_a_row = ok_in_a_row + 1 if page.recommendations else 0
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e  # a process that has not followed yet
            ok_in_a_row = 0
        return ok_in_a_row >= 6

    _eventually(answered_by_both_in_turn, "six Similar calls in a row through the gateway found the anime")


def test_feedback_recorded_through_either_process_is_served_by_the_other(run):
    a, b = run.rankers
    catalogue = sorted(_catalogue(b))
    liked = catalogue[:6]
    events = [
        ranker_pb2.ResolvedFeedbackEvent(
            event_id=f"procs-{i}", user_id=5_000_001, anime_id=aid, kind=S.FEEDBACK_KIND_RATED, score=10
        )
        for i, aid in enumerate(liked)
    ]
    assert a.RecordFeedback(ranker_pb2.FeedbackBatch(events=events), timeout=60).applied == len(events)
    page = b.RecommendForUser(S.RecommendForUserRequest(user_id=5_000_001), timeout=60)
    assert page.recommendations and not {r.anime_id for r in page.recommendations} & set(liked), (
        "B must know the user's list (its liked anime are excluded from their recommendations)"
    )
    more = [
        ranker_pb2.ResolvedFeedbackEvent(
            event_id="procs-more", user_id=5_000_001, anime_id=catalogue[10], kind=S.FEEDBACK_KIND_COMPLETED
        )
    ]
    assert b.RecordFeedback(ranker_pb2.FeedbackBatch(events=more), timeout=60).applied == 1
    page = a.RecommendForUser(S.RecommendForUserRequest(user_id=5_000_001), timeout=60)
    assert page.recommendations and catalogue[10] not in {r.anime_id for r in page.recommendations}
    # the same batch again through the other process: already stored (one store), applied once
    again = b.RecordFeedback(ranker_pb2.FeedbackBatch(events=events), timeout=60)
    assert (again.applied, again.duplicates) == (0, len(events))


def test_every_process_follows_a_promotion(run, bundle):
    """What `make run`'s quality gate does with the full bundle: build its collection in the first
    ranker's data dir and move the alias there; the second process follows and builds its own copy."""
    from tests.rollout.conftest import cli, derive_bundle

    added = run.gateway.AddAnime(
        gateway_pb2.AddAnimeRequest(
            anime=S.AnimeInput(title="Moth Lamp Sonata", genres=["Music"], synopsis="A pianist plays to moths.")
        ),
        metadata=run.auth,
        timeout=60,
    )
    b = derive_bundle(bundle, run.store, "b-" + bundle.name, seed=3)
    data_dir = run.state / "sample" / "ranker"
    for step in ("index", "promote"):
        r = cli(step, b.name, "--store", str(run.store), "--data-dir", str(data_dir))
        assert r.returncode == 0, r.stderr

    def serves_b(stub) -> bool:
        return stub.GetModelInfo(S.GetModelInfoRequest(), timeout=30).model.version == b.name

    for i, stub in enumerate(run.rankers):
        # the second builds its copy of the collection before it switches
        _eventually(lambda s=stub: serves_b(s), f"ranker process {i} serves the promoted version", timeout_s=180)
        # the anime added before the switch is re-embedded into the new version (the other's by its follower)
        _eventually(lambda s=stub: added.anime_id in _catalogue(s), f"ranker process {i} lists the added anime")
        page = stub.SimilarItems(ranker_pb2.SimilarItemsRequest(anime_id=added.anime_id), timeout=60)
        assert page.recommendations and page.served_by.model_version == b.name
    assert (run.state / "sample" / "ranker-1" / "qdrant" / "versions" / b.name / "meta.json").is_file()


def test_one_ranker_process_dying_stops_the_others_and_the_run_fails(run):
    os.kill(run.pid("ranker-1"), signal.SIGKILL)
    assert run.runner.wait(120) == 1, run.out.text()
    text = run.out.text()
    assert f"ranker-1 exited with status {-signal.SIGKILL}; stopping the others" in text, text
    for name in ("gateway", "ranker", "encoder"):
        assert f"stopped {name} (exit status 0)" in text, text
