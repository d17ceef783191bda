"""The evaluation protocol (README, "The offline pipeline") as data (`scenarios`) and a runner
(`Experiment`, after Cornac): every model is scored on every scenario with the same queries,
candidates and truth.

Scenarios for one split ("val" for model selection, "test" for the reported numbers):

- cold_test_items  DropoutNet's protocol: train users with a positive on the split's cold items;
                   rank those cold items only; truth = the user's positives there.
- cold_whole       the same users and truth, ranked against the whole catalogue (warm items, the
                   other cold items, items nobody rated): cold and warm scores must share a scale.
- cold_whole_nofranchise
                   cold_whole with same-franchise hits set aside (see `franchise_key`), so that
                   "reads what the show is about" is measured apart from "matches a sequel's name".
                   Only when titles are given.
- new_test_items, new_whole, new_whole_nofranchise
                   brand-new anime: the cold scenarios again, with every anime without training
                   interactions scored from what it has on the day it airs (`Recommender.day_one`:
                   no recommendation pairs, no interactions). What AddAnime serves.
- warm             train users with a warm held-out positive in the split; whole catalogue.
- fav_k{k}         favourites queries (cold users): the split's held-out users with at least
                   max(fav_ks) + 1 positives (the same users for every k); the query is their k
                   highest-confidence positives, the truth the rest; candidates = train items.

Exclusion rule (one rule for every known-user scenario): a user's positives that are not targets
of the scenario are removed from the ranking. That is the training row (known to the model) and
the user's positives held out for *other* scenarios (warm_val / warm_test / cold_val / cold_test):
they are neither training data nor targets, so ranking them high must not count as a miss, and
they are real positives, so treating them as negatives would be wrong too. It only removes
candidates; no model sees them.

Exact score ties are broken in a seeded random order of the candidates, the same for every model
(never by item index, which on MAL follows age and so popularity).
"""

from __future__ import annotations

import dataclasses
import re
import time
import unicodedata
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from ..data.dataset import Dataset
from ..models.base import Queries, Recommender
from . import metrics

SPLITS = ("val", "test")
FAMILIES = {"cold": "Cold items", "warm": "Warm users", "favourites": "Favourites queries (cold users)"}
DESCRIPTIONS = {
    "cold_test_items": "cold items, ranking the split's cold items only (DropoutNet protocol)",
    "cold_whole": "cold items, ranking the whole catalogue minus the user's known positives",
    "cold_whole_nofranchise": "cold_whole with same-franchise hits set aside (leading title words)",
    "new_test_items": "brand-new anime (day-one signals only), ranking the split's cold items only",
    "new_whole": "brand-new anime (day-one signals only), ranking the whole catalogue",
    "new_whole_nofranchise": "new_whole with same-franchise hits set aside",
    "warm": "held-out positives of known users on warm items, whole catalogue",
}
# Leading words that carry no franchise identity: English articles and Japanese particles
# ("Shingeki no Kyojin" and "Kimi no Na wa." must not both key on "... no").
FRANCHISE_STOPWORDS = frozenset({"the", "a", "an", "of", "and", "no", "wa", "ga", "wo", "ni", "de", "to", "mo"})
FRANCHISE_WORDS = 2


@dataclass
class Scenario:
    name: str
    queries: Queries
    candidates: np.ndarray  # item indices ranked for every query
    truth: sp.csr_matrix  # (n_queries, n_items), non-zero = relevant
    exclude: sp.csr_matrix | None  # (n_queries, n_items), non-zero = never ranked
    split: str
    family: str  # "cold" / "warm" / "favourites"
    users: np.ndarray  # dataset user index behind each query
    day_one: np.ndarray | None = None  # items scored as brand-new anime (Recommender.day_one)
    # True: the Experiment ranks the candidates in a seeded random order per batch (exact ties at
    # random); False: in the order given (the scenario's builder fixed its own tie order)
    shuffle: bool = True
    about: str = ""  # what the scenario measures, for scenarios outside the standard protocol

    @property
    def description(self) -> str:
        if self.about:
            return self.about
        if self.family == "favourites":
            return f"favourites queries: {self.name.removeprefix('fav_k')} liked items given, predict the rest (train items)"
        return DESCRIPTIONS[self.name]


