"""A corrupt new bundle is refused while the old one keeps serving.

The shared stack's ranker serves bundle A and follows the collection alias. Bundle B is written
properly into its store, then one of its files is damaged. `anime2vec promote B` refuses it (exit
2, checksum named: it verifies the bundle before anything else) and leaves the alias on A. The
alias file is then pointed at B by hand, as a promotion made before the damage (or by another tool)
would leave it: the ranker must keep serving A — every request succeeds, GetModelInfo still says A
— log the refusal with the file named, and count it once in
a2v_bundle_load_failures_total{reason="invalid"}, not once per alias poll."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest

from anime2vec import cli
from anime2vec.v1 import common_pb2, ranker_pb2, ranker_pb2_grpc
from tests.e2e.support import Stack
from tests.load.support import ALIAS_POLL_S, metric, scrape, wait_until
from tests.rollout.conftest import derive_bundle

pytestmark = pytest.mark.faults

GUARD_S = 60


def corrupt(path) -> None:
    """Overwrite the last 4 bytes of a file (a float of the WMF item factors)."""
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")


def point_alias(alias_file, version: str) -> None:
    tmp = alias_file.with_name(".aliases.json.test")  # replaced atomically, as the index does
    tmp.write_text(json.dumps({"anime2vec_items": version}))
    os.replace(tmp, alias_file)


def test_a_corrupt_bundle_behind_the_alias_is_refused_and_the_old_one_keeps_serving(stack: Stack, capsys):
    ranker = stack.procs["ranker"]
    a, store, data = stack.bundle, stack.bundle.parent, ranker.spec.env["DATA_DIR"]
    url = f"http://{ranker.spec.host}:{ranker.spec.metrics_port}/metrics"
    alias_file = Path(data) / "qdrant" / "aliases.json"
    b = derive_bundle(a, store, "corrupt-" + a.name, seed=1)
    corrupt(b / "arrays" / "wmf_V.npy")

    assert cli.main(["promote", b.name, "--store", str(store), "--data-dir", data]) == 2
    assert "checksum mismatch for arrays/wmf_V.npy" in capsys.readouterr().err
    assert json.loads(alias_file.read_text()) == {"anime2vec_items": a.name}

    failures_before = metric(scrape(url), "a2v_bundle_load_failures_total", service="ranker")
    log_offset = ranker.log_path.stat().st_size
    results: list[tuple[grpc.StatusCode, str]] = []
    stop = threading.Event()
    with grpc.insecure_channel(ranker.spec.address) as channel:
        stub = ranker_pb2_grpc.RankerServiceStub(channel)

        def load():
            request = ranker_pb2.RecommendFromFavouritesRequest(liked_ids=[1, 20])
            while not stop.is_set():
                try:
                    served = stub.RecommendFromFavourites(request, timeout=30).served_by.model_version
                    results.append((grpc.StatusCode.OK, served))
                except grpc.RpcError as e:
                    results.append((e.code(), e.details()))
                stop.wait(0.05)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        try:
            point_alias(alias_file, b.name)
            failures = lambda: metric(scrape(url), "a2v_bundle_load_failures_total", service="ranker")  # noqa: E731
            wait_until(lambda: failures() > failures_before, GUARD_S, "the ranker noticed the alias move")
            time.sleep(20 * ALIAS_POLL_S)  # many more polls: still counted once
            n = len(results)
            wait_until(lambda: len(results) >= n + 5, GUARD_S, "requests after the refusal")
            body = scrape(url)
            info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30).model
        finally:
            stop.set()
            thread.join(30)
            point_alias(alias_file, a.name)  # leave the shared stack as it was
            shutil.rmtree(b)

    assert metric(body, "a2v_bundle_load_failures_total", service="ranker") == failures_before + 1
    assert metric(body, "a2v_bundle_load_failures_total", service="ranker", reason="invalid") >= 1
    assert metric(body, "a2v_model_info", service="ranker", version=a.name) == 1
    assert info.version == a.name
    assert len(results) >= 10 and set(results) == {(grpc.StatusCode.OK, a.name)}, set(results)

    with open(ranker.log_path) as f:
        f.seek(log_offset)
        refusals = [json.loads(line) for line in f if line.startswith("{") and "refusing to serve" in line]
    assert len(refusals) == 1, refusals
    msg = refusals[0]["msg"]
    assert refusals[0]["level"] == "ERROR" and b.name in msg and "checksum mismatch for arrays/wmf_V.npy" in msg
    assert f"still serving {a.name}" in msg
