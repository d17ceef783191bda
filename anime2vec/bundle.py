"""Immutable, versioned model bundles: everything the ranker needs to serve one model version.

Layout of `<store>/<version>/`:
  manifest.json        version, data/code fingerprints, encoder, dims, hyper-parameters, offline
                       metrics, split description, and the sha256 of every other file
  catalog.jsonl        one JSON object per item, in item-index order
  arrays/*.npy         item_ids, user_ids, wmf_U, wmf_V, content (whitened item content vectors),
                       item_tower (the served item vectors), train_{data,indices,indptr,shape}
                       (training matrix), tfidf_content, plus one file per array of the served
                       hybrid's state (hybrid.*, models/hybrid.py) and of the whitener
A bundle is written into a temporary directory and renamed into place, so a half-written bundle
never appears under its version; files are made read-only. `load_bundle` re-hashes every file and
checks dimensions before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .paths import REPO_ROOT

FORMAT = 1
REQUIRED_ARRAYS = (
    "item_ids",
    "user_ids",
    "wmf_U",
    "wmf_V",
    "content",
    "item_tower",
    "train_data",
    "train_indices",
    "train_indptr",
    "train_shape",
)


class BundleError(RuntimeError):
    """A bundle is missing, corrupt, or incompatible with this code."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def code_fingerprint() -> dict:
    """sha256 over the package's source files, plus the git commit when there is one."""
    h = hashlib.sha256()
    for p in sorted((REPO_ROOT / "anime2vec").rglob("*.py")):
        if "/v1/" in p.as_posix():  # generated gRPC code is not model code
            continue
        h.update(p.relative_to(REPO_ROOT).as_posix().encode())
        h.update(p.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"sha256": h.hexdigest(), "git_commit": commit}


