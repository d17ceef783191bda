"""Writes to the served catalogue (UpsertAnime): an anime's text and metadata validated, encoded by the
encoder service, written to the store of record (which assigns new ids, across replicas too), then
served at once by this replica's version; other replicas serve it when they follow the store."""

from __future__ import annotations

import logging

from anime2vec.index.base import ItemIndex, ItemPoint
from anime2vec.serving.encoder_client import EncoderClient
from anime2vec.serving.errors import already_exists, failed_precondition, invalid_argument, resource_exhausted
from anime2vec.serving_model.model import ItemMeta
from anime2vec.store.added_anime import ASSIGNED_IDS, MAX_ANIME_ID, AnyAddedAnimeStore, IdsExhausted
from anime2vec.v1 import common_pb2, ranker_pb2

from .lifecycle import Lifecycle
from .state import Serving, anime_text, item_vectors, payload_from_fields

log = logging.getLogger(__name__)
MAX_TITLE, MAX_SYNOPSIS, MAX_GENRES = 300, 20_000, 30
MAX_EPISODES = 10_000  # the longest-running series have a few thousand
# UpsertAnime replaces a *catalogue* anime (one the bundle holds) only when the call carries this
# metadata with that anime's id: an id sent by mistake, or to vandalise, cannot rewrite the catalogue
REPLACE_CATALOGUE_KEY = "a2v-replace-catalogue-anime"
TYPES = ("TV", "Movie", "OVA", "ONA", "Special", "Music")


class CatalogueWriter:
    def __init__(self, lifecycle: Lifecycle, store: AnyAddedAnimeStore, index: ItemIndex, encoder: EncoderClient):
        self.lifecycle, self.store, self.index, self.encoder = lifecycle, store, index, encoder

    def upsert(self, request: ranker_pb2.UpsertAnimeRequest, context) -> ranker_pb2.UpsertAnimeResponse:
        s = self.lifecycle.current()
        fields = validate_anime_input(request.anime)
        text = anime_text(s.model, fields)
        raw, fingerprint = self.encoder.encode([text])
        if fingerprint != s.model.manifest["encoder"]["fingerprint"]:
            raise failed_precondition(
                f"encoder serves {fingerprint}, model {s.version} was trained with "
                f"{s.model.manifest['encoder']['fingerprint']}",
                reason="ENCODER_MISMATCH",
            )
        with self.lifecycle.write_lock:  # the write and serving it are one step for this replica
            aid = self._upsert_id(s, request, context)  # None: a new anime, its id assigned by the store
            if aid in s.model.pos and not fields["members"]:
                fields["members"] = int(s.model.payload(s.model.pos[aid])["members"])
            vec, content, tfidf, cold, row = item_vectors(s, aid or 0, raw[0], text, fields)
            if aid is None:  # id assignment and the write are one step in the store, across replicas too
                try:
                    written = self.store.add_new(fields, raw[0], fingerprint, self._top_assigned(s))
                except IdsExhausted as e:
                    raise resource_exhausted(str(e), reason="ANIME_IDS_EXHAUSTED") from None
                aid = written.anime_id
            else:
                written = self.store.put(aid, fields, raw[0], fingerprint)
            created = written.created and aid not in s.model.pos
            meta = ItemMeta(aid, content, payload_from_fields(aid, fields, cold), tfidf, fields["synopsis"], row, vec)
            self.index.upsert([ItemPoint(aid, vec, meta.payload)], version=s.version)
            s.extra[aid] = meta
            s.applied[aid] = written.revision
            s.generation += 1
        log.info("upserted anime", extra={"anime_id": aid, "new": created, "version": s.version})
        return ranker_pb2.UpsertAnimeResponse(anime_id=aid, created=created, model_version=s.version)

    @staticmethod
    def _top_assigned(s: Serving) -> int:
        """The largest bundle id inside ASSIGNED_IDS (0: none): new ids go above it."""
        ids = s.model.item_ids
        in_range = ids[(ids >= ASSIGNED_IDS.start) & (ids < ASSIGNED_IDS.stop)]
        return int(in_range.max()) if len(in_range) else 0

    def _upsert_id(self, s: Serving, request, context) -> int | None:
        """The id an UpsertAnime writes. Absent: None (the store assigns a fresh one from
        ASSIGNED_IDS, above _top_assigned). Given: it must be in
        1..MAX_ANIME_ID and outside ASSIGNED_IDS unless it names an anime added before (callers
        never create ids there, so assigned ids never collide); a catalogue anime is replaced only
        with the REPLACE_CATALOGUE_KEY metadata naming it."""
        if not request.HasField("anime_id"):
            return None
        aid = int(request.anime_id)
        if not 1 <= aid <= MAX_ANIME_ID:
            raise invalid_argument({"anime_id": f"must be in 1..{MAX_ANIME_ID}, got {aid}"})
        if aid in s.model.pos:
            asked = dict(context.invocation_metadata() if context else ()).get(REPLACE_CATALOGUE_KEY)
            if asked != str(aid):
                raise already_exists(
                    f"anime_id {aid} is a catalogue anime of {s.version}; replacing its title and text takes "
                    f"metadata {REPLACE_CATALOGUE_KEY}: {aid}",
                    reason="CATALOGUE_ANIME",
                    field="anime_id",
                )
        elif aid in ASSIGNED_IDS and not self.store.has(aid):
            raise invalid_argument(
                {
                    "anime_id": f"ids from {ASSIGNED_IDS.start} on are assigned by the ranker: "
                    f"omit anime_id to add a new anime"
                }
            )
        return aid


def validate_anime_input(a: common_pb2.AnimeInput) -> dict:
    bad = []
    if not a.title.strip():
        bad.append(("anime.title", "required"))
    elif len(a.title) > MAX_TITLE:
        bad.append(("anime.title", f"at most {MAX_TITLE} characters"))
    if not a.synopsis.strip():
        bad.append(("anime.synopsis", "required: a new anime is recommendable only through its text"))
    elif len(a.synopsis) > MAX_SYNOPSIS:
        bad.append(("anime.synopsis", f"at most {MAX_SYNOPSIS} characters, got {len(a.synopsis)}"))
    if len(a.genres) > MAX_GENRES or any(not g.strip() or len(g) > 50 for g in a.genres):
        bad.append(("anime.genres", f"at most {MAX_GENRES} genres of 1-50 characters"))
    if len(a.synonyms) > 50 or any(len(x) > MAX_TITLE for x in a.synonyms):
        bad.append(("anime.synonyms", f"at most 50 synonyms of up to {MAX_TITLE} characters"))
    if a.type and a.type not in TYPES:
        bad.append(("anime.type", f"one of {', '.join(TYPES)} or empty"))
    if a.HasField("year") and not 1900 <= a.year <= 2100:
        bad.append(("anime.year", "must be in 1900..2100"))
    if a.HasField("episodes") and not 0 <= a.episodes <= MAX_EPISODES:
        bad.append(("anime.episodes", f"must be in 0..{MAX_EPISODES}, got {a.episodes}"))
    if a.members < 0:
        bad.append(("anime.members", "must be >= 0"))
    if bad:
        raise invalid_argument(bad)
    return {
        "title": a.title.strip(),
        "title_english": a.title_english.strip(),
        "synonyms": list(a.synonyms),
        "synopsis": a.synopsis.strip(),
        "genres": [g.strip() for g in a.genres],
        "type": a.type,
        "year": a.year if a.HasField("year") else None,
        "episodes": a.episodes if a.HasField("episodes") else None,
        "members": int(a.members),
    }
