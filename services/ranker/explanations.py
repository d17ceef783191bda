"""Explanations a person can read: which of the query's anime a recommendation is closest to, the
distinctive words and phrases the two synopses share, and the genres they share.

    "Like Fullmetal Alchemist (your favourite): fullmetal alchemist, alchemy, philosopher's stone,
     human transmutation, limbs; shares Action, Military, Adventure, Comedy, Drama"

Terms are TF-IDF terms of the synopses (sublinear tf, smoothed IDF over the bundle's catalogue,
English stop words removed, plurals folded: "brother" and "brothers" are one term). The bundle's
own TF-IDF model (tfidf.npz) is not used: it keeps the 8,000 most frequent terms, which leaves out
exactly the rare words that explain best ("transmutation", "philosopher", "homunculus"); the
catalogue is tokenised once per model version instead (a couple of seconds for 16.7k synopses).

A term connects two anime when its weight is high in both synopses, times how *topical* it is.
IDF alone lets plot verbs through ("regain", "embark", "stumbles" are rare but say nothing);
topicality is the mean pairwise cosine, in the bundle's content space, of the catalogue anime
whose synopsis uses the term: ~0 for words used anywhere ("world" 0.03, "regain" 0.05), high for
words that mark a kind of story ("alchemy" 0.24, "transmutation" 0.29, "volleyball" 0.30,
"bounty" 0.13). A single word needs MIN_TOPICALITY ("power" 0.061 falls just short, "death" 0.067
passes). Also:
- character, place and franchise names are left out: a term the catalogue writes capitalised
  (almost) every time is a name ("Elric", "Konoha", "Gundam"), which says nothing to a person who
  has not seen the show;
- words every anime blurb uses ("anime", "series", "story", ...) and genre names (shown apart)
  are left out;
- two adjacent terms both texts share as a phrase ("bounty hunters", "serial killer") are shown
  as that phrase instead of its words.
Free-text queries match literally: the person's own words (names included) that the synopsis
shares, without the topicality floor. Per-text profiles are computed on demand and cached.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import unicodedata
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from anime2vec.data.text import strip_source_notes
from anime2vec.v1 import common_pb2

log = logging.getLogger(__name__)

TOKEN = re.compile(r"(?u)\b\w\w+\b")  # words of two or more letters/digits (sklearn's default)
CLAUSE = re.compile(r"[.!?;:,()\[\]{}\"“”«»\n]+")  # a phrase never spans these
PHRASE_GAP = re.compile(r"(?:'s|’s)?[\s-]+")  # what may separate the two words of a phrase
# Words that describe anime in general, not one anime: no person learns anything from them.
GENERIC = frozenset(
    """
