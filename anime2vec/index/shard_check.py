"""Is an embedded Qdrant shard on disk sound? Asked in a child process, because the answer for a
damaged one may be a crash.

Damaged segment files (truncated, zeroed, overwritten) make qdrant-edge 0.9 raise, panic (a Rust
panic arrives as pyo3's PanicException, which is not an `Exception`), hang, or open "fine" with
points missing (a truncated id tracker: 401 of 801 points, no error), all measured by
truncating, zeroing and overwriting each file of a shard in turn. A garbage length field can also
make the engine ask for terabytes, and an allocation failure aborts the process. So the ranker
asks a child: `check_shard(dir)` runs `python -m anime2vec.index.shard_check <dir>`, which opens
the shard, counts its points exactly, runs an exact, a quantised and a filtered search and reads
a few points back, then closes it. Costs one extra load of the shard per start-up (well under a
second for the full catalogue).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CHECK_TIMEOUT_S = 60.0  # a sound shard opens in seconds even on a busy machine (the full catalogue: < 1 s)
IN_USE = "WouldBlock"  # the engine's message when another process holds the shard's lock


@dataclass(frozen=True)
class ShardHealth:
    problem: str | None = None  # why the shard cannot be served from; None: sound
    in_use: bool = False  # another process holds it: unknown, and not ours to touch

    @property
    def sound(self) -> bool:
        return self.problem is None and not self.in_use


def check_shard(shard_dir: Path, dim: int, min_points: int = 0, timeout_s: float = CHECK_TIMEOUT_S) -> ShardHealth:
    """Open and read `shard_dir` in a child process (see the module docstring)."""
    cmd = [sys.executable, "-m", "anime2vec.index.shard_check", str(shard_dir), str(dim), str(min_points)]
    root = str(Path(__file__).resolve().parents[2])  # where `services` is importable from
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ShardHealth(f"opening and reading it did not finish in {timeout_s:.0f} s")
    if run.returncode < 0:
        return ShardHealth(f"the engine crashed reading it ({signal.Signals(-run.returncode).name})")
    try:
        verdict = json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return ShardHealth(f"the check exited with status {run.returncode}: {tail[:300]}")
    return ShardHealth(verdict.get("problem"), bool(verdict.get("in_use")))


def _probe(shard_dir: str, dim: int, min_points: int) -> dict:
    import qdrant_edge as qe

    try:
        shard = qe.EdgeShard.load(shard_dir)
    except BaseException as e:  # noqa: B902 - a Rust panic is a BaseException
        if IN_USE in str(e):
            return {"in_use": True, "problem": None}
        return {"problem": f"it does not open: {type(e).__name__}: {str(e)[:300]}"}
    try:
        n = shard.count(qe.CountRequest(exact=True))
        if n < min_points:
            return {"problem": f"it holds {n} points, {min_points} were written"}
        probe = [1.0 / dim**0.5] * dim
        found = []
        for params in (
            qe.SearchParams(exact=True),
            qe.SearchParams(exact=False, quantization=qe.QuantizationSearchParams(rescore=True, oversampling=2.0)),
        ):
            found += shard.query(
                qe.QueryRequest(limit=10, offset=0, query=qe.Query.Nearest(probe), params=params, with_payload=True)
            )
        shard.query(
            qe.QueryRequest(
                limit=10,
                offset=0,
                query=qe.Query.Nearest(probe),
                with_payload=True,
                filter=qe.Filter(must_not=[qe.HasIdCondition({0})]),
            )
        )
        if n and not found:
            return {"problem": f"it counts {n} points but a search finds none"}
        shard.retrieve(sorted({int(p.id) for p in found}), True, True)
        return {"problem": None}
    except BaseException as e:  # noqa: B902
        return {"problem": f"reading it fails: {type(e).__name__}: {str(e)[:300]}"}
    finally:
        try:
            shard.close()
        except BaseException:  # noqa: B902 - the verdict is already decided
            pass


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))), flush=True)