def franchise_key(title: str) -> tuple[str, ...]:
    """The leading words that stand for a title's franchise: accents folded, lower-cased, split
    on anything not a letter or digit, stopwords dropped, first FRANCHISE_WORDS words kept.
    "Naruto: Shippuuden" -> ("naruto", "shippuuden"); "Shingeki no Kyojin Season 2" ->
    ("shingeki", "kyojin")."""
    folded = unicodedata.normalize("NFKD", str(title)).encode("ascii", "ignore").decode().lower()
    words = [w for w in re.findall(r"[a-z0-9]+", folded) if w not in FRANCHISE_STOPWORDS]
    return tuple(words[:FRANCHISE_WORDS])


def same_franchise(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Two keys match when the shorter is a prefix of the longer ("naruto" matches "naruto
    shippuuden"); empty keys match nothing."""
    n = min(len(a), len(b))
    return n > 0 and a[:n] == b[:n]


def _franchise_hits(history: sp.csr_matrix, truth: sp.csr_matrix, titles: np.ndarray) -> sp.csr_matrix:
    """Binary (n_queries, n_items): the truth entries whose title is `same_franchise` with a title
    in the query's history. Vectorised through what each user's history holds (first words,
    one-word keys, two-word keys): a one-word truth key matches a history first word; a two-word
    truth key matches a history pair or a one-word history key equal to its first word."""
    keys = [franchise_key(t) for t in titles]
    n_items = len(keys)
    n_words = np.array([len(k) for k in keys])
    first_vocab = {w: c for c, w in enumerate(sorted({k[0] for k in keys if k}))}
    pair_vocab = {p: c for c, p in enumerate(sorted({k for k in keys if len(k) >= 2}))}
    first = np.array([first_vocab[k[0]] if k else -1 for k in keys], dtype=np.int64)
    pair = np.array([pair_vocab[k] if len(k) >= 2 else -1 for k in keys], dtype=np.int64)

    h = _binary(history)

    def holds(codes: np.ndarray, mask: np.ndarray, n_codes: int) -> sp.csr_matrix:
        """(n_queries, n_codes): how many history items carry each code."""
        rows = np.flatnonzero(mask)
        onehot = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, codes[rows])), shape=(n_items, max(n_codes, 1)))
        return (h @ onehot).tocsr()

    has_first = holds(first, n_words >= 1, len(first_vocab))
    has_single = holds(first, n_words == 1, len(first_vocab))
    has_pair = holds(pair, n_words >= 2, len(pair_vocab))
    t = _binary(truth).tocoo()
    q, j = t.row.astype(np.int64), t.col.astype(np.int64)

    def lookup(m: sp.csr_matrix, codes: np.ndarray) -> np.ndarray:
        out = np.zeros(len(q), bool)
        ok = codes >= 0
        if ok.any():
            out[ok] = np.asarray(m[q[ok], codes[ok]]).ravel() > 0
        return out

    one, two = n_words[j] == 1, n_words[j] >= 2
    match = (one & lookup(has_first, first[j])) | (two & (lookup(has_pair, pair[j]) | lookup(has_single, first[j])))
    return _binary(sp.csr_matrix((np.ones(int(match.sum()), np.float32), (q[match], j[match])), shape=truth.shape))


def _binary(m: sp.spmatrix) -> sp.csr_matrix:
    out = sp.csr_matrix(m, dtype=np.float32, copy=True)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.data[:] = 1.0
    out.sort_indices()
    return out


