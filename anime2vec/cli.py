"""Command line for the offline pipeline: `anime2vec train | evaluate | inspect-bundle`, encoder
pre-training: `anime2vec pretrain | encode` (anime2vec/features/pretrain.py), and model
rollout: `anime2vec index | promote | rollback | versions` (see anime2vec/rollout.py), and
retraining on feedback behind a quality gate: `anime2vec retrain` (see anime2vec/retrain/).

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
    p.add_argument(
        "--data-dir", type=Path, default=None, help="MAL data directory (default: $A2V_DATA_DIR or ../shared/data/mal)"
    )
    p.add_argument("--sample", action="store_true", help="use <data-dir>/sample (small, for tests and demos)")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, initialisation and sampling")
    p.add_argument(
        "--recipe",
        default="default",
        help="text recipe name or comma list of fields (title,genres,synopsis,review,type)",
    )
    p.add_argument(
        "--encoder",
        default="minilm",
        choices=["minilm", "tiny-random"],
        help="text encoder (tiny-random: plumbing only)",
    )
    p.add_argument("--models", default=None, help="comma list of models to fit (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="DropoutNet epochs (max; early stopping on validation)")
    p.add_argument("--test-queries", type=int, default=None, help="cap on test queries per scenario (default: all)")
    p.add_argument("--report-dir", type=Path, default=None, help="where to write report.md/json/png")
    p.add_argument(
        "--pretrained-encoder",
        default=None,
        help="directory of an in-domain pre-trained encoder (`anime2vec pretrain`; 'tiny-random' in tests): "
        "adds the dropoutnet-pretrained* variants",
    )
    p.add_argument(
        "--hybrid-tolerance",
        type=float,
        default=None,
        help="keep the served hybrid's own-scenario validation recall (warm / favourites) at >= (1 - this) "
        "of its warm-only blend's (a product floor; default: none, the group offsets are chosen to "
        "predict users' next interactions, warm and cold alike)",
    )
    p.add_argument(
        "--split",
        type=Path,
        default=None,
        help="JSON file with an external split: train/val/test item (anime) ids and user ids "
        "(keys train_items, val_items, test_items, train_users, val_users, test_users)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(a: argparse.Namespace):
    from .pipeline import ALL_MODELS, TrainConfig

    kw = dict(
        data_dir=a.data_dir,
        sample=a.sample,
        seed=a.seed,
        recipe=a.recipe,
        encoder=a.encoder,
        progress=not a.quiet,
        pretrained_encoder=a.pretrained_encoder,
        hybrid_tolerance=a.hybrid_tolerance,
    )
    if a.test_queries is not None or not getattr(a, "quick", False):
        kw["test_queries"] = a.test_queries
    cfg = TrainConfig.quick(**kw) if getattr(a, "quick", False) else TrainConfig(**kw)
    if getattr(a, "split", None) is not None:
        from .data.dataset import ExternalSplit

        try:
            cfg.split = ExternalSplit.from_json(a.split)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--split: {e}") from None
    if a.hybrid_tolerance is not None and not 0.0 <= a.hybrid_tolerance < 1.0:
        raise SystemExit("--hybrid-tolerance must be in [0, 1)")
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
    if a.sample:  # 640 training items: smaller towers, shorter patience
        cfg.val_queries = 200
    if not cfg.encoder_block and a.pretrained_encoder:
        raise SystemExit("--quick encodes nothing: it cannot use --pretrained-encoder")
    return cfg


def _run(a: argparse.Namespace, write_bundle: bool) -> int:
    from .evaluation.report import write_report
    from .pipeline import SERVING_MODEL, evaluate, export_bundle, fit_models, prepare, timed_step

    cfg = _config(a)
    if write_bundle:  # the bundle serves the hybrid, with WMF as the fallback when the index is down
        cfg.models = tuple(dict.fromkeys((*cfg.models, "wmf", SERVING_MODEL)))
    command = "anime2vec " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    p = prepare(cfg)
    models, selection = fit_models(p)
    with timed_step(p.timings, "evaluate"):
        results = evaluate(p, models, split="test")
    name = ("sample" if cfg.sample else "full") + ("" if cfg.encoder_block else "-quick") + f"-seed{cfg.seed}"
    out = a.report_dir or (REPO_ROOT / "reports" / name)
    paths = write_report(
        results,
        out,
        title=f"anime2vec offline evaluation ({name})",
        command=command,
        dataset_description={
            **p.ds.describe(),
            "data_source": p.data.source,
            "data_fingerprint": p.data.fingerprint[:16],
            "recipe": cfg.recipe,
            "encoder": p.encoder.name if cfg.encoder_block else "none (quick preset: TF-IDF + metadata)",
        },
    )
    (Path(out) / "selection.json").write_text(json.dumps(selection, indent=2, default=str))
    print(f"report: {paths}")
    if write_bundle:
        with timed_step(p.timings, "export"):
            path = export_bundle(p, models, selection, results)
        print(f"bundle: {path}")
    if (
        SERVING_MODEL in models and cfg.encoder_block
    ):  # the served model's MMR accuracy/diversity curve (same queries, test split)
        from .evaluation.protocol import scenarios
        from .evaluation.tradeoff import run_tradeoff

        scs = [
            s
            for s in scenarios(p.ds, "test", seed=cfg.seed, max_queries=cfg.test_queries)
            if s.name in ("warm", "fav_k5")
        ]
        logging.getLogger("anime2vec.pipeline").info("▶ trade-off")
        run_tradeoff(
            models[SERVING_MODEL],
            scs,
            content=p.semantic,
            out_dir=Path(out) / "tradeoff",
            popularity=p.ds.popularity,
            seed=cfg.seed,
            command=command,
        )
        print(f"trade-off curve: {Path(out) / 'tradeoff'}")
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
    print(
        f"encoder  {m['encoder']['name']} {m['encoder']['fingerprint']} dim={m['encoder']['dim']} recipe={m['encoder']['recipe']}"
    )
    print(f"dims     {m['dims']}")
    print(
        f"data     {m['data']['source']} {m['data']['fingerprint'][:16]}   code {m['code']['sha256'][:16]} {m['code'].get('git_commit', '')[:10]}"
    )
    print(f"verified {len(m['files'])} files (sha256)")
    metrics = m.get("metrics") or {}
    if metrics:
        print("offline metrics (test split):")
        for scen, vals in metrics.items():
            print(f"  {scen:28s} " + "  ".join(f"{k}={v:.4f}" for k, v in vals.items()))
    return 0


def _rollout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="bundle store (default: $A2V_RANKER_MODEL_STORE, else $A2V_MODEL_STORE or models/)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the ranker's data dir; embedded index under <dir>/qdrant (default: $A2V_RANKER_DATA_DIR or var/ranker)",
    )
    where.add_argument(
        "--qdrant-url",
        default=None,
        help="Qdrant server (default: $QDRANT_URL unless --data-dir is given; API key from $QDRANT_API_KEY)",
    )


def cmd_rollout(a: argparse.Namespace) -> int:
    """index / promote / rollback / versions. Exit 2: refused (RolloutError); 1: index unreachable."""
    from .index.base import IndexUnavailable
    from .rollout import RolloutError, open_rollout

    env = os.environ
    url = None if a.data_dir else (a.qdrant_url or env.get("A2V_RANKER_QDRANT_URL") or env.get("QDRANT_URL") or None)
    try:
        r = open_rollout(
            a.store, a.data_dir, url, env.get("A2V_RANKER_QDRANT_API_KEY") or env.get("QDRANT_API_KEY") or None
        )
    except IndexUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if a.cmd == "index":
            built, n = r.build(a.version)
            print(
                f"{a.version}: built collection with {n} items in {r.where}"
                if built
                else f"{a.version}: collection already complete in {r.where}; left as is"
            )
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
                print(
                    f"{v.version:40s} {'yes' if v.bundle else '-':6s} {'yes' if v.collection else '-':10s} "
                    f"{'*' if v.live else ''}"
                )
        return 0
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except IndexUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        r.close()


def _pretrain_parsers(sub) -> None:
    """`pretrain` (MLM on MAL text, anime2vec/features/pretrain.py) and `encode` (fill the encoding
    cache with an encoder's vectors of the pipeline's item texts)."""
    pt = sub.add_parser("pretrain", help="in-domain masked-language-model training of the MiniLM encoder")
    pt.add_argument(
        "--data-dir", type=Path, default=None, help="MAL data directory (default: $A2V_DATA_DIR or ../shared/data/mal)"
    )
    pt.add_argument("--sample", action="store_true", help="use <data-dir>/sample")
    pt.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output model directory (default: models/encoders/minilm-mal-mlm[-sample])",
    )
    pt.add_argument(
        "--base", type=Path, default=None, help="BERT model directory to start from (default: bundled all-MiniLM-L6-v2)"
    )
    pt.add_argument("--max-steps", type=int, default=100_000, help="optimiser steps, head phase included")
    pt.add_argument(
        "--max-minutes", type=float, default=25.0, help="wall-clock bound for the whole run (eval + save included)"
    )
    pt.add_argument("--batch-size", type=int, default=16)
    pt.add_argument("--max-length", type=int, default=128, help="tokens per training window")
    pt.add_argument("--lr", type=float, default=5e-5)
    pt.add_argument(
        "--head-steps", type=int, default=100, help="steps training only the fresh MLM head (encoder frozen)"
    )
    pt.add_argument("--head-lr", type=float, default=1e-3)
    pt.add_argument("--mlm-prob", type=float, default=0.15)
    pt.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pt.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 is often faster on a shared machine)",
    )
    pt.add_argument("--seed", type=int, default=0, help="seed for masking, data order and the head's initialisation")
    pt.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the item split (= the pipeline's --seed): reviews and rec pairs of training items only",
    )
    pt.add_argument(
        "--item-text",
        default="all",
        choices=["all", "train"],
        help="item texts of every item (content known at cold start) or training items only",
    )
    pt.add_argument("--eval-frac", type=float, default=0.05, help="fraction of texts held out for the MLM eval loss")
    pt.add_argument("--eval-max-seqs", type=int, default=256)
    pt.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N full-model steps (0: before/after only)"
    )
    pt.add_argument("--log-every", type=int, default=10)
    pt.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    enc = sub.add_parser("encode", help="encode the pipeline's item texts with an encoder into the encoding cache")
    enc.add_argument(
        "--encoder", default="minilm", help="a model directory (e.g. models/encoders/minilm-mal-mlm) or 'minilm'"
    )
    enc.add_argument("--data-dir", type=Path, default=None)
    enc.add_argument("--sample", action="store_true")
    enc.add_argument("--recipe", default="default")
    enc.add_argument("--max-length", type=int, default=256, help="truncation (the pipeline's TextEncoder default: 256)")
    enc.add_argument("--batch-size", type=int, default=32)
    enc.add_argument("--device", default=None, choices=["cpu", "cuda"])
    enc.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    enc.add_argument("--cache", type=Path, default=None, help="cache file (default: $A2V_CACHE_DIR/encodings.sqlite)")
    enc.add_argument("--quiet", action="store_true")


def cmd_pretrain(a: argparse.Namespace) -> int:
    from .data.loader import load_mal
    from .features.pretrain import PretrainConfig, build_corpus, pretrain

    out = a.out or REPO_ROOT / "models" / "encoders" / ("minilm-mal-mlm-sample" if a.sample else "minilm-mal-mlm")
    cfg = PretrainConfig(
        out=out,
        base=a.base,
        max_steps=a.max_steps,
        max_minutes=a.max_minutes,
        batch_size=a.batch_size,
        max_length=a.max_length,
        lr=a.lr,
        head_steps=a.head_steps,
        head_lr=a.head_lr,
        mlm_prob=a.mlm_prob,
        device=a.device,
        threads=a.threads,
        seed=a.seed,
        eval_frac=a.eval_frac,
        eval_max_seqs=a.eval_max_seqs,
        eval_every=a.eval_every,
        log_every=a.log_every,
        overwrite=a.overwrite,
    )
    if out.exists() and not a.overwrite:  # before loading anything
        print(f"error: {out} exists (use --overwrite)", file=sys.stderr)
        return 2
    corpus = build_corpus(load_mal(a.data_dir, sample=a.sample), split_seed=a.split_seed, item_text=a.item_text)
    r = pretrain(corpus, cfg)
    print(
        json.dumps(
            {
                k: r[k]
                for k in (
                    "name",
                    "device",
                    "steps",
                    "stopped_by",
                    "minutes_with_save",
                    "eval_loss_random_head",
                    "eval_loss_before",
                    "eval_loss_after",
                )
            }
        )
    )
    print(f"encoder: {out}")
    return 0


def cmd_encode(a: argparse.Namespace) -> int:
    from .data.loader import load_mal
    from .features.encoder import TextEncoder
    from .features.pretrain import encode_catalogue

    if a.threads > 0:
        import torch

        torch.set_num_threads(a.threads)
    model_dir = None if a.encoder == "minilm" else Path(a.encoder)
    try:
        encoder = TextEncoder(model_dir, device=a.device, max_length=a.max_length, batch_size=a.batch_size)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"encoder: {encoder}", file=sys.stderr)
    r = encode_catalogue(
        encoder, load_mal(a.data_dir, sample=a.sample), recipe=a.recipe, cache_path=a.cache, progress=not a.quiet
    )
    print(json.dumps(r))
    return 0


def _retrain_parser(sub) -> None:
    """`retrain`: base data + feedback events → candidate bundle → quality gate → promote or keep
    (anime2vec/retrain/)."""
    from .retrain import DEFAULT_GATE_METRICS

    rt = sub.add_parser(
        "retrain", help="train a candidate on base data + feedback events; promote it only if the quality gate passes"
    )
    _common(rt)
    rt.add_argument(
        "--events-dsn",
        default=None,
        help="the rankers' PostgreSQL store of record, read in one consistent snapshot "
        "(default: $A2V_RANKER_STORE_DSN, as the rankers; libpq's PG* variables apply)",
    )
    rt.add_argument(
        "--events",
        type=Path,
        action="append",
        default=None,
        help="without a DSN: the ranker's SQLite feedback store, read-only "
        "(default: $A2V_RANKER_DATA_DIR/feedback.sqlite)",
    )
    rt.add_argument(
        "--store",
        type=Path,
        default=None,
        help="bundle store (default: $A2V_RANKER_MODEL_STORE, else $A2V_MODEL_STORE or models/); "
        "decisions are appended to <store>/retrain-decisions.jsonl",
    )
    where = rt.add_mutually_exclusive_group()
    where.add_argument(
        "--ranker-data-dir",
        type=Path,
        default=None,
        help="the ranker's data dir; embedded index under <dir>/qdrant (default: $A2V_RANKER_DATA_DIR or var/ranker)",
    )
    where.add_argument(
        "--qdrant-url",
        default=None,
        help="Qdrant server (default: $QDRANT_URL unless --ranker-data-dir is given; key from $QDRANT_API_KEY)",
    )
    rt.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="allowed regression per gate metric, relative to the current value (0.02: 2%%)",
    )
    rt.add_argument(
        "--noise-z",
        type=float,
        default=2.0,
        help="a drop within this many standard errors of the paired per-query difference is noise (0: off)",
    )
    rt.add_argument(
        "--gate-metrics",
        default=",".join(DEFAULT_GATE_METRICS),
        help="comma list of <scenario>/recall@K (scenarios: warm, cold_whole, cold_test_items, fav_kN, recent)",
    )
    rt.add_argument(
        "--holdout-frac",
        type=float,
        default=0.2,
        help="fraction of each user's most recent events held out of training (recent-events holdout)",
    )
    rt.add_argument("--holdout-min-events", type=int, default=5, help="users with fewer events have none held out")
    rt.add_argument("--max-events-per-user", type=int, default=10_000, help="older events beyond this are skipped")
    rt.add_argument(
        "--gate-queries", type=int, default=None, help="cap on queries per standard gate scenario (default: all)"
    )
    rt.add_argument("--candidate", default=None, help="gate this bundle version of the store instead of training one")
    rt.add_argument("--dry-run", action="store_true", help="evaluate and log the decision, never promote")
    rt.add_argument(
        "--metrics-file", type=Path, default=None, help="write metrics here (node-exporter textfile format)"
    )
    rt.add_argument(
        "--pushgateway", default=None, help="push metrics to this Pushgateway (default: $A2V_PUSHGATEWAY_URL)"
    )


def cmd_retrain(a: argparse.Namespace) -> int:
    """Exit 0: a decision was taken (promoted, refused or dry run); 2: cannot start; 1: failed."""
    from .retrain import RETRAIN_MODELS, RetrainConfig, RetrainError, run
    from .rollout import default_ranker_data_dir, default_rollout_store

    env = os.environ
    cfg = _config(a)
    if not a.models:
        cfg.models = RETRAIN_MODELS
    cfg.store = a.store or default_rollout_store()
    url = (
        None
        if a.ranker_data_dir
        else (a.qdrant_url or env.get("A2V_RANKER_QDRANT_URL") or env.get("QDRANT_URL") or None)
    )
    metrics = tuple(m.strip() for m in a.gate_metrics.split(",") if m.strip())
    bad = [m for m in metrics if "/" not in m or not m.split("/", 1)[1].startswith("recall@")]
    if bad or not 0 <= a.tolerance < 1 or not 0 <= a.holdout_frac < 1:
        print(
            f"error: gate metrics must be <scenario>/recall@K (got {bad}); tolerance and holdout-frac in [0, 1)",
            file=sys.stderr,
        )
        return 2
    dsn = a.events_dsn or (None if a.events else env.get("A2V_RANKER_STORE_DSN") or None)
    rc = RetrainConfig(
        train=cfg,
        events=tuple(a.events or [default_ranker_data_dir() / "feedback.sqlite"]),
        events_dsn=dsn,
        ranker_data_dir=a.ranker_data_dir,
        qdrant_url=url,
        qdrant_api_key=env.get("A2V_RANKER_QDRANT_API_KEY") or env.get("QDRANT_API_KEY") or None,
        tolerance=a.tolerance,
        noise_z=a.noise_z,
        gate_metrics=metrics,
        holdout_frac=a.holdout_frac,
        holdout_min_events=a.holdout_min_events,
        max_events_per_user=a.max_events_per_user,
        gate_queries=a.gate_queries,
        dry_run=a.dry_run,
        candidate=a.candidate,
        metrics_file=a.metrics_file,
        pushgateway=a.pushgateway or env.get("A2V_PUSHGATEWAY_URL") or None,
        report_dir=a.report_dir,
    )
    try:
        d = run(rc)
    except RetrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # logged as a "failed" decision by run()
        print(f"error: retrain failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "decision": d.decision,
                "current": d.current,
                "candidate": d.candidate,
                "passed": d.passed,
                "reasons": d.reasons,
                "metrics": d.metrics,
            },
            indent=2,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="anime2vec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="fit every model, evaluate on the test split, write a report and a bundle")
    _common(tr)
    tr.add_argument("--store", type=Path, default=None, help="model store (default: $A2V_MODEL_STORE or models/)")
    tr.add_argument(
        "--quick",
        action="store_true",
        help="the quick bundle `make run` serves first: no MiniLM encoding (the hybrid reads TF-IDF and "
        "metadata), one setting per grid, capped queries; minutes instead of ~30 on a fresh machine",
    )
    ev = sub.add_parser("evaluate", help="fit and compare every recommender on one split; write a report (no bundle)")
    _common(ev)
    ins = sub.add_parser("inspect-bundle", help="verify a bundle (checksums, dims) and print its manifest")
    ins.add_argument(
        "bundle", nargs="?", type=Path, default=None, help="bundle directory (default: newest in the store)"
    )
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
    _pretrain_parsers(sub)
    _retrain_parser(sub)
    a = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if a.cmd == "inspect-bundle":
        return cmd_inspect(a)
    if a.cmd == "pretrain":
        return cmd_pretrain(a)
    if a.cmd == "encode":
        return cmd_encode(a)
    if a.cmd in ("index", "promote", "rollback", "versions"):
        return cmd_rollout(a)
    if a.cmd == "retrain":
        return cmd_retrain(a)
    return _run(a, write_bundle=(a.cmd == "train"))


if __name__ == "__main__":
    sys.exit(main())
