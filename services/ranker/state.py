"""One served model version, ready to answer: the `Serving` state (model, filters, the anime added at
run time) and what requests read from it (content, texts, explanation anchors, catalogue entries,
model info). A request keeps the `Serving` it started with, so a promotion never mixes one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from anime2vec.data.text import build_texts
from anime2vec.serving.errors import unavailable
from anime2vec.serving_model.model import ItemMeta, ServingModel
from anime2vec.v1 import common_pb2, ranker_pb2

from .explanations import Anchor, Subject, TermIndex, term_index
from .memory_scan import MemoryScan
from .ranking import Candidate, CatalogueFilter

S = common_pb2


@dataclass
class Serving:
    """One model version, ready: the model, its filters, and the anime added at run time."""

    model: ServingModel
    filt: CatalogueFilter
    extra: dict[int, ItemMeta]
    # ListCatalog pages come from one list built once per change of `extra` (not once per page)
    _catalog: tuple[int, list] | None = None
    generation: int = 0
    terms: TermIndex | None = None  # explanation terms of this version's catalogue
    # anime whose interactions the model was trained without (the evaluation's cold-item split):
    # scored from text like cold anime, but they have ratings, so they are not "cold start"
    held_out: frozenset[int] = frozenset()
    example_users: tuple[int, ...] = ()  # training users with the most interactions (GetModelInfo)
    # the store of added anime as this version serves it: every write up to added_revision is
    # applied (catalog_follower.py asks for the later ones), `applied` the revision of each anime
    added_revision: int = 0
    applied: dict[int, int] = field(default_factory=dict)
    scan: MemoryScan | None = None  # exact searches, answered in memory (None: no item vectors)

    @property
    def version(self) -> str:
        return self.model.version

    def catalog(self) -> list:
        cached = self._catalog
        if cached is None or cached[0] != self.generation:
            cached = self._catalog = (self.generation, catalog_entries(self))
        return cached[1]


def load_serving(model: ServingModel, search_precision: str = "auto") -> Serving:
    """search_precision: the in-memory search's (services/ranker/memory_scan.py)."""
    cat = model.catalog
    filt = CatalogueFilter(
        model.item_ids,
        [list(g or []) for g in cat["genres"]],
        list(cat["type"]),
        [None if pd.isna(y) else int(y) for y in cat["year"]],
        cold=~np.asarray(model.warm, bool),
    )
    return Serving(
        model,
        filt,
        {},
        terms=term_index(cat, model.content),
        held_out=held_out_items(model),
        example_users=example_users(model),
        scan=MemoryScan(model.item_ids, model.item_tower, filt, precision=search_precision)
        if model.has_vectors
        else None,
    )


def held_out_items(model: ServingModel) -> frozenset[int]:
    """Anime ids of the bundle's val/test items (positions in split.*_items) that the model has
    no factors for: their interactions exist but were held out of training."""
    arrays = model.bundle.arrays
    parts = [np.asarray(arrays[k], np.int64) for k in ("split.val_items", "split.test_items") if k in arrays]
    if not parts:
        return frozenset()
    pos = np.concatenate(parts)
    pos = pos[(pos >= 0) & (pos < len(model.item_ids))]
    return frozenset(int(a) for a in model.item_ids[pos[~model.warm[pos]]])


def example_users(model: ServingModel, n: int = 10) -> tuple[int, ...]:
    """The n users with the most training interactions, most first (ties: lower id first)."""
    counts = np.diff(model.train.indptr)
    order = np.lexsort((model.user_ids, -counts))[:n]
    return tuple(int(model.user_ids[i]) for i in order if counts[i] > 0)


def has_cold(s: Serving) -> bool:
    """Whether a cold_start_only filter can match anything: a cold catalogue or added anime."""
    return bool(s.filt.cold.any()) or any(m.payload.get("cold") for m in s.extra.values())


def content_of(s: Serving, anime_id: int) -> np.ndarray | None:
    if anime_id in s.extra:
        return s.extra[anime_id].content
    i = s.model.pos.get(anime_id)
    return None if i is None else s.model.content[i]


def text_of(s: Serving, anime_id: int) -> str:
    """The synopsis explanations read (an added anime's own, else the catalogue's)."""
    if anime_id in s.extra:
        return s.extra[anime_id].text
    i = s.model.pos.get(anime_id)
    return "" if i is None else s.model.synopses[i]


def anchor_of(s: Serving, anime_id: int) -> Anchor:
    if anime_id in s.extra:
        p = s.extra[anime_id].payload
        return Anchor(
            anime_id, p.get("title", ""), s.extra[anime_id].content, p.get("genres", []), s.extra[anime_id].text
        )
    i = s.model.pos[anime_id]
    return Anchor(anime_id, s.model.titles[i], s.model.content[i], s.model.genres[i], s.model.synopses[i])


