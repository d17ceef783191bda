"""`python -m bench [--quick] [--only search|encoder] [--out DIR]`: run the benchmarks, write
reports/bench/{bench.json,bench.md,*.png} and print the markdown table."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from anime2vec.paths import REPO_ROOT
from bench.report import markdown, write_report


def machine() -> dict:
    """Where the numbers were taken: ratios travel between machines, absolute timings do not."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    return {"summary": cuda or f"cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": cuda,
            "python": platform.python_version(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer queries and encoder rounds")
    parser.add_argument("--only", choices=("search", "encoder"), help="run one benchmark")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "bench")
    args = parser.parse_args(argv)
    result: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick}
    if args.only in (None, "search"):
        from bench.search import run_search_bench
        result["search"] = run_search_bench(n_queries=50 if args.quick else 200)
    if args.only in (None, "encoder"):
        from bench.encoder import run_encoder_bench
        result["encoder"] = run_encoder_bench(rounds=1 if args.quick else 3)
    write_report(result, args.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
