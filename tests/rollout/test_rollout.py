"""Rollout with real processes and sockets: a ranker serves bundle A under continuous load while
`anime2vec index B` and `anime2vec promote B` run as separate processes, then `anime2vec rollback`.
No request may fail, and the served version must switch exactly A → B → A."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from qdrant_client import QdrantClient

from anime2vec.bundle import load_bundle
from anime2vec.index.client import QdrantItemIndex
from anime2vec.index.edge import EdgeItemIndex
from anime2vec.rollout import CollectionAliasHistory, FileAliasHistory, Rollout, RolloutError
from anime2vec.runlocal import ServiceProcess, standard_specs
from anime2vec.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc
from tests.e2e.support import STARTUP_TIMEOUT_S, free_ports
from tests.rollout.conftest import cli, derive_bundle

SWITCH_TIMEOUT_S = 60


class Load:
    """RecommendFromFavourites in a loop over one real channel, recording (status, model_version)."""

    def __init__(self, stub: ranker_pb2_grpc.RankerServiceStub, liked: list[int]):
        self.stub, self.liked = stub, liked
        self.results: list[tuple[grpc.StatusCode, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        request = ranker_pb2.RecommendFromFavouritesRequest(liked_ids=self.liked)
        while not self._stop.is_set():
            try:
                r = self.stub.RecommendFromFavourites(request, timeout=10)
                self.results.append((grpc.StatusCode.OK, r.served_by.model_version))
            except grpc.RpcError as e:
                self.results.append((e.code(), ""))
            time.sleep(0.01)  # 2 shared cores: leave room for the switch itself

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def wait_for(self, version: str, since: int = 0, then: int = 20) -> None:
        """Until `version` is served by a response after the first `since`, then `then` more."""
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while time.monotonic() < deadline:
            served = [i for i, (_, v) in enumerate(self.results) if i >= since and v == version]
            if served and len(self.results) - served[0] > then:
                return
            time.sleep(0.1)
        raise AssertionError(f"{version} not served within {SWITCH_TIMEOUT_S} s; last: {self.results[-3:]}")


def runs(versions: list[str]) -> list[str]:
    """Consecutive duplicates collapsed: the sequence of served versions."""
    return [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]


@pytest.fixture
def ranker(tmp_path, bundles):
    """A ranker serving A and following the alias, with a tiny-random encoder for UpsertAnime."""
    a, _ = bundles
    ports = free_ports(6)
    specs = standard_specs(
        "127.0.0.1",
        {"encoder": tuple(ports[0:2]), "ranker": tuple(ports[2:4]), "gateway": tuple(ports[4:6])},
        encoder_model="tiny-random",
        model_store=a.parent,
        bundle=a.name,
        ranker_data_dir=tmp_path / "ranker",
        gateway_env={},
    )
    spec = {s.name: s for s in specs}
    spec["ranker"].env["ALIAS_POLL_S"] = "0.2"  # follow the alias (standard_specs pins the bundle with 0)
    procs = [ServiceProcess(spec[name], tmp_path / f"{name}.log") for name in ("encoder", "ranker")]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_serving(STARTUP_TIMEOUT_S)
        with grpc.insecure_channel(spec["ranker"].address) as channel:
            yield ranker_pb2_grpc.RankerServiceStub(channel), tmp_path / "ranker", procs[1]
    finally:
        for p in reversed(procs):
            assert p.stop() == 0, p.log_tail()


def test_promote_and_rollback_switch_a_running_ranker_without_failures(ranker, bundles):
    stub, data_dir, proc = ranker
    a, b = bundles
    where = ["--store", str(a.parent), "--data-dir", str(data_dir)]
    liked = [int(x) for x in load_bundle(a, verify=False).arrays["item_ids"][:3]]

    added = stub.UpsertAnime(
        ranker_pb2.UpsertAnimeRequest(
            anime=common_pb2.AnimeInput(
                title="Rollout Test Anime",
                synopsis="A pilot learns to fly a giant robot across the sea.",
                genres=["Mecha"],
                type="TV",
            )
        ),
        timeout=30,
    )
    assert added.created and added.model_version == a.name
    liked.append(added.anime_id)  # served only if the switch replays the added anime

    with Load(stub, liked) as load:
        load.wait_for(a.name)
        r = cli("index", b.name, *where)
        assert r.returncode == 0, r.stderr
        assert f"{b.name}: built collection with 800 items" in r.stdout
        r = cli("index", b.name, *where)  # idempotent
        assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
        r = cli("promote", b.name, *where)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{a.name} → {b.name}"
        load.wait_for(b.name, since=len(load.results))
        info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).model
        assert info.version == b.name and info.n_items == 801  # the added anime came along

        r = cli("versions", *where)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:]}
        assert rows == {a.name: ["yes", "yes"], b.name: ["yes", "yes", "*"]}

        r = cli("rollback", *where)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{b.name} → {a.name}"
        load.wait_for(a.name, since=len(load.results))

    failed = [c for c, _ in load.results if c != grpc.StatusCode.OK]
    assert failed == [], f"{len(failed)} of {len(load.results)} requests failed: {set(failed)}"
    assert len(load.results) >= 60
    assert runs([v for _, v in load.results]) == [a.name, b.name, a.name]
    info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).model
    assert info.version == a.name and info.n_items == 801
    log = proc.log_path.read_text()
    assert "could not switch" not in log and f"replayed 1 added anime into {b.name}" in log


def test_promote_refuses_unknown_unindexed_and_corrupt_versions(tmp_path, bundles):
    a, b = bundles
    where = ["--store", str(a.parent), "--data-dir", str(tmp_path / "ranker")]
    r = cli("promote", "no-such-version", *where)
    assert r.returncode == 2 and "no bundle no-such-version" in r.stderr
    r = cli("index", "../" + a.name, *where)
    assert r.returncode == 2 and "invalid index version" in r.stderr
    r = cli("promote", b.name, *where)  # a bundle, but never indexed
    assert r.returncode == 2 and f"run `anime2vec index {b.name}` first" in r.stderr
    r = cli("rollback", *where)
    assert r.returncode == 2 and "nothing to roll back to" in r.stderr
    r = cli("index", "no-such-version", *where)
    assert r.returncode == 2 and "no bundle no-such-version" in r.stderr

    # an indexed version whose bundle no longer verifies is refused too, and the alias stays put
    root = tmp_path / "ranker" / "qdrant"
    rollout = Rollout(EdgeItemIndex(root), FileAliasHistory(root / "alias_history.json"), a.parent, str(root))
    try:
        assert rollout.build(a.name)[0] and rollout.promote(a.name) == (None, a.name)
        bad = derive_bundle(a, tmp_path / "store", "c-" + a.name, seed=2)
        rollout.store = bad.parent
        assert rollout.build(bad.name)[0]
        (bad / "arrays" / "wmf_V.npy").chmod(0o644)
        with open(bad / "arrays" / "wmf_V.npy", "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\x00\x00\x80\x7f")
        with pytest.raises(RolloutError, match="checksum mismatch for arrays/wmf_V.npy"):
            rollout.promote(bad.name)
        assert rollout.index.alias_target() == a.name
    finally:
        rollout.close()


def test_server_backend_keeps_the_history_on_the_live_collection(bundles):
    """Same steps against qdrant-client (local mode: the calls a Qdrant server gets): a stack of
    previous targets: after promoting A, B, A two rollbacks go to B, then A."""
    a, b = bundles
    client = QdrantClient(":memory:")
    rollout = Rollout(QdrantItemIndex(client), CollectionAliasHistory(client), a.parent, "memory")
    assert rollout.build(a.name) == (True, 800) and rollout.build(b.name) == (True, 800)
    assert rollout.build(b.name) == (False, 0)
    ids = [int(x) for x in load_bundle(a, verify=False).arrays["item_ids"][:50]]
    va, vb = (
        np.array([p.vector for p in rollout.index.get(ids, version=v, with_vectors=True)]) for v in (a.name, b.name)
    )
    assert va.shape == vb.shape == (50, rollout.index.get(ids[:1], version=a.name, with_vectors=True)[0].vector.size)
    assert not np.allclose(va, vb)  # B really serves other vectors
    with pytest.raises(RolloutError, match="nothing to roll back to"):
        rollout.rollback()
    assert rollout.promote(a.name) == (None, a.name)
    assert rollout.promote(b.name) == (a.name, b.name)
    assert rollout.promote(b.name) == (b.name, b.name)  # no-op, history unchanged
    assert rollout.promote(a.name) == (b.name, a.name)
    assert rollout.rollback() == (a.name, b.name)
    assert rollout.rollback() == (b.name, a.name)
    assert rollout.index.alias_target() == a.name
    with pytest.raises(RolloutError, match="nothing to roll back to"):
        rollout.rollback()
    assert [(v.version, v.collection, v.live) for v in rollout.versions()] == [
        (a.name, True, True),
        (b.name, True, False),
    ]