def _rows(m: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
    out = m[users].tocsr()
    out.sort_indices()
    return out


def minus(a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    """Binary a AND NOT b."""
    a = _binary(a)
    return _binary(a - a.multiply(_binary(b)))


def seeded_rng(seed: int, purpose: str) -> np.random.Generator:
    """One independent, reproducible stream per purpose, whatever else draws from the seed."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def _subsample(users: np.ndarray, max_queries: int | None, seed: int, family: str) -> np.ndarray:
    if max_queries is None or len(users) <= max_queries:
        return users
    return np.sort(seeded_rng(seed, f"subsample/{family}").choice(users, size=max_queries, replace=False))


def _with_positives(m: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    users = np.asarray(users, dtype=np.int64)
    return users[m[users].getnnz(axis=1) > 0]


def _favourites(ds: Dataset, split: str, fav_ks: tuple[int, ...], seed: int, max_queries: int | None) -> list[Scenario]:
    pool = ds.val_users if split == "val" else ds.test_users
    heldout = ds.heldout.tocsr()
    pool = np.asarray(pool, dtype=np.int64)
    users = pool[heldout[pool].getnnz(axis=1) >= max(fav_ks) + 1]
    users = _subsample(users, max_queries, seed, "favourites")
    rng = seeded_rng(seed, "favourites/ties")
    ordered: list[tuple[np.ndarray, np.ndarray]] = []  # per user: items, confidences, best first
    for u in users:
        lo, hi = heldout.indptr[u], heldout.indptr[u + 1]
        items, conf = heldout.indices[lo:hi], heldout.data[lo:hi]
        perm = rng.permutation(len(items))  # random tie order, then a stable sort by confidence
        order = perm[np.argsort(-conf[perm], kind="stable")]
        ordered.append((items[order].astype(np.int64), conf[order]))
    out = []
    for k in fav_ks:
        liked = [it[:k] for it, _ in ordered]
        weights = [c[:k] for _, c in ordered]
        rest = [it[k:] for it, _ in ordered]
        out.append(
            Scenario(
                name=f"fav_k{k}",
                queries=Queries.of_liked(liked, weights=weights),
                candidates=np.asarray(ds.train_items, dtype=np.int64),
                truth=index_rows(rest, ds.n_items),
                exclude=index_rows(liked, ds.n_items),
                split=split,
                family="favourites",
                users=users,
            )
        )
    return out


def index_rows(rows: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    r = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
    c = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return _binary(sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(len(rows), n_items)))


def scenarios(
    ds: Dataset,
    split: str = "test",
    fav_ks: tuple[int, ...] = (1, 3, 5, 10),
    seed: int = 0,
    max_queries: int | None = None,
    titles: np.ndarray | None = None,
) -> list[Scenario]:
    """Every scenario of the protocol for one split (see the module docstring). `max_queries`
    subsamples each family's users deterministically (the cold scenarios share theirs).
    Scenarios without any query are left out."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fav_ks = tuple(sorted({int(k) for k in fav_ks}))
    if fav_ks and fav_ks[0] < 1:
        raise ValueError(f"fav_ks must be positive, got {fav_ks}")
    if titles is not None and len(titles) != ds.n_items:
        raise ValueError(f"titles has {len(titles)} entries for {ds.n_items} items")
    cold = (ds.cold_val if split == "val" else ds.cold_test).tocsr()
    warm = (ds.warm_val if split == "val" else ds.warm_test).tocsr()
    cold_items = np.asarray(ds.val_items if split == "val" else ds.test_items, dtype=np.int64)
    all_items = np.arange(ds.n_items, dtype=np.int64)
    known = _binary(ds.train + ds.warm_val + ds.warm_test + ds.cold_val + ds.cold_test)

    out: list[Scenario] = []
    users = _subsample(_with_positives(cold, ds.train_users), max_queries, seed, "cold")
    if len(users):
        truth = _rows(cold, users)
        q = Queries.of_users(users)
        out.append(Scenario("cold_test_items", q, cold_items, truth, None, split, "cold", users))
        out.append(Scenario("cold_whole", q, all_items, truth, minus(known[users], truth), split, "cold", users))
        if titles is not None:
            history = _rows(ds.train, users)
            kept = minus(truth, _franchise_hits(history, truth, np.asarray(titles)))
            has = kept.getnnz(axis=1) > 0
            if has.any():
                u2, t2 = users[has], _rows(kept, np.flatnonzero(has))
                out.append(
                    Scenario(
                        "cold_whole_nofranchise",
                        Queries.of_users(u2),
                        all_items,
                        t2,
                        minus(known[u2], t2),
                        split,
                        "cold",
                        u2,
                    )
                )

    # every anime without training interactions is scored as brand-new, not only the split's: the
    # other split's cold anime are candidates too, and a model must not learn that "has pairs"
    # marks a distractor
    never_seen = np.setdiff1d(np.arange(ds.n_items), np.asarray(ds.train_items, np.int64))
    out += [
        dataclasses.replace(s, name=s.name.replace("cold_", "new_"), day_one=never_seen)
        for s in list(out)
        if s.family == "cold"
    ]

    users = _subsample(_with_positives(warm, ds.train_users), max_queries, seed, "warm")
    if len(users):
        truth = _rows(warm, users)
        out.append(
            Scenario(
                "warm", Queries.of_users(users), all_items, truth, minus(known[users], truth), split, "warm", users
            )
        )
    if fav_ks:
        out += [s for s in _favourites(ds, split, fav_ks, seed, max_queries) if len(s.users)]
    return out


@dataclass
class EvaluationData:
    """What an Experiment needs of the data when the scenarios come from elsewhere (the retrain
    gate, CiteULike): the training matrix models are fitted on, whose item space the scenarios
    index. A `Dataset` is one too."""

    train: sp.csr_matrix

    @property
    def n_items(self) -> int:
        return int(self.train.shape[1])

    @property
    def popularity(self) -> np.ndarray:
        return np.asarray((self.train > 0).sum(axis=0)).ravel().astype(np.float32)


@dataclass
class Results:
    """Tidy metrics of one Experiment run.

    table:  one row per (model, scenario, metric): model, scenario, metric, value, n_queries, split
    curves: one row per (model, scenario, k): recall@k for k = 1..max(ks)
    scenarios: one row per scenario: name, family, description, split, n_queries, n_candidates
    models: name -> {"params": ..., "fit_seconds": ... or None when it came fitted}
    timings: one row per (model, scenario): seconds spent ranking and scoring
    per_query: (model, scenario) -> metric -> one value per query (recall@K, ndcg@K, mrr), in the
               scenario's query order: for paired comparisons (the retrain gate)
    """

    table: pd.DataFrame
    curves: pd.DataFrame
    scenarios: pd.DataFrame
    models: dict[str, dict]
    timings: pd.DataFrame
    split: str
    seed: int
    ks: tuple[int, ...]
    max_queries: int | None = None
    notes: list[str] = field(default_factory=list)
    per_query: dict[tuple[str, str], dict[str, np.ndarray]] = field(default_factory=dict)

    def metrics(self, scenario: str) -> pd.DataFrame:
        """models x metrics for one scenario, in model and metric order of the run."""
        t = self.table[self.table["scenario"] == scenario]
        wide = t.pivot(index="model", columns="metric", values="value")
        return wide.loc[pd.unique(t["model"]), pd.unique(t["metric"])]

    def value(self, model: str, scenario: str, metric: str) -> float:
        t = self.table
        hit = t[(t["model"] == model) & (t["scenario"] == scenario) & (t["metric"] == metric)]
        if len(hit) != 1:
            raise KeyError(f"no single value for ({model}, {scenario}, {metric})")
        return float(hit["value"].iloc[0])


class Experiment:
    """Run every model on every scenario of one split with the same queries: the one way models
    are compared here (the report, model selection, the retrain gate, the CiteULike replication).

    Models that are not fitted yet (`train is None`) are fitted on `dataset.train`; fitted ones
    must have been fitted on a matrix of the dataset's shape. ks: cut-offs for recall/NDCG; the
    smallest is also the list length for the beyond-accuracy metrics (coverage, popularity
    percentile, diversity), the largest the length of the recall@K curves. MRR uses the full
    ranking of the candidates. `diversity_space` (n_items, d) is the one content space in which
    intra-list diversity is measured for all models; `titles` (aligned to item index) enables
    cold_whole_nofranchise. `scenarios`: run these instead of the standard protocol's (`scenarios`
    of the dataset); then `dataset` may be any `EvaluationData` and `split` is only a label.
    """

    def __init__(
        self,
        dataset: Dataset | EvaluationData,
        models: list[Recommender],
        split: str = "test",
        ks: tuple[int, ...] = (20, 100),
        fav_ks: tuple[int, ...] = (1, 3, 5, 10),
        diversity_space: np.ndarray | None = None,
        seed: int = 0,
        max_queries: int | None = None,
        titles: np.ndarray | None = None,
        batch_size: int = 512,
        scenarios: list[Scenario] | None = None,
    ):
        names = [m.name for m in models]
        if not models or len(set(names)) != len(names):
            raise ValueError(f"models need distinct names, got {names}")
        if scenarios is None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if scenarios is None and not isinstance(dataset, Dataset):
            raise ValueError("the standard protocol's scenarios need a Dataset; pass scenarios= for other data")
        ks = tuple(sorted({int(k) for k in ks}))
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be positive cut-offs, got {ks}")
        if diversity_space is not None and len(diversity_space) != dataset.n_items:
            raise ValueError(f"diversity_space has {len(diversity_space)} rows for {dataset.n_items} items")
        if max_queries is not None and max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.dataset, self.models, self.split, self.ks = dataset, list(models), split, ks
        self.fav_ks, self.seed, self.max_queries = tuple(fav_ks), seed, max_queries
        self.diversity_space, self.titles, self.batch_size = diversity_space, titles, batch_size
        self.given = None if scenarios is None else list(scenarios)

    def run(self, progress: bool = True) -> Results:
        notes: list[str] = []
        if self.given is not None:
            scs = self.given
        else:
            scs, notes = self._protocol()
        if not scs:
            raise ValueError(f"no scenario of the {self.split} split has a query: nothing to evaluate")
        if self.diversity_space is None:
            notes.append("intra-list diversity not measured: no diversity space given")
        model_info = {m.name: self._fit(m) for m in self.models}
        rows, curves, timings, per_query = [], [], [], {}
        pairs = [(m, s) for m in self.models for s in scs]
        for model, sc in tqdm(pairs, disable=not progress, desc=f"evaluate[{self.split}]"):
            t0 = time.perf_counter()
            view = model if sc.day_one is None else model.day_one(sc.day_one)
            values, curve, cis, pq = self._evaluate(view, sc)
            per_query[(model.name, sc.name)] = pq
            timings.append({"model": model.name, "scenario": sc.name, "seconds": time.perf_counter() - t0})
            rows += [
                {
                    "model": model.name,
                    "scenario": sc.name,
                    "metric": k,
                    "value": v,
                    "ci_low": cis.get(k, (np.nan, np.nan))[0],
                    "ci_high": cis.get(k, (np.nan, np.nan))[1],
                    "n_queries": len(sc.users),
                    "split": self.split,
                }
                for k, v in values.items()
            ]
            curves += [{"model": model.name, "scenario": sc.name, "k": k + 1, "recall": r} for k, r in enumerate(curve)]
        scen = pd.DataFrame(
            [
                {
                    "name": s.name,
                    "family": s.family,
                    "description": s.description,
                    "split": s.split,
                    "n_queries": len(s.users),
                    "n_candidates": len(s.candidates),
                }
                for s in scs
            ]
        )
        return Results(
            table=pd.DataFrame(rows),
            curves=pd.DataFrame(curves),
            scenarios=scen,
            models=model_info,
            timings=pd.DataFrame(timings),
            split=self.split,
            seed=self.seed,
            ks=self.ks,
            max_queries=self.max_queries,
            notes=notes,
            per_query=per_query,
        )

    def _protocol(self) -> tuple[list[Scenario], list[str]]:
        """The standard protocol's scenarios of the dataset, and notes on the ones left out."""
        assert isinstance(self.dataset, Dataset)
        scs = scenarios(self.dataset, self.split, self.fav_ks, self.seed, self.max_queries, self.titles)
        notes = []
        if self.titles is None:
            notes.append("cold_whole_nofranchise skipped: no titles given")
        expected = [
            "cold_test_items",
            "cold_whole",
            "new_test_items",
            "new_whole",
            "warm",
            *(f"fav_k{k}" for k in sorted(set(self.fav_ks))),
        ]
        if self.titles is not None:
            expected += ["cold_whole_nofranchise", "new_whole_nofranchise"]
        got = {s.name for s in scs}
        notes += [f"{name} skipped: no query qualifies" for name in expected if name not in got]
        return scs, notes

    def _fit(self, model: Recommender) -> dict:
        shape = self.dataset.train.shape
        fit_seconds = None
        if model.train is None:
            t0 = time.perf_counter()
            model.fit(self.dataset.train)
            fit_seconds = time.perf_counter() - t0
        elif model.train.shape != shape:
            raise ValueError(f"{model.name} was fitted on a {model.train.shape} matrix, the dataset's is {shape}")
        return {"params": model.params(), "fit_seconds": fit_seconds}

    def _evaluate(
        self, model: Recommender, sc: Scenario
    ) -> tuple[dict[str, float], np.ndarray, dict, dict[str, np.ndarray]]:
        """Chunk by chunk: top-max(ks) lists from `recommend`, the full-ranking MRR from the
        same model's scores (counting, not sorting: a full sort per query dominated the run
        time); per-query values kept for the means and their bootstrap intervals over users,
        and the short lists for the beyond-accuracy metrics. Items the model cannot score
        rank below every scored one."""
        n, list_k, max_k = len(sc.users), self.ks[0], self.ks[-1]
        per_query: dict[str, list[np.ndarray]] = {}
        curve = np.zeros(max_k)
        tops = []
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            q, w = sc.queries.slice(start, stop), stop - start
            # Candidates in a seeded random order (the same for every model): exact ties, e.g.
            # WMF's all-zero cold items, then resolve at random instead of by item index, which
            # on MAL follows age and hence popularity and would flatter whoever ties most.
            cands = (
                seeded_rng(self.seed, f"ties/{sc.name}/{start}").permutation(sc.candidates)
                if sc.shuffle
                else sc.candidates
            )
            position = np.full(self.dataset.n_items, -1, dtype=np.int64)
            position[cands] = np.arange(len(cands))
            ex = None if sc.exclude is None else sc.exclude[start:stop]
            ranked, _ = model.recommend(q, k=max_k, items=cands, exclude=ex, batch_size=self.batch_size)
            truth = sc.truth[start:stop]
            chunk = {f"recall@{k}": metrics.recall_per_query(ranked, truth, k) for k in self.ks}
            chunk |= {f"ndcg@{k}": metrics.ndcg_per_query(ranked, truth, k) for k in self.ks}
            scores = np.array(model.score(q, cands), dtype=np.float32)
            scores[:, ~np.asarray(model.scorable(cands), bool)] = -np.inf
            if ex is not None:
                ex = ex.tocoo()
                col = position[ex.col]
                scores[ex.row[col >= 0], col[col >= 0]] = -np.inf
            chunk["mrr"] = metrics.rr_from_scores(scores, truth[:, cands].toarray() > 0)
            for key, v in chunk.items():
                per_query.setdefault(key, []).append(v)
            curve += w * metrics.recall_curve(ranked, truth, max_k)
            tops.append(ranked[:, :list_k])
        pq = {k: np.concatenate(v) for k, v in per_query.items()}
        values = {k: float(v.mean()) for k, v in pq.items()}
        cis = {k: metrics.bootstrap_ci(v, seed=self.seed) for k, v in pq.items()}
        top = np.vstack(tops)
        values[f"coverage@{list_k}"] = metrics.catalogue_coverage(top, len(sc.candidates))
        values[f"popularity_pct@{list_k}"] = metrics.popularity_percentile(top, self.dataset.popularity)
        if self.diversity_space is not None:
            values[f"diversity@{list_k}"] = metrics.intra_list_diversity(top, self.diversity_space)
        return values, curve / n, cis, pq