def subject_of(s: Serving, c: Candidate) -> Subject:
    return Subject(
        c.anime_id, c.content, c.payload.get("genres") or [], text_of(s, c.anime_id), int(c.payload.get("members") or 0)
    )


def anime_text(model: ServingModel, fields: dict) -> str:
    """The text an anime is encoded from: the bundle's own recipe, so it matches training."""
    row = {
        **fields,
        "synonyms": tuple(fields.get("synonyms", ())),
        "genres": tuple(fields.get("genres", ())),
        "review": "",
        "title_japanese": "",
    }
    return build_texts(pd.DataFrame([row], index=[0]), model.manifest["encoder"]["recipe"]).iloc[0]


def payload_from_fields(anime_id: int, f: dict, cold: bool = True) -> dict:
    return {
        "anime_id": anime_id,
        "title": f.get("title", ""),
        "title_english": f.get("title_english", ""),
        "synonyms": list(f.get("synonyms", [])),
        "genres": list(f.get("genres", [])),
        "type": f.get("type", ""),
        "year": f.get("year"),
        "members": int(f.get("members") or 0),
        "cold": cold,
        "source": "upsert",
    }


def item_vectors(s: Serving, aid: int, raw: np.ndarray, text: str, fields: dict):
    """(serving vector, whitened content, TF-IDF projection, cold, content row) for an added
    anime; a catalogue anime keeps its audience (its collaborative vector and group)."""
    m = s.model
    if not m.has_vectors:
        raise unavailable(f"model {s.version} has no item vectors; cannot add anime", reason="NO_ITEM_TOWER")
    tfidf = m.tfidf_vector(text)
    w = m.whiten(raw)
    minilm = None if w is None else w[0]
    content = m.semantic_vector(minilm, tfidf)
    row = m.content_row(minilm, tfidf, fields)
    i = m.pos.get(aid)
    return m.item_vector(row, i), content, tfidf, i is None or not m.warm[i], row


def model_info(s: Serving) -> common_pb2.ModelInfo:
    m = s.model.manifest
    info = S.ModelInfo(
        version=s.version,
        encoder_name=m["encoder"]["name"],
        encoder_dim=int(m["encoder"]["dim"]),
        tower_dim=int(s.model.item_tower.shape[1]),
        n_items=len(s.model.item_ids) + len([a for a in s.extra if a not in s.model.pos]),
        n_users=len(s.model.user_ids),
        encoder_fingerprint=m["encoder"]["fingerprint"],
        data_fingerprint=m["data"]["fingerprint"],
        example_user_ids=s.example_users,
        preset=m.get("preset", "full"),
    )
    info.created_at.FromJsonString(m["created_at"])
    info.offline_metrics.update(offline_metrics(m))
    return info


def next_model_status(path: Path | None) -> str:
    """The `status` line of the trainer's report file (settings.next_model_file); "" when there is
    none or it cannot be read (a trainer rewrites it atomically; a half-read file is just skipped)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            status = json.loads(f.read(4096)).get("status", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return status[:300] if isinstance(status, str) else ""


def offline_metrics(manifest: dict) -> dict[str, float]:
    return {f"{sc}/{k}": float(v) for sc, vals in (manifest.get("metrics") or {}).items() for k, v in vals.items()}


def catalog_entries(s: Serving) -> list[ranker_pb2.CatalogEntry]:
    """Bundle catalogue then added anime (by id); an added anime that replaces a catalogue
    entry's text keeps its catalogue position."""
    cat = s.model.catalog
    out = []
    for i in range(len(cat)):
        row = cat.iloc[i]
        aid = int(s.model.item_ids[i])
        if aid in s.extra:
            out.append(_entry_from_payload(aid, s.extra[aid].payload, s.extra[aid]))
            continue
        e = ranker_pb2.CatalogEntry(
            anime_id=aid,
            title=str(row["title"]),
            title_english=str(row.get("title_english") or ""),
            title_japanese=str(row.get("title_japanese") or ""),
            synonyms=[str(x) for x in (row.get("synonyms") or [])],
            members=int(row.get("members") or 0),
            type=str(row.get("type") or ""),
            genres=[str(g) for g in (row.get("genres") or [])],
        )
        if not pd.isna(row.get("year")):
            e.year = int(row["year"])
        out.append(e)
    for aid in sorted(a for a in s.extra if a not in s.model.pos):
        out.append(_entry_from_payload(aid, s.extra[aid].payload, s.extra[aid]))
    return out


def _entry_from_payload(aid: int, p: dict, meta: ItemMeta) -> ranker_pb2.CatalogEntry:
    e = ranker_pb2.CatalogEntry(
        anime_id=aid,
        title=p.get("title", ""),
        title_english=p.get("title_english", ""),
        synonyms=p.get("synonyms", []),
        members=int(p.get("members") or 0),
        type=p.get("type") or "",
        genres=p.get("genres") or [],
    )
    if p.get("year") is not None:
        e.year = int(p["year"])
    return e
