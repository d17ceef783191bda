"""Crash-consistency drill, in the spirit of Qdrant's "crasher": writers keep writing while the
ranker is killed (SIGKILL) at random moments and restarted on the same data directory, N times.

Writers (threads, one channel each) do what clients of the ranker do:
- `UpsertAnime` without an id (a new anime, unique title): not idempotent, so never retried; a call
  that fails has an unknown outcome (it may have committed before the kill);
- `UpsertAnime` with an id of the writer's own (below the assigned range, above the bundle's ids):
  idempotent, retried until acknowledged;
- `RecordFeedback` batches of 1-3 new events (unique event ids): idempotent by event id, retried
  until acknowledged.
Each cycle the ranker is killed while serving (after a random 0.2-3 s of writes) and, every fourth
cycle from the second on, killed again at a random moment of the start-up that follows (recovery,
replay, collection build); then it is started again. A start that does not reach SERVING counts as
a failed restart (and is tried again).

Counted, and required to be 0:
- acknowledged writes lost: an acknowledged anime missing from the catalogue (checked after every
  restart and at the end), an acknowledged event missing from the feedback store (after every
  restart) or differing from what was sent;
- failed restarts;
- duplicates applied: an event id stored twice or stored without having been acknowledged at the
  end, a title stored under two ids, an id twice in the catalogue, the served collection holding
  other than one point per catalogue anime (checked on disk at the end);
- statuses other than OK / UNAVAILABLE / DEADLINE_EXCEEDED seen by writers.
Also reported: damaged state the ranker found and moved aside at a restart (its recovery log lines).

    python -m tests.faults.crash_drill --cycles 50            # trains the tiny bundle first (~1.5 min)
    python -m tests.faults.crash_drill --cycles 50 --bundle models/<tiny bundle>
tests/faults/test_crash_drill.py runs a few cycles in `make test` (A2V_DRILL_CYCLES to change).

Replicated (`--postgres --rankers 2`, `run_replicated_drill`): two rankers, each with its own data
directory and embedded index, share one PostgreSQL store of record (a throwaway server, or --dsn).
Writer n writes through ranker n % 2 and, when a call fails, retries through the other one (so an
event id is recorded by both replicas at once whenever a kill leaves the first call's outcome
open). Each cycle one ranker, in turn, is SIGKILLed and restarted; the other keeps serving. Checked
after every restart and at the end, on BOTH rankers: every acknowledged anime is in the catalogue
(the survivor learnt of the killed one's writes by following the store) and every acknowledged
event in PostgreSQL; at the end also each ranker's collection (one point per catalogue anime) and
each feedback user's stored vector, which must have been computed from exactly the user's
acknowledged events whichever replica took them ("stale users").
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from anime2vec.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc
from tests.faults.ranker_harness import Ranker, encoder_process, train_tiny_bundle

S = common_pb2
C = grpc.StatusCode
CALL_TIMEOUT_S = 15
EXPECTED = {C.UNAVAILABLE, C.DEADLINE_EXCEEDED}  # what a caller of a killed or starting ranker sees
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]  # reconnect at once after each restart
KINDS = [S.FEEDBACK_KIND_RATED, S.FEEDBACK_KIND_COMPLETED, S.FEEDBACK_KIND_DROPPED, S.FEEDBACK_KIND_ADDED]


@dataclass
class DrillReport:
    cycles: int = 0
    kills_while_serving: int = 0
    kills_during_startup: int = 0
    restarts: int = 0
    failed_restarts: int = 0
    anime_acknowledged: int = 0  # UpsertAnime calls acknowledged (new or by id)
    anime_outcome_unknown: int = 0  # id-less adds whose call failed (may or may not have landed)
    anime_unknown_landed: int = 0  # ... of which the store holds one at the end
    feedback_batches_acknowledged: int = 0
    events_acknowledged: int = 0
    acknowledged_lost: int = 0
    duplicates_applied: int = 0
    unexpected_statuses: dict = field(default_factory=dict)
    recoveries: list = field(default_factory=list)  # damaged state moved aside at a restart
    problems: list = field(default_factory=list)  # what each nonzero count above was
    rankers: int = 1
    backend: str = "sqlite"
    users_checked: int = 0  # replicated drill: feedback users whose stored vectors were checked
    stale_users: int = 0  # ... whose vector on some ranker missed or added events

    @property
    def clean(self) -> bool:
        return not (
            self.acknowledged_lost
            or self.failed_restarts
            or self.duplicates_applied
            or self.unexpected_statuses
            or self.stale_users
        )

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class Ledger:
    """What the writers know was acknowledged (guarded by `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    anime: dict[int, str] = field(default_factory=dict)  # acknowledged id -> title
    unknown_titles: set[str] = field(default_factory=set)  # id-less adds with a failed call
    events: dict[str, tuple] = field(default_factory=dict)  # acknowledged event id -> (user, anime, kind, score)
    batches: int = 0
    statuses: Counter = field(default_factory=Counter)


class Writer(threading.Thread):
    """Writes through `address` (one ranker) or, given several, through address[n % len] first
    and through the next one after each failed call."""

    def __init__(
        self,
        n: int,
        address: str | list[str],
        ledger: Ledger,
        catalogue: list[int],
        own_ids: range,
        stop: threading.Event,
        seed: int,
    ):
        super().__init__(name=f"drill-writer-{n}", daemon=True)
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.n, self.ledger, self.catalogue = n, ledger, catalogue
        self.own_ids, self.stop, self.rng = own_ids, stop, random.Random(seed)
        self.seq = 0
        self._at = n % len(self.addresses)

    def run(self) -> None:
        channels = [grpc.insecure_channel(a, options=CHANNEL_OPTIONS) for a in self.addresses]
        self._stubs = [ranker_pb2_grpc.RankerServiceStub(c) for c in channels]
        try:
            while not self.stop.is_set():
                self.seq += 1
                roll = self.rng.random()
                if roll < 0.4:
                    self.add_new()
                elif roll < 0.55:
                    self.add_own_id()
                else:
                    self.feedback()
        finally:
            for c in channels:
                c.close()

    def _call(self, method: str, request):
        fn = getattr(self._stubs[self._at], method)
        try:
            return fn(request, timeout=CALL_TIMEOUT_S), None
        except grpc.RpcError as e:
            if e.code() not in EXPECTED:
                with self.ledger.lock:
                    self.ledger.statuses[f"{e.code().name}: {(e.details() or '')[:80]}"] += 1
            self._at = (self._at + 1) % len(self._stubs)  # the next attempt goes through another replica
            return None, e.code()

    def _until_acknowledged(self, method: str, request):
        """Idempotent calls: retried until acknowledged (also after the drill is told to stop, so
        that every such write ends acknowledged)."""
        while True:
            resp, _ = self._call(method, request)
            if resp is not None:
                return resp
            time.sleep(0.1)

    def add_new(self) -> None:
        title = f"Drill w{self.n} #{self.seq}"
        resp, _ = self._call("UpsertAnime", ranker_pb2.UpsertAnimeRequest(anime=anime(title)))
        with self.ledger.lock:
            if resp is None:
                self.ledger.unknown_titles.add(title)
            else:
                self.ledger.anime[resp.anime_id] = title

    def add_own_id(self) -> None:
        aid = self.rng.choice(self.own_ids)
        title = f"Drill w{self.n} id {aid}"  # the same text every time: a retry is the same write
        resp = self._until_acknowledged("UpsertAnime", ranker_pb2.UpsertAnimeRequest(anime_id=aid, anime=anime(title)))
        with self.ledger.lock:
            self.ledger.anime[resp.anime_id] = title

    def feedback(self) -> None:
        events = []
        for k in range(self.rng.randint(1, 3)):
            kind = self.rng.choice(KINDS)
            score = self.rng.randint(1, 10) if kind == S.FEEDBACK_KIND_RATED else 0
            events.append(
                ranker_pb2.ResolvedFeedbackEvent(
                    event_id=f"drill-w{self.n}-{self.seq}-{k}",
                    user_id=self.rng.randint(1_000_001, 1_000_040),
                    anime_id=self.rng.choice(self.catalogue),
                    kind=kind,
                    score=score,
                )
            )
        self._until_acknowledged("RecordFeedback", ranker_pb2.FeedbackBatch(events=events))
        with self.ledger.lock:
            self.ledger.batches += 1
            for e in events:
                self.ledger.events[e.event_id] = (e.user_id, e.anime_id, KIND_NAMES[e.kind], e.score or None)


KIND_NAMES = {
    S.FEEDBACK_KIND_RATED: "rated",
    S.FEEDBACK_KIND_COMPLETED: "completed",
    S.FEEDBACK_KIND_DROPPED: "dropped",
    S.FEEDBACK_KIND_ADDED: "added",
}


def anime(title: str) -> S.AnimeInput:
    return S.AnimeInput(
        title=title,
        type="TV",
        genres=["Adventure"],
        synopsis=f"{title}: couriers cross a stormy archipelago carrying letters nobody expects.",
    )


def stored_events(data_dir: Path) -> list[tuple]:
    """(event id, user, anime, kind, score) of every stored event, read-only (the ranker may be running)."""
    db = sqlite3.connect(f"file:{data_dir / 'feedback.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT event_id, user_id, anime_id, kind, score FROM events").fetchall()
    finally:
        db.close()


def stored_anime(data_dir: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(f"file:{data_dir / 'added_anime.sqlite'}?mode=ro", uri=True)
    try:
        return [
            (aid, json.loads(fields)["title"])
            for aid, fields in db.execute("SELECT anime_id, fields FROM added_anime").fetchall()
        ]
    finally:
        db.close()


def catalogue_entries(address: str) -> list[tuple[int, str]]:
    with grpc.insecure_channel(address) as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)
        out, token = [], ""
        while True:
            page = stub.ListCatalog(
                ranker_pb2.ListCatalogRequest(page_size=5000, page_token=token), timeout=CALL_TIMEOUT_S
            )
            out += [(e.anime_id, e.title) for e in page.entries]
            token = page.next_page_token
            if not token:
                return out


def check_acknowledged(
    report: DrillReport, ranker: Ranker, acked_anime: dict[int, str], acked_events: dict[str, tuple], when: str
) -> None:
    """Everything acknowledged before `when` is served (anime) and stored (events)."""
    served = dict(catalogue_entries(ranker.address))
    for aid, title in acked_anime.items():
        if served.get(aid) != title:
            report.acknowledged_lost += 1
            report.problems.append(f"{when}: acknowledged anime {aid} {title!r} served as {served.get(aid)!r}")
    stored = {e[0]: e[1:] for e in stored_events(ranker.data_dir)}
    for eid, event in acked_events.items():
        if stored.get(eid) != event:
            report.acknowledged_lost += 1
            report.problems.append(f"{when}: acknowledged event {eid} {event} stored as {stored.get(eid)}")


def start_until_serving(report: DrillReport, ranker: Ranker) -> None:
    for _attempt in range(3):
        report.restarts += 1
        try:
            ranker.start()
            return
        except RuntimeError as e:
            report.failed_restarts += 1
            report.problems.append(f"restart failed: {str(e)[-600:]}")
            ranker.kill9()
    raise RuntimeError(
        "the ranker failed to start three times in a row; stopping the drill. Last failure: "
        + (report.problems[-1] if report.problems else "?")
    )


def run_drill(
    root: Path, bundle: Path, encoder_address: str, cycles: int, writers: int = 3, seed: int = 0, log=print
) -> DrillReport:
    rng = random.Random(seed)
    report = DrillReport()
    ranker = Ranker(root, bundle, encoder_address)
    start_until_serving(report, ranker)
    bundle_ids = [aid for aid, _ in catalogue_entries(ranker.address)]
    top = max(bundle_ids)
    ledger = Ledger()
    stop = threading.Event()
    threads = [
        Writer(
            n, ranker.address, ledger, bundle_ids, range(top + 1 + 20 * n, top + 1 + 20 * (n + 1)), stop, seed * 100 + n
        )
        for n in range(writers)
    ]
    for t in threads:
        t.start()
    try:
        for cycle in range(1, cycles + 1):
            time.sleep(rng.uniform(0.2, 3.0))  # writes go on
            report.kills_while_serving += 1
            during_startup = cycle % 4 == 2
            if during_startup:  # and kill it again while it starts: recovery, replay, collection build
                ranker.kill9()
                ranker.start(wait=False)
                time.sleep(rng.uniform(0.2, 6.0))
                report.kills_during_startup += 1
            with ledger.lock:  # what was acknowledged before the kill
                acked_anime, acked_events = dict(ledger.anime), dict(ledger.events)
            ranker.kill9()
            offset = ranker.log_size()
            start_until_serving(report, ranker)
            report.recoveries += [x["msg"][:300] for x in ranker.log_records(offset) if x.get("quarantined")]
            check_acknowledged(report, ranker, acked_anime, acked_events, f"cycle {cycle}")
            report.cycles = cycle
            log(
                f"cycle {cycle}/{cycles}: {'start-up' if during_startup else 'serving'} kill, restarted; "
                f"{len(ledger.anime)} anime and {len(ledger.events)} events acknowledged so far"
            )
    finally:
        stop.set()  # writers finish their retries against the running ranker
        for t in threads:
            t.join(120)
    final_checks(report, ranker, ledger, set(bundle_ids))
    return report


def final_checks(report: DrillReport, ranker: Ranker, ledger: Ledger, bundle_ids: set[int]) -> None:
    check_acknowledged(report, ranker, ledger.anime, ledger.events, "end")
    entries = catalogue_entries(ranker.address)
    ids = Counter(aid for aid, _ in entries)
    report.duplicates_applied += sum(n - 1 for n in ids.values() if n > 1)
    report.problems += [f"id {aid} {n} times in the catalogue" for aid, n in ids.items() if n > 1]
    assert ranker.stop() == 0, ranker.proc.log_tail()

    titles = Counter(title for _, title in stored_anime(ranker.data_dir))
    report.duplicates_applied += sum(n - 1 for n in titles.values() if n > 1)
    report.problems += [f"title {t!r} stored {n} times" for t, n in titles.items() if n > 1]
    report.anime_acknowledged = len(ledger.anime)
    report.anime_outcome_unknown = len(ledger.unknown_titles)
    report.anime_unknown_landed = len(ledger.unknown_titles & set(titles))

    events = stored_events(ranker.data_dir)
    event_ids = Counter(e[0] for e in events)
    phantom = set(event_ids) - set(ledger.events)  # every batch ends acknowledged: nothing else may be stored
    report.duplicates_applied += sum(n - 1 for n in event_ids.values() if n > 1) + len(phantom)
    report.problems += [f"event {e} stored but never acknowledged" for e in sorted(phantom)[:10]]
    report.feedback_batches_acknowledged = ledger.batches
    report.events_acknowledged = len(ledger.events)
    report.unexpected_statuses = dict(ledger.statuses)

    # the derived collection: one point per catalogue anime, none lost, none doubled
    from anime2vec.index.edge import EdgeItemIndex

    index = EdgeItemIndex(ranker.data_dir / "qdrant")
    try:
        points = index.count(ranker.bundle.name)
    finally:
        index.close()
    if points != len(ids):
        report.duplicates_applied += max(0, points - len(ids))
        report.acknowledged_lost += max(0, len(ids) - points)
        report.problems.append(f"the collection holds {points} points for {len(ids)} catalogue anime")


# ---- replicated: rankers sharing one PostgreSQL store of record ---------------------------------


def pg_stored_events(dsn: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT event_id, user_id, anime_id, kind, score FROM events").fetchall()


def pg_stored_anime(dsn: str) -> list[tuple[int, str]]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return [
            (int(aid), json.loads(f)["title"])
            for aid, f in conn.execute("SELECT anime_id, fields FROM added_anime").fetchall()
        ]


FOLLOW_WAIT_S = 60  # how long a replica may take to serve another's write (it polls every 0.5 s here)


def check_served_everywhere(report: DrillReport, rankers: list[Ranker], acked_anime: dict[int, str], when: str) -> None:
    """Every acknowledged anime is served by every ranker, whichever one took it (a replica that
    did not take a write serves it once it has followed the store: waited for, up to FOLLOW_WAIT_S)."""
    deadline = time.monotonic() + FOLLOW_WAIT_S
    for r in rankers:
        while True:
            served = dict(catalogue_entries(r.address))
            missing = {aid: t for aid, t in acked_anime.items() if served.get(aid) != t}
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        report.acknowledged_lost += len(missing)
        report.problems += [
            f"{when}: acknowledged anime {aid} {t!r} not served by {r.root.name} (served as {served.get(aid)!r})"
            for aid, t in list(missing.items())[:10]
        ]


def check_events_stored(report: DrillReport, dsn: str, acked_events: dict[str, tuple], when: str) -> None:
    stored = {e[0]: e[1:] for e in pg_stored_events(dsn)}
    for eid, event in acked_events.items():
        if stored.get(eid) != event:
            report.acknowledged_lost += 1
            report.problems.append(f"{when}: acknowledged event {eid} {event} stored as {stored.get(eid)}")


def run_replicated_drill(
    root: Path,
    bundle: Path,
    encoder_address: str,
    dsn: str,
    cycles: int,
    writers: int = 3,
    seed: int = 0,
    rankers: int = 2,
    log=print,
) -> DrillReport:
    rng = random.Random(seed)
    report = DrillReport(rankers=rankers, backend="postgres")
    replicas = [
        Ranker(root / f"ranker{i}", bundle, encoder_address, env={"STORE_DSN": dsn, "CATALOG_FOLLOW_S": "0.5"})
        for i in range(rankers)
    ]
    try:
        return _replicated(report, replicas, rng, dsn, cycles, writers, seed, rankers, log)
    except BaseException:  # an interrupted drill leaves no ranker behind
        for r in replicas:
            r.kill9()
        raise


def _replicated(
    report: DrillReport,
    replicas: list[Ranker],
    rng: random.Random,
    dsn: str,
    cycles: int,
    writers: int,
    seed: int,
    rankers: int,
    log,
) -> DrillReport:
    for r in replicas:
        start_until_serving(report, r)
    bundle_ids = [aid for aid, _ in catalogue_entries(replicas[0].address)]
    top = max(bundle_ids)
    ledger = Ledger()
    stop = threading.Event()
    addresses = [r.address for r in replicas]
    threads = [
        Writer(n, addresses, ledger, bundle_ids, range(top + 1 + 20 * n, top + 1 + 20 * (n + 1)), stop, seed * 100 + n)
        for n in range(writers)
    ]
    for t in threads:
        t.start()
    try:
        for cycle in range(1, cycles + 1):
            victim = replicas[(cycle - 1) % rankers]
            time.sleep(rng.uniform(0.2, 3.0))
            report.kills_while_serving += 1
            during_startup = cycle % 4 == 2
            if during_startup:
                victim.kill9()
                victim.start(wait=False)
                time.sleep(rng.uniform(0.2, 6.0))
                report.kills_during_startup += 1
            with ledger.lock:
                acked_anime, acked_events = dict(ledger.anime), dict(ledger.events)
            victim.kill9()
            offset = victim.log_size()
            start_until_serving(report, victim)
            report.recoveries += [x["msg"][:300] for x in victim.log_records(offset) if x.get("quarantined")]
            check_served_everywhere(report, replicas, acked_anime, f"cycle {cycle}")
            check_events_stored(report, dsn, acked_events, f"cycle {cycle}")
            report.cycles = cycle
            log(
                f"cycle {cycle}/{cycles}: {victim.root.name} {'start-up' if during_startup else 'serving'} kill, "
                f"restarted; {len(ledger.anime)} anime and {len(ledger.events)} events acknowledged so far"
            )
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    final_replicated_checks(report, replicas, ledger, dsn)
    return report


def final_replicated_checks(report: DrillReport, replicas: list[Ranker], ledger: Ledger, dsn: str) -> None:
    check_served_everywhere(report, replicas, ledger.anime, "end")
    check_events_stored(report, dsn, ledger.events, "end")
    sizes = {}
    for r in replicas:
        ids = Counter(aid for aid, _ in catalogue_entries(r.address))
        sizes[r.root.name] = len(ids)
        report.duplicates_applied += sum(n - 1 for n in ids.values() if n > 1)
        report.problems += [f"{r.root.name}: id {aid} {n} times in the catalogue" for aid, n in ids.items() if n > 1]

    # every feedback user, asked for through every replica: each must serve a vector computed from
    # exactly the user's acknowledged events (a stale stored vector is recomputed on that request)
    by_user: dict[int, set[str]] = {}
    for eid, (uid, *_rest) in ledger.events.items():
        by_user.setdefault(int(uid), set()).add(eid)
    for r in replicas:
        stub = r.stub()
        for uid in by_user:
            stub.RecommendForUser(S.RecommendForUserRequest(user_id=uid), timeout=CALL_TIMEOUT_S)
    for r in replicas:
        assert r.stop() == 0, r.proc.log_tail()

    titles = Counter(title for _, title in pg_stored_anime(dsn))
    report.duplicates_applied += sum(n - 1 for n in titles.values() if n > 1)
    report.problems += [f"title {t!r} stored {n} times" for t, n in titles.items() if n > 1]
    report.anime_acknowledged = len(ledger.anime)
    report.anime_outcome_unknown = len(ledger.unknown_titles)
    report.anime_unknown_landed = len(ledger.unknown_titles & set(titles))
    events = pg_stored_events(dsn)
    event_ids = Counter(e[0] for e in events)
    phantom = set(event_ids) - set(ledger.events)
    report.duplicates_applied += sum(n - 1 for n in event_ids.values() if n > 1) + len(phantom)
    report.problems += [f"event {e} stored but never acknowledged" for e in sorted(phantom)[:10]]
    report.feedback_batches_acknowledged = ledger.batches
    report.events_acknowledged = len(ledger.events)
    report.unexpected_statuses = dict(ledger.statuses)

    from anime2vec.index.edge import EdgeItemIndex

    for r in replicas:
        index = EdgeItemIndex(r.data_dir / "qdrant")
        try:
            points = index.count(r.bundle.name)
            users = index.get_users(r.bundle.name, sorted(by_user))
        finally:
            index.close()
        if points != sizes[r.root.name]:
            report.duplicates_applied += max(0, points - sizes[r.root.name])
            report.acknowledged_lost += max(0, sizes[r.root.name] - points)
            report.problems.append(
                f"{r.root.name}: the collection holds {points} points for {sizes[r.root.name]} catalogue anime"
            )
        stored = {u.user_id: {e[0] for e in u.payload.get("events") or []} for u in users}
        for uid, acked in by_user.items():
            report.users_checked += 1
            if stored.get(uid) != acked:
                report.stale_users += 1
                report.problems.append(
                    f"{r.root.name}: user {uid} served from {len(stored.get(uid) or ())} events, "
                    f"{len(acked)} acknowledged"
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.faults.crash_drill", description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", type=Path, help="a bundle trained with the tiny-random encoder (default: train one)")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument(
        "--postgres",
        action="store_true",
        help="rankers share a PostgreSQL store of record (a throwaway server unless --dsn)",
    )
    p.add_argument("--dsn", help="with --postgres: an empty database to use instead of a throwaway server")
    p.add_argument("--rankers", type=int, default=None, help="rankers (with --postgres; default 2)")
    p.add_argument("--keep-logs", type=Path, help="when the drill fails, copy every service's log here")
    a = p.parse_args(argv)
    if (a.rankers or 1) > 1 and not a.postgres:
        p.error("--rankers > 1 needs --postgres: SQLite stores are one ranker's own")
    with tempfile.TemporaryDirectory(prefix="a2v-drill-") as tmp:
        root = Path(tmp)
        bundle = a.bundle.resolve() if a.bundle else train_tiny_bundle(root / "train")
        encoder = encoder_process(root)
        encoder.start()
        server = None
        try:
            encoder.wait_serving(300)
            started = time.monotonic()
            if a.postgres:
                dsn = a.dsn
                if not dsn:
                    from tests.store.postgres_server import PostgresServer

                    server = PostgresServer().start()
                    dsn = server.create_database("drill")
                report = run_replicated_drill(
                    root / "drill",
                    bundle,
                    encoder.spec.address,
                    dsn,
                    a.cycles,
                    a.writers,
                    a.seed,
                    rankers=a.rankers or 2,
                )
            else:
                report = run_drill(root / "drill", bundle, encoder.spec.address, a.cycles, a.writers, a.seed)
        except BaseException:
            if a.keep_logs:  # the temporary directory goes: keep what explains the failure
                import shutil

                for log_file in list(root.rglob("*.log")):
                    dest = a.keep_logs / log_file.relative_to(root)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log_file, dest)
                if server is not None:
                    (a.keep_logs / "postgres.log").write_text(server.log_tail())
            raise
        finally:
            encoder.stop()
            if server is not None:
                server.stop()
    print(report.as_json())
    print(
        f"{report.cycles} cycles ({report.kills_while_serving} kills while serving, {report.kills_during_startup} "
        f"during start-up) of {report.rankers} ranker(s) on {report.backend} in {time.monotonic() - started:.0f} s: "
        f"{report.anime_acknowledged} anime and {report.events_acknowledged} events in "
        f"{report.feedback_batches_acknowledged} batches acknowledged; lost {report.acknowledged_lost}, failed "
        f"restarts {report.failed_restarts}, duplicates {report.duplicates_applied}, unexpected statuses "
        f"{sum(report.unexpected_statuses.values())}, stale users {report.stale_users}/{report.users_checked}"
    )
    if a.json:
        a.json.write_text(report.as_json())
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
