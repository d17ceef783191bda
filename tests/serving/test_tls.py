"""TLS and mutual TLS over real sockets: the shared server and `open_channel` with a throwaway CA,
settings validation at start-up, the plaintext health-only port, and the three services chained
gateway → ranker → encoder with mutual TLS on every hop (and nothing secret in their logs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anime2vec.paths import REPO_ROOT
from anime2vec.runlocal import OFFLINE_ENV, ServiceProcess, standard_specs
from anime2vec.serving.server import build_server
from anime2vec.serving.settings import SettingsError
from anime2vec.serving.tls import ClientTLS, open_channel
from anime2vec.v1 import common_pb2, encoder_pb2, gateway_pb2, gateway_pb2_grpc
from services.encoder.settings import EncoderSettings
from services.gateway.settings import GatewaySettings
from services.ranker.settings import RankerSettings
from tests.e2e.support import free_ports
from tests.faults.ranker_harness import train_tiny_bundle
from tests.serving.certs import CertificateAuthority
from tests.serving.probe_service import PROBE, Probe, add_probe, call, settings

C = grpc.StatusCode
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority(root / "ca"), CertificateAuthority(root / "other", "other CA")
    return {
        "ca": ca,
        "other": other,
        "server": ca.issue("server"),
        "client": ca.issue("client"),
        "stranger": other.issue("stranger"),
        "named": ca.issue("named", dns=("ranker.internal",), ips=()),
    }  # SAN differs from 127.0.0.1


@pytest.fixture
def serve():
    """serve(**settings) → port of a probe server; stopped at teardown."""
    started = []

    def start(**kw):
        running = build_server(settings(**kw), "probe", add_probe(Probe()), [PROBE])
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def _ok(port: int, tls: ClientTLS | None) -> int:
    with open_channel(f"127.0.0.1:{port}", tls) as channel:
        return call(channel, "Ok", timeout=5).dim


def _code(port: int, tls: ClientTLS | None, address: str = "127.0.0.1") -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        with open_channel(f"{address}:{port}", tls) as channel:
            call(channel, "Ok", timeout=5)
    return info.value.code()


def _tls_server(pki, **kw) -> dict:
    return dict(tls_cert_file=pki["server"].cert, tls_key_file=pki["server"].key, **kw)


# ---- server and client -------------------------------------------------------------------------


def test_tls_server_answers_tls_clients_and_refuses_plaintext_and_unknown_cas(serve, pki):
    port = serve(**_tls_server(pki)).port
    assert _ok(port, ClientTLS(ca_file=pki["ca"].ca_file)) == 7
    assert _code(port, None) == C.UNAVAILABLE  # plaintext client
    assert _code(port, ClientTLS(ca_file=pki["other"].ca_file)) == C.UNAVAILABLE  # server not trusted
    assert _code(port, ClientTLS()) == C.UNAVAILABLE  # public roots: not ours


def test_server_name_override_matches_a_certificate_for_another_name(serve, pki):
    named = pki["named"]
    port = serve(tls_cert_file=named.cert, tls_key_file=named.key).port
    assert _code(port, ClientTLS(ca_file=pki["ca"].ca_file)) == C.UNAVAILABLE  # 127.0.0.1 not in its SAN
    assert _ok(port, ClientTLS(ca_file=pki["ca"].ca_file, server_name="ranker.internal")) == 7


def test_mutual_tls_needs_a_client_certificate_from_the_configured_ca(serve, pki):
    port = serve(**_tls_server(pki, tls_client_ca_file=pki["ca"].ca_file)).port
    ca = pki["ca"].ca_file
    assert _code(port, ClientTLS(ca_file=ca)) == C.UNAVAILABLE  # no client certificate
    stranger = pki["stranger"]
    assert _code(port, ClientTLS(ca, stranger.cert, stranger.key)) == C.UNAVAILABLE  # signed by another CA
    client = pki["client"]
    assert _ok(port, ClientTLS(ca, client.cert, client.key)) == 7


def test_plaintext_health_port_serves_health_only_while_the_api_stays_tls(serve, pki):
    running = serve(**_tls_server(pki, tls_client_ca_file=pki["ca"].ca_file), health_port=0)
    assert running.health_port and running.health_port != running.port
    with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(service=PROBE), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as info:
            call(channel, "Ok", timeout=5)
        assert info.value.code() == C.UNIMPLEMENTED  # no API on this port
        running.set_serving(PROBE, False)  # one health state
        assert check(health_pb2.HealthCheckRequest(service=PROBE), timeout=5).status != SERVING
    assert _code(running.port, None) == C.UNAVAILABLE


def test_message_size_limit_holds_over_tls(serve, pki):
    port = serve(**_tls_server(pki), max_message_bytes=64 * 1024).port
    with open_channel(f"127.0.0.1:{port}", ClientTLS(ca_file=pki["ca"].ca_file)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            call(channel, "Ok", encoder_pb2.EncodeRequest(texts=["x" * 100_000]), timeout=5)
        assert info.value.code() == C.RESOURCE_EXHAUSTED
        assert call(channel, "Ok", timeout=5).dim == 7


# ---- settings ----------------------------------------------------------------------------------


def _error(cls, **kw) -> str:
    with pytest.raises(SettingsError) as info:
        cls.from_env(**kw)
    return str(info.value)


def test_tls_settings_are_validated_with_the_variable_named(pki, tmp_path, monkeypatch):
    server, client, ca = pki["server"], pki["client"], pki["ca"].ca_file
    msg = _error(EncoderSettings, tls_cert_file=server.cert)
    assert "A2V_ENCODER_TLS_KEY_FILE:" in msg and "set together" in msg
    msg = _error(RankerSettings, tls_key_file=server.key)
    assert "A2V_RANKER_TLS_KEY_FILE:" in msg and "A2V_RANKER_TLS_CERT_FILE" in msg
    msg = _error(EncoderSettings, tls_cert_file=tmp_path / "missing.pem", tls_key_file=server.key)
    assert "A2V_ENCODER_TLS_CERT_FILE:" in msg and "missing.pem is not a readable file" in msg
    msg = _error(EncoderSettings, tls_cert_file=server.key, tls_key_file=server.key)
    assert "A2V_ENCODER_TLS_CERT_FILE:" in msg and "no valid PEM certificate" in msg
    msg = _error(EncoderSettings, tls_cert_file=server.cert, tls_key_file=client.key)
    assert "A2V_ENCODER_TLS_KEY_FILE:" in msg and "does not match the certificate" in msg
    msg = _error(EncoderSettings, tls_client_ca_file=ca)
    assert "A2V_ENCODER_TLS_CLIENT_CA_FILE:" in msg and "mutual TLS needs" in msg
    msg = _error(RankerSettings, outbound_tls_cert_file=client.cert, outbound_tls_key_file=client.key)
    assert "A2V_RANKER_OUTBOUND_TLS_KEY_FILE:" in msg and "A2V_RANKER_OUTBOUND_TLS_CA_FILE" in msg
    msg = _error(GatewaySettings, api_keys="k", outbound_tls_ca_file=tmp_path / "nope.pem")
    assert "A2V_GATEWAY_OUTBOUND_TLS_CA_FILE:" in msg
    with pytest.raises(SettingsError, match="OUTBOUND_TLS_SERVER_NAME"):
        GatewaySettings.from_env(api_keys="k", outbound_tls_server_name="ranker.internal")
    # From the environment, as the services read it.
    monkeypatch.setenv("A2V_GATEWAY_TLS_CERT_FILE", str(server.cert))
    monkeypatch.setenv("A2V_GATEWAY_TLS_KEY_FILE", str(server.key))
    monkeypatch.setenv("A2V_GATEWAY_OUTBOUND_TLS_CA_FILE", str(ca))
    monkeypatch.setenv("A2V_GATEWAY_OUTBOUND_TLS_SERVER_NAME", "ranker.internal")
    s = GatewaySettings.from_env(api_keys="k")
    assert s.server_tls().mode == "TLS" and s.outbound_tls() == ClientTLS(ca, None, None, "ranker.internal")
    assert EncoderSettings.from_env().server_tls() is None  # other prefixes untouched


def test_a_service_refuses_to_start_with_a_bad_tls_file(pki, tmp_path):
    env = (
        {k: v for k, v in os.environ.items() if not k.startswith("A2V_ENCODER_")}
        | OFFLINE_ENV
        | {
            "A2V_ENCODER_TLS_CERT_FILE": str(pki["server"].cert),
            "A2V_ENCODER_TLS_KEY_FILE": str(tmp_path / "gone.key"),
            "A2V_ENCODER_GRPC_PORT": "0",
            "A2V_ENCODER_METRICS_PORT": "0",
        }
    )
    run = subprocess.run(
        [sys.executable, "-m", "services.encoder.server"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "A2V_ENCODER_TLS_KEY_FILE" in run.stderr and "gone.key is not a readable file" in run.stderr


# ---- the three services, mutual TLS on every hop -----------------------------------------------

API_KEY = "tls-chain-key-5b1e0c"
QDRANT_KEY = "qdrant-key-9f27aa"
SECRET_TITLE = "Zyxwv Secret Title Nobody Logs"
SECRET_QUERY = "a lighthouse keeper trades riddles with a whale qwzx"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A2V_E2E_BUNDLE, or a bundle this session already trained (tests/rollout's tiny-random one
    first), else a small tiny-random bundle trained here (~45 s on 2 cores)."""
    if os.environ.get("A2V_E2E_BUNDLE"):
        return Path(os.environ["A2V_E2E_BUNDLE"]).resolve()
    trained = sorted(
        tmp_path_factory.getbasetemp().glob("*/models/*/manifest.json"),
        key=lambda p: "tiny-random" not in p.read_text(),
    )
    if trained:
        return trained[0].parent
    return train_tiny_bundle(tmp_path_factory.mktemp("tls-bundle"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, pki, bundle):
    """encoder, ranker and gateway as processes; every server requires client certificates and every
    client (the services' own downstream channels included) presents one."""
    root = tmp_path_factory.mktemp("tls-chain")
    ca, client = pki["ca"], pki["client"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    ports = free_ports(9)
    specs = standard_specs(
        "127.0.0.1",
        {"encoder": tuple(ports[0:2]), "ranker": tuple(ports[2:4]), "gateway": tuple(ports[4:6])},
        encoder_model="tiny-random" if manifest["encoder"]["name"].startswith("tiny-random") else "minilm",
        model_store=bundle.parent,
        bundle=bundle.name,
        ranker_data_dir=root / "ranker",
        gateway_env={"API_KEYS": f"{API_KEY}:read+feedback+catalog", "CATALOG_POLL_S": "2"},
    )
    tls = ClientTLS(ca.ca_file, client.cert, client.key)
    procs = {}
    for spec, health_port in zip(specs, ports[6:]):
        issued = ca.issue(spec.name)
        spec.env |= {
            "TLS_CERT_FILE": str(issued.cert),
            "TLS_KEY_FILE": str(issued.key),
            "TLS_CLIENT_CA_FILE": str(ca.ca_file),
            "HEALTH_PORT": str(health_port),
        }
        if spec.name != "encoder":
            spec.env |= {
                "OUTBOUND_TLS_CA_FILE": str(ca.ca_file),
                "OUTBOUND_TLS_CERT_FILE": str(issued.cert),
                "OUTBOUND_TLS_KEY_FILE": str(issued.key),
            }
        if spec.name == "ranker":
            spec.env["QDRANT_API_KEY"] = QDRANT_KEY  # unused by the embedded engine; must not be logged
        spec.tls = tls
        procs[spec.name] = ServiceProcess(spec, root / "logs" / f"{spec.name}.log")
    try:
        for p in procs.values():  # all at once: the gateway keeps asking the ranker for its catalogue
            p.start()
        for p in procs.values():
            p.wait_serving(300)
        yield procs, tls, [ports[6], ports[7], ports[8]], manifest
    finally:
        for name in ("gateway", "ranker", "encoder"):
            procs[name].stop()


def test_every_hop_runs_mutual_tls(chain, pki, bundle, capsys):
    procs, tls, health_ports, manifest = chain
    address = procs["gateway"].spec.address
    auth = [("authorization", f"Bearer {API_KEY}")]
    catalogue = [json.loads(line) for line in (bundle / "catalog.jsonl").read_text().splitlines()[:2]]
    with open_channel(address, tls) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        # gateway → ranker
        resp = gateway.Recommend(
            gateway_pb2.RecommendRequest(
                favourites=[
                    common_pb2.AnimeRef(anime_id=catalogue[0]["anime_id"]),
                    common_pb2.AnimeRef(title=catalogue[1]["title"]),
                ],
                options=common_pb2.RecommendOptions(limit=5),
            ),
            metadata=auth,
            timeout=60,
        )
        assert len(resp.recommendations) == 5 and resp.served_by.model_version == manifest["version"]
        # gateway → encoder, then → ranker
        resp = gateway.SearchText(
            gateway_pb2.SearchTextRequest(query=SECRET_QUERY, options=common_pb2.RecommendOptions(limit=3)),
            metadata=auth,
            timeout=60,
        )
        assert len(resp.recommendations) == 3
        # gateway → ranker → encoder
        added = gateway.AddAnime(
            gateway_pb2.AddAnimeRequest(
                anime=common_pb2.AnimeInput(title=SECRET_TITLE, synopsis=SECRET_QUERY, genres=["Adventure"])
            ),
            metadata=auth,
            timeout=60,
        )
        assert added.created and added.anime_id > 0
        # a request body must not reach the logs, even in an error
        with pytest.raises(grpc.RpcError) as info:
            gateway.Recommend(
                gateway_pb2.RecommendRequest(favourites=[common_pb2.AnimeRef(title=SECRET_TITLE + "!?")]),
                metadata=[("authorization", "Bearer wrong-key-0d3c")],
                timeout=30,
            )
        assert info.value.code() == C.PERMISSION_DENIED

    for tls_without_cert in (None, ClientTLS(pki["ca"].ca_file)):
        with open_channel(address, tls_without_cert) as channel:
            with pytest.raises(grpc.RpcError) as info:
                gateway_pb2_grpc.GatewayServiceStub(channel).GetModelInfo(
                    common_pb2.GetModelInfoRequest(), metadata=auth, timeout=10
                )
            assert info.value.code() == C.UNAVAILABLE

    # Probes: plaintext health on each service's health port.
    for name, port in zip(("encoder", "ranker", "gateway"), health_ports):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = health_pb2.HealthCheckRequest(service=procs[name].spec.health_service)
            assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status == SERVING

    # The command-line client over mutual TLS.
    from anime2vec import client as cli

    args = [
        "--address",
        address,
        "--api-key",
        API_KEY,
        "--tls-ca-file",
        str(pki["ca"].ca_file),
        "--tls-cert-file",
        str(pki["client"].cert),
        "--tls-key-file",
        str(pki["client"].key),
    ]
    assert cli.main([*args, "info"]) == 0
    assert manifest["version"] in capsys.readouterr().out
    assert cli.main([*args[:4], "--tls-ca-file", "/nonexistent/ca.pem", "info"]) == 2
    assert "/nonexistent/ca.pem is not a readable file" in capsys.readouterr().err

    # Nothing secret in any log: keys, private keys, request bodies.
    logs = {name: p.log_path.read_text() for name, p in procs.items()}
    key_lines = [
        line
        for name in ("encoder", "ranker", "gateway", "client")
        for line in (pki["ca"].root / f"{name}.key").read_text().splitlines()
        if "-----" not in line
    ]
    for name, log in logs.items():
        for secret in (API_KEY, "wrong-key-0d3c", QDRANT_KEY, SECRET_TITLE, SECRET_QUERY, *key_lines):
            assert secret not in log, f"{name}'s log holds a secret: {secret[:12]}..."
        serving = [json.loads(line) for line in log.splitlines() if '"msg": "serving"' in line]
        assert serving and serving[-1]["tls"] == "mutual TLS" and serving[-1]["health_port"]
        assert "TLS is off" not in log
    assert '"code": "PERMISSION_DENIED"' in logs["gateway"] and "AddAnime" in logs["gateway"]