anime animation animated series story stories episode episodes season seasons film films movie movies
ova ovas ona special specials tv manga novel novels light adaptation adapted original based version
written source sources rewrite mal studio production produced release released sequel prequel
recap compilation volume volumes chapter chapters arc arcs official edition
""".split()
)
STOP = ENGLISH_STOP_WORDS | GENERIC
MAX_DF = 0.5  # in more than half the synopses: boilerplate, not a term
NAME_SHARE = 0.9  # a term written capitalised this often (or more) in the catalogue is a name
MIN_NAME_COUNT = 3  # ...counted only when it occurs at least this often
MIN_TOPICALITY = 0.066  # below: a word any kind of story uses (~ the median of terms 2+ synopses use)
MAX_TERMS = 5
MIN_SIMILARITY = 0.15  # a second related anime is named only above this content cosine


def fold_accents(text: str) -> str:
    """Lower-case and strip accents ("Pokémon" → "pokemon")."""
    text = text.lower()
    if text.isascii():
        return text
    nfkd = unicodedata.normalize("NFKD", text)
    return "".join(c for c in nfkd if not unicodedata.combining(c))


def fold_plural(term: str) -> str:
    """One key for a word and its plural: brothers → brother, bodies → body; "boss", "virus",
    "basis" and short words stay as they are."""
    if len(term) > 4 and term.endswith("ies"):
        return term[:-3] + "y"
    if len(term) > 3 and term.endswith("s") and not term.endswith(("ss", "us", "is")):
        return term[:-1]
    return term


def term_key(token: str) -> str | None:
    """The term a folded token counts as, or None for stop words, generic words and numbers."""
    key = fold_plural(token)
    if token.isdigit() or {token, key} & STOP:
        return None
    return key


@dataclass(frozen=True)
class TermProfile:
    """The terms of one text: key (plural-folded) → TF-IDF weight × sqrt(topicality) (so the
    product of two texts' weights carries topicality once), the form the text uses, the keys
    topical enough to be shown alone, and the phrases of two adjacent terms (key pair → the
    phrase as written, lower-cased)."""

    weights: dict[str, float]
    surface: dict[str, str]
    salient: frozenset[str] = frozenset()
    phrases: dict[tuple[str, str], str] = field(default_factory=dict)


def connecting_terms(
    rec: TermProfile, anchor: TermProfile, k: int = MAX_TERMS, exclude: Iterable[str] = ()
) -> list[tuple[str, float]]:
    """The k terms or phrases that most connect two texts, strongest first, written as in `rec`.

    A term scores the product of its weights in the two texts (high in both = distinctive of
    both) and is shown when it is salient in both; a phrase both texts contain scores the sum of
    its two terms, replaces them, and needs one salient word. A word is shown once (alone or in
    one phrase). `exclude`: words never to show (e.g. the genres listed separately)."""
    banned = {fold_plural(fold_accents(w)) for x in exclude for w in TOKEN.findall(x)}
    score = {
        t: rec.weights[t] * anchor.weights[t] for t in rec.weights.keys() & anchor.weights.keys() if t not in banned
    }
    salient = rec.salient & anchor.salient
    items: list[tuple[float, str, tuple[str, ...]]] = [
        (s, rec.surface[t], (t,)) for t, s in score.items() if t in salient
    ]
    for (a, b), text in rec.phrases.items():
        if (a, b) in anchor.phrases and a in score and b in score and a != b and (a in salient or b in salient):
            items.append((score[a] + score[b], text, (a, b)))
    items.sort(key=lambda x: (-x[0], x[1]))
    out: list[tuple[str, float]] = []
    used: set[str] = set()
    for s, text, keys in items:
        if s <= 0 or any(t in used for t in keys):
            continue
        out.append((text, float(s)))
        used.update(keys)
        if len(out) == k:
            break
    return out


class TermIndex:
    """TF-IDF term profiles over one catalogue; thread-safe, with a bounded cache.

    corpus: the catalogue's synopses, aligned with `content` (their content vectors) when given;
    without content every term counts as topical (tests, bundles without vectors)."""

    def __init__(self, corpus: Sequence[str], content: np.ndarray | None = None, cache_size: int = 4096):
        texts = [strip_source_notes(t if isinstance(t, str) else "") for t in corpus]
        self.n_texts = len(texts)
        self.terms, df, uses, self.names, self.common = scan_corpus(texts)
        self.col = {t: j for j, t in enumerate(self.terms)}
        self.idf = np.log((1 + self.n_texts) / (1 + df)) + 1.0
        self._unseen_idf = math.log(1 + self.n_texts) + 1.0  # a term no catalogue synopsis uses
        topic = topicality(uses, content)
        self.topicality = None if topic is None else dict(zip(self.terms, topic.tolist()))
        self._cache: OrderedDict[tuple[str, bool], TermProfile] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def profile(self, text: str, literal: bool = False) -> TermProfile:
        """literal: the profile of a person's words (a free-text query, or a synopsis matched
        against one): names kept, every term salient, weights without topicality."""
        key = (text, literal)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        prof = self._profile(text, literal)
        with self._lock:
            self._cache[key] = prof
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return prof

    def _profile(self, text: str, literal: bool) -> TermProfile:
        folded = fold_accents(strip_source_notes(text or ""))
        counts: Counter[str] = Counter()
        surface: dict[str, str] = {}
        for tok in TOKEN.findall(folded):
            key = term_key(tok)
            if key is not None and key not in self.common and (literal or key not in self.names):
                counts[key] += 1
                surface.setdefault(key, tok)  # shown as the text first writes it
        raw = {
            t: (1 + math.log(n)) * (self.idf[self.col[t]] if t in self.col else self._unseen_idf)
            for t, n in counts.items()
        }
        norm = math.sqrt(sum(w * w for w in raw.values())) or 1.0
        weights, salient = {}, set()
        for t, w in raw.items():
            topic = 1.0 if literal or self.topicality is None else self.topicality.get(t, 0.0)
            weights[t] = w / norm * math.sqrt(max(topic, 0.0))
            if literal or topic >= MIN_TOPICALITY:
                salient.add(t)
        phrases: dict[tuple[str, str], str] = {}
        for clause in CLAUSE.split(folded):
            toks = list(TOKEN.finditer(clause))
            for m1, m2 in zip(toks, toks[1:]):
                ka, kb = term_key(m1.group()), term_key(m2.group())
                if ka in weights and kb in weights and PHRASE_GAP.fullmatch(clause[m1.end() : m2.start()]):
                    phrases.setdefault((ka, kb), clause[m1.start() : m2.end()])
        return TermProfile(weights, surface, frozenset(salient), phrases)


def term_index(catalog, content: np.ndarray | None) -> TermIndex | None:
    """The TermIndex of a bundle's catalogue (synopses) and content vectors, or None when the
    catalogue has no synopses: explanations then name anime and genres without terms."""
    if "synopsis" not in catalog:
        return None
    t0 = time.perf_counter()
    index = TermIndex(list(catalog["synopsis"]), content)
    log.info(
        "explanation terms ready: %d synopses, %d terms, %d names set aside, %.1f s",
        index.n_texts,
        len(index.terms),
        len(index.names),
        time.perf_counter() - t0,
    )
    return index


def scan_corpus(texts: Sequence[str]) -> tuple[list[str], np.ndarray, sp.csr_matrix, frozenset[str], frozenset[str]]:
    """One pass over the catalogue's synopses: the terms (plural-folded keys, stop and generic
    words out), their document frequencies, which texts use which term (binary (n_texts,
    n_terms)), and the names: terms written capitalised at least NAME_SHARE of the time
    ("Elric", "Konoha"; sentence-initial common words are too rare a share of a common word's
    uses to trip this), and the terms dropped as boilerplate: in more than MAX_DF of the texts."""
    col: dict[str, int] = {}
    cased: Counter[str] = Counter()
    rows, cols = [], []
    for i, text in enumerate(texts):
        toks = TOKEN.findall(text)
        cased.update(toks)
        keys = {term_key(t) for t in map(fold_accents, set(toks))}
        hit = [col.setdefault(k, len(col)) for k in keys if k is not None]
        rows.extend([i] * len(hit))
        cols.extend(hit)
    terms = list(col)
    uses = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(texts), len(terms)))
    uses.sum_duplicates()
    uses.data[:] = 1.0
    df = np.asarray(uses.sum(axis=0)).ravel()
    keep = df <= MAX_DF * max(len(texts), 1)
    common = frozenset(t for t, k in zip(terms, keep) if not k)
    if not keep.all():
        terms = [t for t, k in zip(terms, keep) if k]
        uses, df = uses[:, np.flatnonzero(keep)].tocsr(), df[keep]
    kept = set(terms)
    upper: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for tok, n in cased.items():
        key = term_key(fold_accents(tok))
        if key in kept:
            total[key] += n
            if tok[0].isupper():
                upper[key] += n
    names = frozenset(t for t, n in total.items() if n >= MIN_NAME_COUNT and upper[t] >= NAME_SHARE * n)
    return terms, df, uses, names, common


def topicality(uses: sp.csr_matrix, content: np.ndarray | None) -> np.ndarray | None:
    """Per term: the mean pairwise cosine between the content vectors of the texts that use it
    (uses: binary (n_texts, n_terms)), from |Σ u|² = n + Σ_{i≠j} cos(u_i, u_j) over the n unit
    vectors (no n×n matrix). Terms used by fewer than two texts get 0."""
    if content is None or uses.shape[0] == 0:
        return None
    if len(content) != uses.shape[0]:
        raise ValueError(f"{uses.shape[0]} texts but {len(content)} content vectors")
    c = np.asarray(content, np.float32)
    unit = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-9)
    sums = np.asarray(uses.T @ unit)
    n = np.asarray(uses.sum(axis=0)).ravel()
    pairs = n * (n - 1)
    return np.where(pairs > 0, ((sums * sums).sum(axis=1) - n) / np.maximum(pairs, 1), 0.0).astype(np.float32)


# ---- reasons ------------------------------------------------------------------------------------

# How the query's own anime are named in the one-line explanation, per request type.
ROLES = {"favourites": "your favourite", "text": "your favourite", "user": "one of your top-rated", "similar": ""}
GENRES_WITH = {
    "favourites": " with your favourites",
    "text": " with your favourites",
    "user": " with your top-rated anime",
    "similar": "",
}


@dataclass
class Anchor:
    """An anime the query is about: a favourite, the anime of a SimilarItems request, or one of a
    known user's most confident items."""

    anime_id: int
    title: str
    content: np.ndarray | None
    genres: Sequence[str]
    text: str = ""


