"""`make run`'s second stage: while the quick bundle serves, train the full bundle in the
background, then let the operators' quality gate decide whether it replaces the quick one.

    train   `anime2vec train` (MiniLM encodings: ~20 min on a fresh 2-core machine, cached after)
    gate    `anime2vec retrain --candidate <version>`: the same gate and promotion a nightly
            retrain goes through (anime2vec/retrain/); promoted, it moves the collection alias
            and the ranker follows it within A2V_RANKER_ALIAS_POLL_S

Progress: one line per stage on the runner's stdout, the children's whole output in a log file,
and a status file the ranker reports as GetModelInfo.next_model (settings.next_model_file). The
trainer is polled from the runner's loop (no thread), and stopped with the runner.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .bundle import newest_bundle
from .paths import REPO_ROOT
from .process_groups import spawn, stop_group

# Seconds each remaining step takes on the full data on 2 shared cores (measured, manifests of
# 2026-12): what the ETA adds up for steps not started yet. The encode's own progress bar gives
# its remaining time; cached encodings take seconds.
FULL_STEP_SECONDS = {
    "load data": 5,
    "build splits": 2,
    "tf-idf": 10,
    "encode (cached) + whiten": 1000,
    "recommendation graph": 1,
    "fit wmf": 45,
    "fit ease": 100,
    "fit popularity": 1,
    "fit and tune anime2vec-hybrid": 600,
    "evaluate": 180,
    "export": 30,
    "trade-off": 60,
    "gate": 120,
}
# The gate's metrics for quick → full: what no calibration choice moves (favourites among known
# anime, cold anime among cold anime) and the users' recent feedback. Warm and cold_whole rank in
# the whole catalogue, where the group offsets draw the line between warm and cold anime; the
# quick tuning (a weaker content model) draws it elsewhere than the full one, so those two
# would compare calibrations, not quality.
GATE_METRICS = ("fav_k5/recall@100", "cold_test_items/recall@100", "recent/recall@100")
STEP = re.compile(r"▶ (.+)$")
# tqdm: "encode:  41%|████      | 6712/16371 [06:12<08:55, 18.0it/s]"
BAR = re.compile(
    r"(?:(?P<desc>[\w ()+-]+): +)?(?P<pct>\d+)%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+) "
    r"\[(?P<spent>[\d:]+)<(?P<left>[\d:?]+)"
)


def _seconds(clock: str) -> float | None:
    try:
        parts = [int(x) for x in clock.split(":")]
    except ValueError:
        return None
    s = 0
    for p in parts:
        s = s * 60 + p
    return float(s)


def _step_key(step: str) -> str:
    """A pipeline step's key in FULL_STEP_SECONDS ("fit ease {'lam': 300.0}" → "fit ease")."""
    return step.split(" {")[0]


@dataclass
class Progress:
    """What the training log says so far: the current step, its progress bar, the steps seen."""

    step: str = "starting"
    bar: str = ""
    bar_left_s: float | None = None
    seen: tuple[str, ...] = ()
    step_started: float = 0.0

    def feed(self, text: str, now: float | None = None) -> list[str]:
        """Read more log text; returns the steps that started in it."""
        started = []
        for piece in re.split(r"[\r\n]+", text):
            if m := STEP.search(piece):
                self.step, self.bar, self.bar_left_s = m.group(1).strip(), "", None
                self.step_started = time.monotonic() if now is None else now
                self.seen += (_step_key(self.step),)
                started.append(self.step)
            elif m := BAR.search(piece):
                self.bar = f"{m['pct']}% ({m['n']}/{m['total']})"
                self.bar_left_s = _seconds(m["left"])
        return started

    def eta_s(self, sample: bool, now: float | None = None) -> float | None:
        """Seconds left (full data only; the sample trains in a couple of minutes): the current
        step's (its progress bar's estimate, else its usual time less what it has taken) plus
        every step not started yet."""
        if sample:
            return None
        now = time.monotonic() if now is None else now
        current = _step_key(self.step)
        if self.bar_left_s is not None:
            here = self.bar_left_s
        else:
            here = max(0.0, FULL_STEP_SECONDS.get(current, 0) - (now - self.step_started))
        ahead = [k for k in FULL_STEP_SECONDS if k not in self.seen]
        return here + sum(FULL_STEP_SECONDS[k] for k in ahead)


def _minutes(s: float) -> str:
    return f"about {max(1, round(s / 60))} min left"