@dataclass
class Bundle:
    path: Path
    manifest: dict
    catalog: pd.DataFrame  # index: item index; column anime_id plus catalogue fields
    arrays: dict[str, np.ndarray]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def train(self) -> sp.csr_matrix:
        a = self.arrays
        return sp.csr_matrix(
            (a["train_data"], a["train_indices"], a["train_indptr"]), shape=tuple(int(x) for x in a["train_shape"])
        )

    def has(self, name: str) -> bool:
        return name in self.arrays

    def prefixed(self, prefix: str) -> dict[str, np.ndarray]:
        """Arrays stored as `<prefix>.<name>` (e.g. the DropoutNet state), prefix stripped."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.arrays.items() if k.startswith(prefix + ".")}


def write_bundle(
    store: Path,
    manifest: dict,
    catalog: pd.DataFrame,
    arrays: dict[str, np.ndarray],
    train: sp.csr_matrix,
    version: str | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a new bundle and return its path. Never overwrites an existing version.
    extra_files: relative path → bytes (e.g. the fitted TF-IDF vocabulary), checksummed like the rest."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    train = train.tocsr()
    arrays = dict(arrays)
    arrays.update(
        train_data=train.data.astype(np.float32),
        train_indices=train.indices.astype(np.int32),
        train_indptr=train.indptr.astype(np.int64),
        train_shape=np.asarray(train.shape, np.int64),
    )
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise BundleError(f"cannot write bundle: missing arrays {missing}")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-bundle-", dir=store))
    try:
        (tmp / "arrays").mkdir()
        for name, arr in arrays.items():
            np.save(tmp / "arrays" / f"{name}.npy", np.asarray(arr), allow_pickle=False)
        catalog.to_json(tmp / "catalog.jsonl", orient="records", lines=True, force_ascii=False)
        for rel, blob in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(blob)
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = dict(manifest)
        manifest.update(
            format=FORMAT,
            files=files,
            created_at=manifest.get("created_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        if version is None:
            digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:8]
            version = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + digest
        manifest["version"] = version
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default))
        final = store / version
        if final.exists():
            raise BundleError(f"bundle {version} already exists in {store}; bundles are immutable")
        for p in tmp.rglob("*"):
            if p.is_file():
                p.chmod(0o444)
        os.rename(tmp, final)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Load and verify a bundle; raises BundleError naming exactly what is wrong."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{path}: no manifest.json (not a model bundle)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format')!r}, this code reads format {FORMAT}")
    files = manifest.get("files") or {}
    for rel, digest in files.items():
        p = path / rel
        if not p.is_file():
            raise BundleError(f"{path}: file {rel} listed in the manifest is missing")
        if verify and sha256_file(p) != digest:
            raise BundleError(f"{path}: checksum mismatch for {rel} (corrupt or modified bundle)")
    arrays = {}
    for rel in files:
        if rel.startswith("arrays/") and rel.endswith(".npy"):
            try:
                arrays[rel[len("arrays/") : -4]] = np.load(path / rel, allow_pickle=False)
            except ValueError as e:
                raise BundleError(f"{path}: cannot read {rel} ({e})") from e
    missing = [k for k in REQUIRED_ARRAYS if k not in arrays]
    if missing:
        raise BundleError(f"{path}: missing arrays {missing}")
    catalog = pd.read_json(path / "catalog.jsonl", orient="records", lines=True, dtype=False)
    _check_dims(path, manifest, catalog, arrays)
    return Bundle(path=path, manifest=manifest, catalog=catalog, arrays=arrays)


def _check_dims(path: Path, manifest: dict, catalog: pd.DataFrame, a: dict[str, np.ndarray]) -> None:
    dims = manifest.get("dims", {})
    n_items, n_users = len(a["item_ids"]), len(a["user_ids"])
    checks = [
        ("catalog rows", len(catalog), n_items),
        ("dims.n_items", dims.get("n_items"), n_items),
        ("dims.n_users", dims.get("n_users"), n_users),
        ("wmf_V rows", a["wmf_V"].shape[0], n_items),
        ("wmf_U rows", a["wmf_U"].shape[0], n_users),
        ("wmf factors", a["wmf_U"].shape[1], dims.get("factors")),
        ("wmf_V factors", a["wmf_V"].shape[1], dims.get("factors")),
        ("content rows", a["content"].shape[0], n_items),
        ("content dim", a["content"].shape[1], dims.get("content_dim")),
        ("item_tower rows", a["item_tower"].shape[0], n_items),
        ("item_tower dim", a["item_tower"].shape[1], dims.get("tower_dim")),
        ("train shape", tuple(int(x) for x in a["train_shape"]), (n_users, n_items)),
    ]
    if "graph_content" in a:  # optional: graph features the DropoutNet reads beside the text
        checks += [
            ("graph_content rows", a["graph_content"].shape[0], n_items),
            ("graph_content dim", a["graph_content"].shape[1], dims.get("graph_dim")),
        ]
    # the served hybrid's per-anime arrays (models/hybrid.py Hybrid.STATE): one row per item
    checks += [
        (f"{k} rows", a[k].shape[0], n_items)
        for k in ("hybrid.P", "hybrid.q", "hybrid.C", "hybrid.group", "hybrid.pop", "hybrid.item_content")
        if k in a
    ]
    if "hybrid.C" in a and "hybrid_content_dim" in dims:
        checks.append(("hybrid.C dim", a["hybrid.C"].shape[1], dims["hybrid_content_dim"]))
    for what, got, want in checks:
        if got != want:
            raise BundleError(f"{path}: incompatible bundle: {what} is {got}, expected {want}")
    if "anime_id" in catalog and not np.array_equal(catalog["anime_id"].to_numpy(np.int64), a["item_ids"]):
        raise BundleError(f"{path}: catalog order does not match item_ids")


def list_bundles(store: Path) -> list[Path]:
    """Complete bundles in a store, oldest first (by manifest created_at, then name)."""
    store = Path(store)
    if not store.is_dir():
        return []
    out = []
    for p in store.iterdir():
        m = p / "manifest.json"
        if p.is_dir() and not p.name.startswith(".") and m.is_file():
            try:
                out.append((json.loads(m.read_text()).get("created_at", ""), p.name, p))
            except (OSError, json.JSONDecodeError):
                continue
    return [p for _, _, p in sorted(out)]


def newest_bundle(store: Path, source: str, preset: str | None = None) -> Path | None:
    """The newest bundle in `store` trained on `source` data ("full" or "sample"), of `preset`
    ("full", "quick"; None: either)."""

    def fits(m: dict) -> bool:
        return m.get("data", {}).get("source") == source and preset in (None, m.get("preset", "full"))

    matching = [p for p in list_bundles(store) if fits(json.loads((p / "manifest.json").read_text()))]
    return matching[-1] if matching else None
