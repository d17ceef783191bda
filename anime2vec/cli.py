"""Command line for the offline pipeline: `anime2vec train | evaluate | inspect-bundle`, and model
rollout: `anime2vec index | promote | rollback | versions` (see anime2vec/rollout.py).

Full data by default (`A2V_DATA_DIR` or ../shared/data/mal); `--sample` for the small subset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from .paths import REPO_ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="MAL data directory (default: $A2V_DATA_DIR or ../shared/data/mal)")
    p.add_argument("--sample", action="store_true", help="use <data-dir>/sample (small, for tests and demos)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, initialisation and sampling")
    p.add_argument("--recipe", default="default", help="text recipe name or comma list of fields (title,genres,synopsis,review,type)")
    p.add_argument("--encoder", default="minilm", choices=["minilm", "tiny-random"], help="text encoder (tiny-random: plumbing only)")
    p.add_argument("--models", default=None, help="comma list of models to fit (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="DropoutNet epochs (max; early stopping on validation)")
    p.add_argument("--test-queries", type=int, default=None, help="cap on test queries per scenario (default: all)")
    p.add_argument("--report-dir", type=Path, default=None, help="where to write report.md/json/png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(a: argparse.Namespace):
    from .pipeline import ALL_MODELS, TrainConfig

    cfg = TrainConfig(data_dir=a.data_dir, sample=a.sample, seed=a.seed, recipe=a.recipe, encoder=a.encoder,
                      test_queries=a.test_queries, progress=not a.quiet)
    if a.models:
        names = tuple(m.strip() for m in a.models.split(",") if m.strip())
        unknown = [m for m in names if m not in ALL_MODELS]
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(ALL_MODELS)}")
        cfg.models = names
    if getattr(a, "store", None):
        cfg.store = a.store
    if a.epochs is not None:
        cfg.dropoutnet.epochs = a.epochs
    if a.sample:   # 640 training items: smaller towers, shorter patience
        cfg.val_queries = 200
    return cfg


def _run(a: argparse.Namespace, write_bundle: bool) -> int:
    from .evaluation.report import write_report
    from .pipeline import SERVING_MODEL, evaluate, export_bundle, fit_models, prepare

    cfg = _config(a)
    if write_bundle:   # the served blend needs its DropoutNet
        cfg.models = tuple(dict.fromkeys((*cfg.models, "dropoutnet-minilm", SERVING_MODEL)))
    command = "anime2vec " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    p = prepare(cfg)
    models, selection = fit_models(p)
    results = evaluate(p, models, split="test")
    name = ("sample" if cfg.sample else "full") + f"-seed{cfg.seed}"
    out = a.report_dir or (REPO_ROOT / "reports" / name)
    paths = write_report(results, out, title=f"anime2vec offline evaluation ({name})", command=command,
                         dataset_description={**p.ds.describe(), "data_source": p.data.source,
                                              "data_fingerprint": p.data.fingerprint[:16],
                                              "recipe": cfg.recipe, "encoder": p.encoder.name})
    (Path(out) / "selection.json").write_text(json.dumps(selection, indent=2, default=str))
    print(f"report: {paths}")
    if write_bundle:
        path = export_bundle(p, models, selection, results)
        print(f"bundle: {path}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .bundle import BundleError, list_bundles, load_bundle
    from .paths import default_model_store

    path = a.bundle
    if path is None:
        found = list_bundles(a.store or default_model_store())
        if not found:
            print(f"no bundles in {a.store or default_model_store()}", file=sys.stderr)
            return 1
        path = found[-1]
    try:
        b = load_bundle(Path(path))
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = b.manifest
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"bundle   {b.path}\nversion  {m['version']}  (created {m.get('created_at')})\nmodel    {m.get('model')}")
    print(f"encoder  {m['encoder']['name']} {m['encoder']['fingerprint']} dim={m['encoder']['dim']} recipe={m['encoder']['recipe']}")
    print(f"dims     {m['dims']}")
    print(f"data     {m['data']['source']} {m['data']['fingerprint'][:16]}   code {m['code']['sha256'][:16]} {m['code'].get('git_commit', '')[:10]}")
    print(f"verified {len(m['files'])} files (sha256)")
    metrics = m.get("metrics") or {}
    if metrics:
        print("offline metrics (test split):")
        for scen, vals in metrics.items():
            print(f"  {scen:28s} " + "  ".join(f"{k}={v:.4f}" for k, v in vals.items()))
    return 0


def _rollout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None,
                   help="bundle store (default: $A2V_RANKER_MODEL_STORE, else $A2V_MODEL_STORE or models/)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data-dir", type=Path, default=None,
                       help="the ranker's data dir; embedded index under <dir>/qdrant (default: $A2V_RANKER_DATA_DIR or var/ranker)")
    where.add_argument("--qdrant-url", default=None,
                       help="Qdrant server (default: $QDRANT_URL unless --data-dir is given; API key from $QDRANT_API_KEY)")


def cmd_rollout(a: argparse.Namespace) -> int:
    """index / promote / rollback / versions. Exit 2: refused (RolloutError); 1: index unreachable."""
    from services.ranker.index import IndexUnavailable

    from .rollout import RolloutError, open_rollout

    env = os.environ
    url = None if a.data_dir else (a.qdrant_url or env.get("A2V_RANKER_QDRANT_URL") or env.get("QDRANT_URL") or None)
    try:
        r = open_rollout(a.store, a.data_dir, url,
                         env.get("A2V_RANKER_QDRANT_API_KEY") or env.get("QDRANT_API_KEY") or None)
    except IndexUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if a.cmd == "index":
            built, n = r.build(a.version)
            print(f"{a.version}: built collection with {n} items in {r.where}" if built
                  else f"{a.version}: collection already complete in {r.where}; left as is")
        elif a.cmd == "promote":
            old, new = r.promote(a.version)
            print(f"{old or '(none)'} → {new}" + ("  (already live)" if old == new else ""))
        elif a.cmd == "rollback":
            old, new = r.rollback()
            print(f"{old} → {new}")
        else:
            rows = r.versions()
            print(f"{'VERSION':40s} {'BUNDLE':6s} {'COLLECTION':10s} LIVE")
            for v in rows:
                print(f"{v.version:40s} {'yes' if v.bundle else '-':6s} {'yes' if v.collection else '-':10s} "
                      f"{'*' if v.live else ''}")
        return 0
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except IndexUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        r.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="anime2vec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="fit every model, evaluate on the test split, write a report and a bundle")
    _common(tr)
    tr.add_argument("--store", type=Path, default=None, help="model store (default: $A2V_MODEL_STORE or models/)")
    ev = sub.add_parser("evaluate", help="fit and compare every recommender on one split; write a report (no bundle)")
    _common(ev)
    ins = sub.add_parser("inspect-bundle", help="verify a bundle (checksums, dims) and print its manifest")
    ins.add_argument("bundle", nargs="?", type=Path, default=None, help="bundle directory (default: newest in the store)")
    ins.add_argument("--store", type=Path, default=None)
    ins.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    ix = sub.add_parser("index", help="build the Qdrant collection of a bundle version (the alias is not moved)")
    ix.add_argument("version")
    pr = sub.add_parser("promote", help="point the served alias at a built, verified version")
    pr.add_argument("version")
    rb = sub.add_parser("rollback", help="point the served alias back at the previous version")
    vs = sub.add_parser("versions", help="list bundles, which have collections, and which is live")
    for p in (ix, pr, rb, vs):
        _rollout_args(p)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if a.cmd == "inspect-bundle":
        return cmd_inspect(a)
    if a.cmd in ("index", "promote", "rollback", "versions"):
        return cmd_rollout(a)
    return _run(a, write_bundle=(a.cmd == "train"))


if __name__ == "__main__":
    sys.exit(main())