@dataclass
class Subject:
    """The recommendation being explained."""

    anime_id: int
    content: np.ndarray | None
    genres: Sequence[str]
    text: str = ""
    members: int = 0


def _cos(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    if a is None or b is None:
        return None
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else None


def _shared_genres(mine: Sequence[str], theirs: Iterable[str]) -> list[str]:
    t = {g.casefold() for g in theirs}
    return [g for g in mine if g.casefold() in t]


def _favourite_line(title: str, role: str, sim: float, terms: list[str], genres: list[str]) -> str:
    """ "Like X: terms; shares genres" when the synopses share terms; "Close in story to X" when
    only the content vectors are close; "Shares genres with X" when only genres are shared."""
    who = f"{title} ({role})" if role else title
    shares = "; shares " + ", ".join(genres[:5]) if genres else ""
    if terms:
        return f"Like {who}: " + ", ".join(terms) + shares
    if sim >= MIN_SIMILARITY:
        return f"Close in story to {who}" + shares
    if genres:
        return "Shares " + ", ".join(genres[:5]) + f" with {who}"
    return f"Of the anime you gave, closest in story to {who}"


def explain(
    subject: Subject,
    anchors: Sequence[Anchor],
    query_kind: str,
    *,
    fallback: str | None = None,
    terms: TermIndex | None = None,
    query_content: np.ndarray | None = None,
    query_text: str = "",
) -> tuple[list[common_pb2.Reason], str]:
    """(reasons, strongest first with weights summing to 1; one line for people) for one
    recommendation. query_kind: "favourites", "user", "similar" or "text"; fallback: "wmf" or
    "popularity" when a fallback strategy ranked it.

    The query's anime named first is the one closest to the recommendation in the content space
    (the bundle's whitened text vectors, where the ranker's diversity works too); a second one is
    named when it is also close (cosine > MIN_SIMILARITY). The line leads with what ranked the
    anime (the text match, a fallback's signal) and always names the closest of the query's anime
    when there is one."""
    R = common_pb2
    role = ROLES.get(query_kind, "your favourite")
    reasons: list[tuple[float, common_pb2.Reason]] = []
    mine = list(subject.genres or [])
    rec_prof = terms.profile(subject.text) if terms is not None and subject.text else None
    scored = [(sim, a) for a in anchors if (sim := _cos(subject.content, a.content)) is not None]
    scored.sort(key=lambda t: -t[0])
    for n, (sim, a) in enumerate(scored[:2]):
        if n and sim <= MIN_SIMILARITY:
            break
        genres = _shared_genres(mine, a.genres)
        words = []
        if rec_prof is not None and terms is not None and a.text:  # rec_prof is only set when terms is
            words = [t for t, _ in connecting_terms(rec_prof, terms.profile(a.text), exclude=mine)]
        reasons.append(
            (
                max(sim, 0.05) + 0.05 * len(words),
                R.Reason(
                    kind=R.REASON_KIND_SIMILAR_TO_FAVOURITE,
                    anime_id=a.anime_id,
                    title=a.title,
                    detail=_favourite_line(a.title, role, sim, words, genres),
                    terms=words,
                    shared_genres=genres,
                    similarity=sim,
                ),
            )
        )
    shared = _shared_genres(mine, (g for a in anchors for g in a.genres))
    if shared:
        reasons.append(
            (
                0.05 * len(shared),
                R.Reason(
                    kind=R.REASON_KIND_SHARED_GENRES,
                    shared_genres=shared,
                    detail="shares " + ", ".join(shared[:5]) + GENRES_WITH.get(query_kind, ""),
                ),
            )
        )
    lead = None  # what ranked it, when that is not the query's anime
    if fallback == "wmf":
        lead = R.Reason(kind=R.REASON_KIND_NEIGHBOUR, detail="Liked by viewers whose taste resembles yours")
    elif fallback == "popularity":
        lead = R.Reason(kind=R.REASON_KIND_POPULAR, detail=f"Widely watched ({subject.members:,} MAL members)")
    elif query_kind == "text":
        sim = _cos(subject.content, query_content) or 0.0
        words = []
        if terms is not None and subject.text and query_text:  # names count here: the person typed them
            words = [
                t
                for t, _ in connecting_terms(
                    terms.profile(subject.text, literal=True), terms.profile(query_text, literal=True)
                )
            ]
        lead = R.Reason(
            kind=R.REASON_KIND_TEXT_MATCH,
            terms=words,
            similarity=sim,
            detail=("Matches your description: " + ", ".join(words))
            if words
            else "Close to your description in story and themes",
        )
    if lead is not None:  # the signal that ranked it leads, worth the rest together
        reasons.append((sum(w for w, _ in reasons) or 1.0, lead))
    total = sum(w for w, _ in reasons) or 1.0
    out = []
    for w, r in sorted(reasons, key=lambda t: (-t[0], t[1] is not lead)):
        r.weight = float(w / total)
        out.append(r)
    closest = reasons[0][1] if scored else None
    return out, _line(lead, closest, out)


def _line(lead: common_pb2.Reason | None, closest: common_pb2.Reason | None, reasons: list[common_pb2.Reason]) -> str:
    parts = [r.detail for r in (lead, closest) if r is not None]
    if not parts and reasons:
        parts = [reasons[0].detail]
    parts = [p[:1].upper() + p[1:] if n == 0 else p[:1].lower() + p[1:] for n, p in enumerate(parts)]
    return "; ".join(parts)
