"""`make run`: the whole system on one machine, on loopback.

Serves the newest full bundle of the requested data (full by default, the sample with --sample).
Without one it trains the quick bundle (minutes: no MiniLM encodings), serves it, and trains the
full bundle in the background, which the quality gate then promotes (anime2vec/next_bundle.py).
It starts the encoder, the ranker processes (--ranker-processes, default one per CPU core
available, at most 4) and the gateway as child processes, waits until each one's health check says
SERVING, prints how to call them, and on Ctrl-C / SIGTERM stops them in order (gateway, rankers,
encoder), each through its own graceful SIGTERM shutdown. If any of them dies, the others are
stopped too and the exit status is 1.

Several ranker processes use several cores (one ranker is bound to about one by the GIL and the
embedded engine's locks, and the engine locks its directory to one process). Each has its own data
directory with its own copy of the embedded collections (`<state>/<mode>/ranker-<i>` beside the
first one's `ranker`), its own gRPC and metrics ports (after the first ranker's), and they share
what replicas share through PostgreSQL in Kubernetes, here through the first one's data directory:
the SQLite stores of record (anime added through AddAnime, feedback events; A2V_RANKER_STORE_DIR),
followed by every process (services/ranker/catalog_follower.py), and the collection alias
(A2V_RANKER_ALIAS_DATA_DIR), which the quality gate moves and every process follows, building its
own copy of the new version's collection. The gateway calls them in turn (one round-robin channel
over the list of addresses). Ctrl-C / SIGTERM at any stage, training
included, stops every child with what it started (anime2vec.process_groups); the exit status is
then 0 once serving, 128 + the signal before. Every child runs in its own session, so a runner
killed with SIGKILL leaves them running (it prints the services' pids once they serve).

`ServiceProcess` is also what the end-to-end tests start the services with.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .bundle import newest_bundle
from .next_bundle import NextBundle
from .paths import REPO_ROOT, default_model_store
from .process_groups import raise_on_signals, received_signal, run_to_completion, spawn, stop_group, stopping
from .serving.tls import ClientTLS, open_channel

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class ServiceSpec:
    name: str  # "encoder", "ranker" or "gateway": also its env prefix A2V_<NAME>_
    module: str  # python -m <module>
    health_service: str  # full proto name reported SERVING when ready
    host: str
    grpc_port: int
    metrics_port: int
    env: dict[str, str] = field(default_factory=dict)  # settings without the prefix, e.g. {"MODEL": "minilm"}
    tls: ClientTLS | None = None  # how to dial it when it serves TLS (TLS_CERT_FILE in env); None: plaintext
    instance: int = 0  # several processes of one service (the ranker): 0, 1, 2, ...

    @property
    def label(self) -> str:
        """The process's name: "ranker" for the first of a service, "ranker-1", "ranker-2", ... for the others."""
        return self.name if self.instance == 0 else f"{self.name}-{self.instance}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        prefix = f"A2V_{self.name.upper()}_"
        env = {k: v for k, v in base.items() if not k.startswith(prefix)} | OFFLINE_ENV
        settings = {
            "HOST": self.host,
            "GRPC_PORT": str(self.grpc_port),
            "METRICS_PORT": str(self.metrics_port),
            **self.env,
        }
        env.update({prefix + k: v for k, v in settings.items()})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH", "")]))
        return env


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (bound together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ports_in_use(host: str, ports: list[int]) -> list[int]:
    """The ports something already listens on: a service started there would fail to bind while
    the health check, answered by whoever holds the port, said SERVING."""
    busy = []
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


def bundle_encoder_dir(bundle: Path) -> Path | None:
    """The encoder directory a bundle's manifest names (bundles built on a pre-trained encoder), so
    the encoder service encodes new text the way the model was trained; None for the stock MiniLM."""
    try:
        model_dir = json.loads((bundle / "manifest.json").read_text())["encoder"].get("model_dir")
    except (OSError, ValueError, KeyError):
        return None
    if not model_dir:
        return None
    path = Path(model_dir)
    return path if path.is_absolute() else REPO_ROOT / path


def ranker_labels(processes: int) -> list[str]:
    """The names of `processes` ranker processes: "ranker", "ranker-1", "ranker-2", ..."""
    return ["ranker"] + [f"ranker-{i}" for i in range(1, processes)]


def ranker_data_dirs(first: Path, processes: int) -> list[Path]:
    """Each ranker process's data dir: `first`, then `<first>-1`, `<first>-2`, ... beside it."""
    return [first] + [first.with_name(f"{first.name}-{i}") for i in range(1, processes)]


def standard_specs(
    host: str,
    ports: Mapping[str, tuple[int, int]],
    *,
    encoder_model: str,
    model_store: Path,
    bundle: str,
    ranker_data_dir: Path,
    gateway_env: Mapping[str, str],
    encoder_model_dir: Path | None = None,
    follow_alias: bool = False,
    next_model_file: Path | None = None,
) -> list[ServiceSpec]:
    """The services wired to each other. ports: name → (gRPC, metrics); "ranker-1", "ranker-2", ...
    (ranker_labels) add ranker processes to the first: each with its own data dir (ranker_data_dirs),
    all sharing the first one's SQLite stores of record and following its collection alias, and the
    gateway calling them in turn. encoder_model_dir: the encoder the bundle was trained with when it
    is not the stock MiniLM (a pre-trained one). follow_alias: the rankers start on `bundle` and then
    follow the collection alias (make run, whose quality gate promotes the full bundle); else they
    serve exactly `bundle`."""
    encoder_address = f"{host}:{ports['encoder'][0]}"
    encoder_env = {"MODEL": encoder_model, **({"MODEL_DIR": str(encoder_model_dir)} if encoder_model_dir else {})}
    processes = 1
    while f"ranker-{processes}" in ports:
        processes += 1
    rankers = []
    for i, (label, data_dir) in enumerate(zip(ranker_labels(processes), ranker_data_dirs(ranker_data_dir, processes))):
        env = {
            "MODEL_STORE": str(model_store),
            "BUNDLE": bundle,
            "DATA_DIR": str(data_dir),
            "ENCODER_ADDRESS": encoder_address,
            "ALIAS_POLL_S": "2" if follow_alias else "0",
            **({"NEXT_MODEL_FILE": str(next_model_file)} if next_model_file else {}),
        }
        if i > 0:  # the first one's stores of record and alias: what replicas share through PostgreSQL and Qdrant
            env |= {"STORE_DIR": str(ranker_data_dir), "ALIAS_DATA_DIR": str(ranker_data_dir)}
        rankers.append(
            ServiceSpec(
                "ranker", "services.ranker.server", "anime2vec.v1.RankerService", host, *ports[label], env, instance=i
            )
        )
    return [
        ServiceSpec(
            "encoder",
            "services.encoder.server",
            "anime2vec.v1.EncoderService",
            host,
            *ports["encoder"],
            env=encoder_env,
        ),
        *rankers,
        ServiceSpec(
            "gateway",
            "services.gateway.server",
            "anime2vec.v1.GatewayService",
            host,
            *ports["gateway"],
            env={
                # several: a list the gateway calls in turn (round robin; services/gateway/downstream.py)
                "RANKER_ADDRESS": ",".join(r.address for r in rankers),
                "ENCODER_ADDRESS": encoder_address,
                **gateway_env,
            },
        ),
    ]


class ServiceProcess:
    """One service as a child process, its stdout and stderr (JSON log lines) appended to log_path."""

    def __init__(self, spec: ServiceSpec, log_path: Path, base_env: Mapping[str, str] | None = None):
        self.spec, self.log_path = spec, log_path
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None and self.alive():
            raise RuntimeError(f"{self.spec.label} is already running (pid {self.proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own session: a terminal's Ctrl-C reaches only the parent, which stops the services
            # one by one, instead of all of them at once racing the parent's orderly SIGTERMs.
            spawn(
                [sys.executable, "-m", self.spec.module],
                lambda proc: setattr(self, "proc", proc),
                cwd=REPO_ROOT,
                env=self.spec.environment(self.base_env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM to its process group without waiting: several processes then drain at once (stop() waits)."""
        if self.alive():
            assert self.proc is not None
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_serving(self, timeout_s: float) -> None:
        """Block until the health check reports the service SERVING; RuntimeError (with the log's
        tail) when the process exits first or the time runs out."""
        deadline = time.monotonic() + timeout_s
        with open_channel(self.spec.address, self.spec.tls) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=self.spec.health_service)
            while True:
                if not self.alive():
                    code = None if self.proc is None else self.proc.returncode
                    raise RuntimeError(
                        f"{self.spec.label} exited with status {code} before serving; last log lines:\n{self.log_tail()}"
                    )
                try:
                    if health.Check(request, timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass  # not listening yet, or the service is not registered yet
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.spec.label} not SERVING after {timeout_s:.0f} s; last log lines:\n{self.log_tail()}"
                    )
                time.sleep(0.25)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful shutdown) to its process group, then SIGKILL if it has not exited in
        timeout_s; whatever it started goes too."""
        if self.proc is None:
            return None
        return stop_group(self.proc, timeout_s)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


# ---- make run ----------------------------------------------------------------------------------

DEFAULT_MAX_RANKER_PROCESSES = 4  # the default's cap: past it, each process's copy of the model costs more than it adds
MAX_RANKER_PROCESSES = 16


def default_ranker_processes() -> int:
    """One ranker process per CPU core this process may run on, at most DEFAULT_MAX_RANKER_PROCESSES."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cores = os.cpu_count() or 1
    return max(1, min(cores, DEFAULT_MAX_RANKER_PROCESSES))


def _process_count(value: str) -> int:
    """--ranker-processes / A2V_RANKER_PROCESSES: a whole number in 1..MAX_RANKER_PROCESSES."""
    try:
        n = int(value.strip())
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_RANKER_PROCESSES:
        raise argparse.ArgumentTypeError(
            f"the number of ranker processes must be a whole number from 1 to {MAX_RANKER_PROCESSES}, got {value!r}"
        )
    return n


def ranker_processes_from_env(env: Mapping[str, str]) -> int:
    """A2V_RANKER_PROCESSES when set (ArgumentTypeError naming it when bad), else the default."""
    value = env.get("A2V_RANKER_PROCESSES", "")
    if not value.strip():
        return default_ranker_processes()
    try:
        return _process_count(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"A2V_RANKER_PROCESSES: {e}") from None


def ensure_bundle(store: Path, sample: bool, report_dir: Path) -> tuple[Path, bool]:
    """(bundle to serve, whether the full bundle still has to be trained). The newest full
    bundle for the data; else the newest quick one; else a quick one trained now (minutes: no
    MiniLM encodings), its evaluation report in report_dir, not over the repository's reports/."""
    source = "sample" if sample else "full"
    found = newest_bundle(store, source, preset="full")
    if found is not None:
        return found, False
    found = newest_bundle(store, source, preset="quick")
    if found is not None:
        return found, True
    print(
        f"No {source}-data bundle in {store}: training one, the quick bundle first (TF-IDF and metadata, no "
        f"MiniLM encodings: a few minutes). The full bundle trains in the background once it serves.",
        flush=True,
    )
    # Only what serving needs (the hybrid, its EASE, WMF as the fallback) and the popularity floor:
    # the full comparison (DropoutNets included) is `make train`'s job
    cmd = [
        sys.executable,
        "-m",
        "anime2vec.cli",
        "train",
        "--quick",
        "--store",
        str(store),
        "--report-dir",
        str(report_dir / "quick"),
        "--quiet",
    ]
    cmd += ["--sample"] if sample else []
    # A child in its own group: Ctrl-C / SIGTERM to the runner stops it and its workers
    rc = run_to_completion(cmd, cwd=REPO_ROOT, env=os.environ | OFFLINE_ENV, stdin=subprocess.DEVNULL)
    found = newest_bundle(store, source, preset="quick") if rc == 0 else None
    if found is None:
        raise SystemExit(f"training failed (exit status {rc}); see the output above")
    return found, True


def make_live(store: Path, ranker_data_dir: Path, version: str) -> None:
    """Point the ranker's collection alias at `version` (building its collection when missing),
    as `anime2vec index` + `promote` do, so that the ranker, which follows the alias, starts on
    it and later moves with the quality gate's promotions."""
    from .rollout import open_rollout

    rollout = open_rollout(store, ranker_data_dir)
    try:
        if rollout.index.alias_target() == version:
            return
        built, n = rollout.build(version)
        if built:
            print(f"built the collection of {version} ({n} anime)", flush=True)
        rollout.promote(version)
    finally:
        rollout.close()


# The local key may do everything the client can (add-anime needs catalog): it is this machine's.
LOCAL_KEY_SCOPES = "read+feedback+catalog"


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (mode 0600 from the start, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def api_key_env(key_file: Path) -> tuple[dict[str, str], str | None]:
    """(gateway env, key to print). Keys already configured are used as they are (and not printed).
    Otherwise a local key is generated once into key_file (mode 0600, the bare token: what
    clients send, `$(cat var/run/api-key)`) and reused afterwards; the gateway reads it with every
    scope from gateway_keys_file(key_file) (`<token>:read+feedback+catalog`), rewritten each run."""
    if os.environ.get("A2V_GATEWAY_API_KEYS") or os.environ.get("A2V_GATEWAY_API_KEYS_FILE"):
        return {}, None
    if not key_file.is_file():
        _write_private(key_file, secrets.token_hex(20) + "\n")
    token = key_file.read_text().strip().partition(":")[0]  # a token, also from a file that added scopes
    scoped = gateway_keys_file(key_file)
    _write_private(
        scoped,
        f"# make run's local key, every scope; clients send only the token ({key_file.name})\n"
        f"{token}:{LOCAL_KEY_SCOPES}\n",
    )
    return {"API_KEYS_FILE": str(scoped)}, token


def gateway_keys_file(key_file: Path) -> Path:
    return key_file.with_name("gateway-api-keys")


def usage(procs: dict[str, ServiceProcess], key: str | None, key_file: Path, logs: Path) -> str:
    gw = procs["gateway"].spec

    def line(name: str, role: str) -> str:
        p = procs[name]
        assert p.proc is not None  # printed once every service has started
        return (
            f"  {name:8s} {p.spec.address}  ({role}metrics http://{p.spec.host}:{p.spec.metrics_port}/metrics, "
            f"pid {p.proc.pid})"
        )

    rankers = "\n".join(line(name, "") for name in procs if procs[name].spec.name == "ranker")

    key_line = (
        f"  export A2V_API_KEY=$(cat {_shown(key_file)})   # this machine's key, generated once "
        f"(read, feedback, catalog)"
        if key
        else "  export A2V_API_KEY=<one of the keys in A2V_GATEWAY_API_KEYS(_FILE), without its :scopes>"
    )
    client = f"{_shown(Path(sys.executable))} -m anime2vec.client"
    return f"""
anime2vec is running (Ctrl-C stops it):
{line("gateway", "public API, ")}
{rankers}
{line("encoder", "")}
  logs     {_shown(logs)}/

Try it (in another terminal, in {REPO_ROOT}):
{key_line}
  export A2V_GATEWAY_ADDRESS={gw.address}
  {client} recommend "Naruto" "Bleach" "Fullmetal Alchemist" --explain
  {client} similar "Cowboy Bebop"
  {client} search-text "two brothers search for a stone that restores bodies"
  {client} info
  {client} call Recommend '{{"favourites": [{{"title": "Naruto"}}], "options": {{"limit": 5}}}}'
"""


def _shown(path: Path) -> str:
    """A path as a command pasted in the repository should name it: relative when inside it."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m anime2vec.runlocal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sample", action="store_true", help="serve a bundle trained on the small sample data")
    ap.add_argument(
        "--store",
        type=Path,
        default=None,
        help="model store (default: $A2V_MODEL_STORE or models/, models/sample with --sample)",
    )
    ap.add_argument(
        "--state-dir",
        type=Path,
        default=REPO_ROOT / "var" / "run",
        help="logs, the local API key and the ranker's data (embedded Qdrant, added anime)",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument(
        "--base-port",
        type=int,
        default=50050,
        help="gRPC ports: gateway on this one, encoder on the next, then one per ranker process (default 50050: "
        "rankers on 50052, 50053, ...)",
    )
    ap.add_argument(
        "--metrics-base-port",
        type=int,
        default=9100,
        help="metrics ports: gateway, encoder, then the ranker processes, from this one on (default 9100)",
    )
    ap.add_argument(
        "--ranker-processes",
        type=_process_count,
        default=None,
        metavar="N",
        help=f"ranker processes, 1 to {MAX_RANKER_PROCESSES} (default: $A2V_RANKER_PROCESSES, else one per CPU core "
        f"available to this process, at most {DEFAULT_MAX_RANKER_PROCESSES}: {default_ranker_processes()} here)",
    )
    ap.add_argument("--encoder-model", default="minilm", choices=["minilm", "tiny-random"])
    ap.add_argument(
        "--no-full", action="store_true", help="serving a quick bundle, do not train the full one in the background"
    )
    ap.add_argument(
        "--gate-tolerance",
        type=float,
        default=0.02,
        help="the quality gate's relative tolerance for the full bundle (as `anime2vec retrain "
        "--tolerance`; default 0.02)",
    )
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds each service may take to serve")
    a = ap.parse_args(argv)
    if not 0.0 <= a.gate_tolerance < 1.0:
        ap.error(f"--gate-tolerance must be in [0, 1), got {a.gate_tolerance}")
    if a.ranker_processes is None:
        try:
            a.ranker_processes = ranker_processes_from_env(os.environ)
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))
    g, m, n = a.base_port, a.metrics_base_port, a.ranker_processes
    if min(g, m) < 1 or max(g, m) + 1 + n > 65535:
        ap.error(f"--base-port and --metrics-base-port need {2 + n} ports each within 1..65535, got {g} and {m}")

    raise_on_signals()  # from the start: training and set-up stop on Ctrl-C / SIGTERM too
    procs: dict[str, ServiceProcess] = {}
    nxt: NextBundle | None = None
    status, serving = 0, False
    try:
        mode = "sample" if a.sample else "full"
        # checked first: training can take minutes. gateway g, encoder g + 1, rankers g + 2, g + 3, ...; metrics alike
        if busy := ports_in_use(a.host, [*range(g, g + 2 + n), *range(m, m + 2 + n)]):
            raise RuntimeError(
                f"port(s) {', '.join(map(str, busy))} on {a.host} are in use (another `make run`?): "
                f"stop it, or pass RUN_ARGS='--base-port N --metrics-base-port M'"
            )
        store = a.store or (default_model_store() / "sample" if a.sample else default_model_store())
        bundle, train_full = ensure_bundle(store, a.sample, a.state_dir / mode / "report")
        train_full = train_full and not a.no_full
        ranker_dir = a.state_dir / mode / "ranker"
        make_live(store, ranker_dir, bundle.name)
        gateway_env, key = api_key_env(a.state_dir / "api-key")
        logs = a.state_dir / "logs"
        next_file = a.state_dir / mode / "next-model.json"
        next_file.unlink(missing_ok=True)
        rankers = ranker_labels(n)
        specs = standard_specs(
            a.host,
            {"gateway": (g, m), "encoder": (g + 1, m + 1)}
            | {label: (g + 2 + i, m + 2 + i) for i, label in enumerate(rankers)},
            encoder_model=a.encoder_model,
            model_store=store,
            bundle=bundle.name,
            ranker_data_dir=ranker_dir,
            gateway_env=gateway_env,
            encoder_model_dir=bundle_encoder_dir(bundle),
            follow_alias=True,
            next_model_file=next_file,
        )
        procs = {s.label: ServiceProcess(s, logs / f"{s.label}.log") for s in specs}
        print(
            f"serving bundle {bundle.name} from {store}"
            + (" (quick: TF-IDF and metadata content)" if train_full else "")
            + (f" with {n} ranker processes" if n > 1 else ""),
            flush=True,
        )
        for name in ("encoder", *rankers):  # they load models: start them together
            procs[name].start()
        for name in ("encoder", *rankers):
            procs[name].wait_serving(a.startup_timeout)
        procs["gateway"].start()
        procs["gateway"].wait_serving(a.startup_timeout)
        serving = True
        print(usage(procs, key, a.state_dir / "api-key", logs), flush=True)
        if train_full:
            nxt = NextBundle(
                store=store,
                sample=a.sample,
                report_dir=a.state_dir / mode / "report",
                ranker_data_dir=ranker_dir,
                status_file=next_file,
                log_path=logs / "next-bundle.log",
                env=os.environ | OFFLINE_ENV,
                gate_tolerance=a.gate_tolerance,
            )
            nxt.start()
        while not (dead := [p for p in procs.values() if not p.alive()]):
            if nxt is not None:
                nxt.poll()
            time.sleep(0.5)
        assert dead[0].proc is not None  # every service was started above: this one exited
        print(
            f"{dead[0].spec.label} exited with status {dead[0].proc.returncode}; stopping the others. "
            f"Last log lines:\n{dead[0].log_tail()}",
            file=sys.stderr,
        )
        status = 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        # a requested stop is how a server ends; before it served, the run did not do its job
        status = 0 if serving else 128 + (received_signal() or 2)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    finally:
        with stopping():  # a second Ctrl-C hurries the stop (SIGKILL) instead of cutting it short
            if nxt is not None and nxt.stage in ("train", "gate"):
                rc = nxt.stop()
                print(
                    f"stopped the full bundle's {nxt.stage} (exit status {rc}); the next `make run` starts it again",
                    flush=True,
                )
            rankers = [name for name in procs if procs[name].spec.name == "ranker"]
            for group in (["gateway"], rankers, ["encoder"]):
                for name in group:  # the ranker processes finish their in-flight requests at once
                    if name in procs:
                        procs[name].terminate()
                for name in group:
                    rc = procs[name].stop() if name in procs else None
                    if rc is not None:
                        print(f"stopped {name} (exit status {rc})", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
