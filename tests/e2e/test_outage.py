"""Degraded service over real sockets: a bundle without the hybrid's arrays serves WMF and says so
(and starts even though its data directory holds an anime added under another model);
with the encoder down, favourites queries still work and free text fails with a clear UNAVAILABLE.

It stops the encoder; the `stack` fixture of the next test on the same worker restarts it and waits
until free text answers again."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from anime2vec import client
from anime2vec.bundle import load_bundle, write_bundle
from anime2vec.serving.errors import ErrorDetails
from anime2vec.store.added_anime import AddedAnimeStore
from anime2vec.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.e2e.support import API_KEYS, AUTH, Stack, start_services

S = common_pb2


def without_hybrid(bundle_path, store):
    """A verified copy of the bundle whose manifest lists none of the hybrid's arrays (a bundle from
    a training run that did not produce them, or an older format)."""
    b = load_bundle(bundle_path)
    arrays = {k: v for k, v in b.arrays.items() if not k.startswith("hybrid.")}
    assert len(arrays) < len(b.arrays)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("files", "version", "format")}
    extra = {
        rel: (b.path / rel).read_bytes()
        for rel in b.manifest["files"]
        if not rel.startswith("arrays/") and rel not in ("catalog.jsonl", "manifest.json")
    }
    return write_bundle(
        store, manifest, b.catalog, arrays, b.train, version=b.version + "-no-hybrid", extra_files=extra
    )


@pytest.fixture(scope="module")
def wmf_gateway(services, e2e_dir):
    """A second ranker (and a gateway in front of it) serving the bundle without the hybrid."""
    services.ensure_running()
    path = without_hybrid(services.bundle, e2e_dir / "models-no-hybrid")
    bundle = load_bundle(path)
    assert not bundle.prefixed("hybrid")
    # an anime added earlier on this data directory: this model has no item tower to embed it
    store = AddedAnimeStore(e2e_dir / "no-hybrid" / "ranker" / "added_anime.sqlite")
    store.put(
        100_000_000,
        {"title": "Added Before", "synopsis": "An anime added under an earlier model."},
        np.full(bundle.manifest["encoder"]["dim"], 0.05, np.float32),
        bundle.manifest["encoder"]["fingerprint"],
    )
    store.close()
    procs = start_services(
        e2e_dir / "no-hybrid", path, names=("ranker", "gateway"), encoder_address=services.procs["encoder"].spec.address
    )
    channel = grpc.insecure_channel(procs["gateway"].spec.address)
    yield gateway_pb2_grpc.GatewayServiceStub(channel), path.name, procs["gateway"].spec.address
    channel.close()
    for name in ("gateway", "ranker"):
        assert procs[name].stop() == 0


def test_a_bundle_without_the_hybrid_serves_wmf_and_says_so(wmf_gateway, capsys):
    gateway, version, address = wmf_gateway
    resp = gateway.Recommend(
        gateway_pb2.RecommendRequest(
            favourites=[S.AnimeRef(title="Naruto"), S.AnimeRef(title="Bleach")], options=S.RecommendOptions(limit=10)
        ),
        metadata=AUTH,
        timeout=30,
    )
    served = resp.served_by
    assert (served.strategy, served.model_version, served.degraded) == (S.STRATEGY_WMF, version, True)
    assert gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30).model.n_items == 800
    assert "DropoutNet" in served.degraded_reason and served.scorer == "wmf"
    assert len(resp.recommendations) == 10 and not {20, 269} & {r.anime_id for r in resp.recommendations}
    # free text cannot use WMF (no interactions): popularity, degraded with both reasons
    text = gateway.SearchText(
        gateway_pb2.SearchTextRequest(query="a ninja village", options=S.RecommendOptions(limit=5)),
        metadata=AUTH,
        timeout=30,
    )
    assert text.served_by.strategy == S.STRATEGY_POPULARITY and text.served_by.degraded
    members = [r.members for r in text.recommendations]
    assert len(members) == 5 and members == sorted(members, reverse=True)
    # the command-line client shows it
    assert (
        client.main(["--address", address, "--api-key", API_KEYS[0], "recommend", "Naruto", "Bleach", "--limit", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert "served by: wmf (wmf)" in out and "degraded: this model has no DropoutNet weights" in out


def test_with_the_encoder_down_favourites_work_and_free_text_is_unavailable(stack: Stack):
    stack.stop("encoder")
    resp = stack.gateway.Recommend(
        gateway_pb2.RecommendRequest(
            favourites=[S.AnimeRef(title="Cowboy Bebop")], options=S.RecommendOptions(limit=5)
        ),
        metadata=AUTH,
        timeout=30,
    )
    assert len(resp.recommendations) == 5 and not resp.served_by.degraded
    similar = stack.gateway.Similar(
        gateway_pb2.SimilarRequest(anime=S.AnimeRef(title="Bleach")), metadata=AUTH, timeout=30
    )
    assert len(similar.recommendations) == 10

    with pytest.raises(grpc.RpcError) as info:
        stack.gateway.SearchText(
            gateway_pb2.SearchTextRequest(query="robots fight aliens in deep space"), metadata=AUTH, timeout=30
        )
    err = ErrorDetails.from_rpc_error(info.value)
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "ENCODER_UNAVAILABLE")
    assert "free-text search needs the encoder" in err.message and "favourites" in err.message
    assert err.retry_after_s and err.retry_after_s > 0

    n_items = stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30).model.n_items
    with pytest.raises(grpc.RpcError) as info:  # adding an anime needs the encoder too (in the ranker)
        stack.gateway.AddAnime(
            gateway_pb2.AddAnimeRequest(
                anime=S.AnimeInput(title="Offline Show", synopsis="A show added while the encoder is down.")
            ),
            metadata=AUTH,
            timeout=30,
        )
    assert ErrorDetails.from_rpc_error(info.value).reason == "ENCODER_UNAVAILABLE"
    assert stack.gateway.GetModelInfo(S.GetModelInfoRequest(), metadata=AUTH, timeout=30).model.n_items == n_items