class NextBundle:
    """Train the full bundle, then gate it against what serves; poll() advances and reports."""

    def __init__(
        self,
        *,
        store: Path,
        sample: bool,
        report_dir: Path,
        ranker_data_dir: Path,
        status_file: Path,
        log_path: Path,
        env: dict[str, str],
        gate_queries: int = 1000,
        gate_tolerance: float = 0.02,
    ):
        self.store, self.sample, self.report_dir = store, sample, report_dir
        self.ranker_data_dir, self.status_file, self.log_path = ranker_data_dir, status_file, log_path
        self.env, self.gate_queries, self.gate_tolerance = env, gate_queries, gate_tolerance
        self.proc: subprocess.Popen | None = None
        self.stage = "idle"  # idle → train → gate → done
        self.outcome: str | None = None
        self.progress = Progress()
        self._read = 0
        self._started = 0.0
        self._last_status = ""
        self._printed: set[str] = set()
        self._partial = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    # ---- steps -------------------------------------------------------------------------
    def start(self) -> None:
        self._started = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "anime2vec.cli",
            "train",
            "--store",
            str(self.store),
            "--report-dir",
            str(self.report_dir),
            "--models",
            "popularity,wmf,ease,anime2vec-hybrid",
        ]
        self._spawn("train", cmd + (["--sample"] if self.sample else []))
        self._say(
            "training the full bundle (MiniLM encodings) in the background; the quick bundle serves "
            f"meanwhile (log: {self.log_path})"
        )

    def _gate(self, version: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "anime2vec.cli",
            "retrain",
            "--candidate",
            version,
            "--store",
            str(self.store),
            "--ranker-data-dir",
            str(self.ranker_data_dir),
            "--events",
            str(self.ranker_data_dir / "feedback.sqlite"),
            "--gate-queries",
            str(self.gate_queries),
            "--gate-metrics",
            ",".join(GATE_METRICS),
            "--tolerance",
            str(self.gate_tolerance),
        ]
        self._spawn("gate", cmd + (["--sample"] if self.sample else []))
        self.progress = Progress(step="gate", seen=tuple(FULL_STEP_SECONDS), step_started=time.monotonic())
        self._say(f"full bundle {version} trained; the quality gate compares it with the serving bundle")

    def _spawn(self, stage: str, cmd: list[str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._read = log.tell()
            spawn(
                cmd,
                lambda proc: setattr(self, "proc", proc),
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.stage = stage

    # ---- polling -----------------------------------------------------------------------
    def poll(self) -> None:
        """Called every half second or so: read the log, write the status, move to the next stage."""
        if self.stage not in ("train", "gate") or self.proc is None:
            return
        for step in self.progress.feed(self._new_log_text()):
            key = _step_key(step)
            if self.stage == "train" and key not in self._printed:  # one line per stage, not per grid point
                self._printed.add(key)
                eta = self.progress.eta_s(self.sample)
                print(f"[full bundle] {key}" + (f" ({_minutes(eta)})" if eta is not None else ""), flush=True)
        rc = self.proc.poll()
        if rc is None:
            self._write_status(self._status_line())
            return
        if self.stage == "train":
            version = self._trained_version() if rc == 0 else None
            if version is None:
                return self._finish(
                    f"training the full bundle failed (exit status {rc}); the quick bundle keeps "
                    f"serving. See {self.log_path}"
                )
            return self._gate(version)
        self._finish(self._decision_line(rc))

    def _new_log_text(self) -> str:
        """The complete lines (or progress-bar updates) written since the last call: a read may end
        inside a line or a character, whose rest the next call gets."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._read)
                data = f.read(1 << 20)
        except OSError:
            return ""
        self._read += len(data)
        text = self._partial + self._decoder.decode(data)
        cut = max(text.rfind("\n"), text.rfind("\r")) + 1
        self._partial = text[cut:]
        return text[:cut]

    def _status_line(self) -> str:
        what = "training the full bundle" if self.stage == "train" else "gating the full bundle"
        line = f"{what}: {self.progress.step}" + (f", {self.progress.bar}" if self.progress.bar else "")
        eta = self.progress.eta_s(self.sample)
        return line + (f", {_minutes(eta)}" if eta is not None else "")

    def _trained_version(self) -> str | None:
        found = newest_bundle(self.store, "sample" if self.sample else "full", preset="full")
        return found.name if found is not None else None

    def _decision_line(self, rc: int) -> str:
        from .retrain import read_decisions

        decisions = read_decisions(self.store) if rc in (0, 1) else []
        if not decisions:
            return f"the quality gate could not run (exit status {rc}); the quick bundle keeps serving. See {self.log_path}"
        d = decisions[-1]
        reasons = "; ".join(d.get("reasons") or [])
        if d.get("decision") == "promoted":
            return (
                f"full bundle {d.get('candidate')} passed the quality gate and is promoted: the ranker serves it "
                f"within seconds (was {d.get('current')})"
            )
        return (
            f"the quality gate {d.get('decision')} full bundle {d.get('candidate')}: {reasons or 'see the log'}; "
            f"{d.get('current')} keeps serving (decision log {self.store / 'retrain-decisions.jsonl'})"
        )

    def _finish(self, line: str) -> None:
        self.stage, self.outcome, self.proc = "done", line, None
        self._say(line)
        self._write_status("")

    def _say(self, line: str) -> None:
        print(f"[full bundle] {line}", flush=True)

    def _write_status(self, status: str) -> None:
        if status == self._last_status:
            return
        self._last_status = status
        tmp = self.status_file.with_name(f".{self.status_file.name}.tmp")
        try:
            self.status_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(
                json.dumps(
                    {
                        "status": status,
                        "stage": self.stage,
                        "updated": time.time(),
                        "elapsed_s": round(time.monotonic() - self._started, 1),
                    }
                )
            )
            os.replace(tmp, self.status_file)  # atomic: the ranker never reads half a file
        except OSError:
            pass

    def stop(self) -> int | None:
        """Stop the running step and everything it started; the status file says nothing is training."""
        rc = stop_group(self.proc) if self.proc is not None else None
        self.proc = None
        self._write_status("")
        return rc
