"""In-domain masked-language-model (MLM) pre-training of the MiniLM encoder on MAL text.

DeepAniNet (shared/reference/deepaninet-report.txt, 4.3.3) continued BERT's MLM training on all the
anime text it had (synopses, reviews, written recommendations) before using it for DropoutNet. This
module does the same for all-MiniLM-L6-v2 and saves an encoder that `TextEncoder(model_dir=...)`
loads like the stock one (mean pooling, L2), with a different fingerprint so its encodings are
cached apart.

Corpus (`build_corpus`), chosen so that nothing from the interaction era of a cold item leaks in:
- item text: the default recipe ("Title: … Genres: … Synopsis: …") of every item of the evaluation
  universe, cold val/test items included. A synopsis is item content that exists at cold-start
  time, so unsupervised training on it is the transductive content use DropoutNet allows
  (`item_text="train"` keeps only training items, for a strict check).
- reviews: only of training-split items. Reviews are written by users after release, alongside
  the interactions the evaluation holds out.
- recommendation pairs: our data has no written recommendation text, only (anime, recommended
  anime, votes) pairs, so each training item with pairs becomes one sentence
  "Title: A. Fans also recommend: B; C; …" (most-voted first), over pairs whose both ends are
  training items (the pairs are user votes, i.e. interaction-era signal too).
The split is `build_dataset(..., seed=split_seed)`, the same cut the pipeline makes with that seed.

Training (`pretrain`): texts are cut into windows of `max_length` tokens (at most
`max_chunks_per_text` per text so long reviews do not crowd out synopses); a seeded
`eval_frac` of the *texts* is held out and its masks are drawn once, so every evaluation scores
the same masked tokens. The MLM head does not exist in the sentence-transformers checkpoint and
starts random, so training runs in two phases: `head_steps` with the encoder frozen (the head
learns to read the stock encoder; the eval loss after it is the fair "before" number), then
everything with AdamW, linear warm-up and linear decay. The decay is planned for
min(max_steps, steps that fit in max_minutes at the measured speed), re-planned as the speed
changes; the run stops at whichever limit comes first, then evaluates and saves. Logits are
computed only at masked positions (the 30k-word output layer over every position would cost
about a third of the forward pass). CUDA is used when present, with bf16 autocast (fp16 + loss
scaling on GPUs without bf16); CPU runs are float32 and bit-for-bit repeatable for a seed when
step-bound.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoModel,
    AutoTokenizer,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
)

from anime2vec.features.encoder import _model_name, default_model_dir  # noqa: E402

log = logging.getLogger(__name__)

SOURCES = ("item", "review", "recs")


@dataclass
class Corpus:
    texts: list[str]
    sources: list[str]  # one of SOURCES per text
    description: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {s: sum(1 for x in self.sources if x == s) for s in SOURCES}


def build_corpus(data, split_seed: int = 0, item_text: str = "all", recipe: str = "default") -> Corpus:
    """The MLM corpus from `MalData` (see the module docstring for what is used and why)."""
    from anime2vec.data.dataset import build_dataset
    from anime2vec.data.text import RECIPES, build_texts

    if item_text not in ("all", "train"):
        raise ValueError(f"item_text={item_text!r} must be 'all' or 'train'")
    catalog = data.catalog
    ds = build_dataset(catalog, data.interactions, seed=split_seed)
    train_ids = ds.item_ids[ds.train_items]
    item_ids = ds.item_ids if item_text == "all" else train_ids
    texts: list[str] = []
    sources: list[str] = []

    items = build_texts(catalog.loc[item_ids], RECIPES.get(recipe, recipe))
    for t in items:
        if t:
            texts.append(t)
            sources.append("item")

    reviews = catalog["review"].reindex(train_ids).fillna("")
    for t in reviews:
        t = " ".join(str(t).split())
        if t:
            texts.append(t)
            sources.append("review")

    train_set = set(int(a) for a in train_ids)
    recs = data.recs[data.recs["anime_id"].isin(train_set) & data.recs["rec_anime_id"].isin(train_set)]
    recs = recs[recs["anime_id"] != recs["rec_anime_id"]]
    recs = recs.sort_values(["anime_id", "num_users", "rec_anime_id"], ascending=[True, False, True])
    for anime_id, group in recs.groupby("anime_id", sort=True):
        names = [_title(catalog, int(b)) for b in group["rec_anime_id"]]
        names = [n for n in names if n]
        head = _title(catalog, int(anime_id))
        if head and names:
            texts.append(f"Title: {head}. Fans also recommend: {'; '.join(names)}.")
            sources.append("recs")

    description = {
        "split_seed": split_seed,
        "item_text": item_text,
        "recipe": RECIPES.get(recipe, recipe),
        "universe_items": int(ds.n_items),
        "train_items": int(len(train_ids)),
        "rec_pairs_used": int(len(recs)),
        "data_source": getattr(data, "source", ""),
        "data_fingerprint": getattr(data, "fingerprint", "")[:16],
    }
    corpus = Corpus(texts, sources, description)
    corpus.description["texts"] = corpus.counts()
    return corpus


def _title(catalog, anime_id: int) -> str:
    if anime_id not in catalog.index:
        return ""
    row = catalog.loc[anime_id]
    title, english = str(row["title"]).strip(), str(row.get("title_english", "") or "").strip()
    if english and english.casefold() != title.casefold():
        return f"{title} ({english})"
    return title


@dataclass
class PretrainConfig:
    out: Path
    base: Path | None = None  # a BERT model directory; None: the bundled all-MiniLM-L6-v2
    max_steps: int = 100_000  # optimiser steps, head phase included
    max_minutes: float = 25.0  # wall clock for the whole run: evaluations and saving included
    batch_size: int = 16
    max_length: int = 128
    lr: float = 5e-5
    head_steps: int = 100  # encoder frozen, only the fresh MLM head learns
    head_lr: float = 1e-3
    warmup_frac: float = 0.06  # of the planned full-model steps
    weight_decay: float = 0.01
    mlm_prob: float = 0.15
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads for the run; 0: leave torch's setting
    seed: int = 0
    eval_frac: float = 0.05  # of the texts, held out
    eval_max_seqs: int = 256  # cap on held-out windows scored per evaluation
    eval_every: int = 0  # full-model steps between evaluations; 0: only before/after
    max_chunks_per_text: int = 4
    log_every: int = 10
    name: str | None = None  # model name (README title); default: the output directory's name
    overwrite: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"], d["base"] = str(self.out), str(self.base) if self.base else None
        return d


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} must be auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch.cuda.is_available() is False")
    return device


def chunk(
    ids: list[int], max_length: int, cls_id: int, sep_id: int, max_chunks: int, min_tokens: int = 16
) -> list[list[int]]:
    """[CLS] window [SEP] pieces of `ids` (no specials), each at most `max_length` long. A trailing
    piece shorter than `min_tokens` is dropped unless it is the only one."""
    width = max_length - 2
    pieces = [ids[i : i + width] for i in range(0, len(ids), width)][:max_chunks]
    if len(pieces) > 1 and len(pieces[-1]) < min_tokens:
        pieces.pop()
    return [[cls_id, *p, sep_id] for p in pieces if p]


def _windows(tokenizer, texts: list[str], cfg: PretrainConfig) -> list[list[int]]:
    if not texts:  # eval_frac=0: the tokenizer fails on an empty batch
        return []
    ids = tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )["input_ids"]
    out: list[list[int]] = []
    for x in ids:
        out.extend(chunk(x, cfg.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id, cfg.max_chunks_per_text))
    return out


class _Schedule:
    """Linear warm-up then linear decay to 0 over a planned number of full-model steps, planned as
    min(max_steps, what fits in the time left at the measured speed) and re-planned as it runs."""

    def __init__(self, lr: float, max_steps: int, warmup_frac: float):
        self.lr, self.max_steps, self.warmup_frac = lr, max_steps, warmup_frac
        self.planned = max_steps
        self.warmup = max(1, int(round(warmup_frac * max_steps)))
        self._warmup_fixed = False

    def plan(self, done: int, seconds_left: float, seconds_per_step: float) -> None:
        fit = done + int(max(0.0, seconds_left) / max(seconds_per_step, 1e-9))
        self.planned = max(done + 1, min(self.max_steps, fit))
        if not self._warmup_fixed:  # warm-up is fixed at the first plan, not stretched later
            self.warmup = max(1, int(round(self.warmup_frac * self.planned)))
            self._warmup_fixed = True

    def __call__(self, step: int) -> float:  # step: 0-based full-model step about to be taken
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.planned - self.warmup)
        return self.lr * max(0.0, 1.0 - (step - self.warmup) / span)


def _mlm_loss(model: BertForMaskedLM, batch: dict, device: str, amp_dtype) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the masked tokens of a batch, and their number. Logits only at the
    masked positions."""
    input_ids = batch["input_ids"].to(device)
    attention = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    with torch.autocast("cuda", dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
        hidden = model.bert(input_ids=input_ids, attention_mask=attention).last_hidden_state
        where = labels != -100
        logits = model.cls(hidden[where])
    target = labels[where]
    n = int(target.numel())
    if n == 0:
        return logits.sum() * 0.0, 0
    return torch.nn.functional.cross_entropy(logits.float(), target), n


@torch.no_grad()
def evaluate_mlm(model: BertForMaskedLM, batches: list[dict], device: str, amp_dtype=None) -> float:
    """Token-weighted mean MLM loss over fixed masked batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        loss, n = _mlm_loss(model, b, device, amp_dtype)
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _optimizer(params: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float):
    decay = [p for n, p in params if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "LayerNorm" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


def pretrain(corpus: Corpus, cfg: PretrainConfig) -> dict:
    """Run MLM training on `corpus`, save the adapted encoder to `cfg.out`, return the report
    (also written to `cfg.out/pretrain.json`)."""
    previous_threads = torch.get_num_threads()
    if cfg.threads > 0:
        # On a shared CPU, fewer threads than cores can be much faster: idle-waiting OpenMP
        # threads of an oversubscribed machine cost more than they compute.
        torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(corpus, cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(corpus: Corpus, cfg: PretrainConfig) -> dict:
    run = _Run(corpus, cfg)
    run.train()
    return run.finish()


class _Windows:
    """The training windows as an endless stream of batches: a fresh seeded permutation each epoch."""

    def __init__(self, windows: list[list[int]], batch_size: int, rng: np.random.Generator, collator):
        self.windows, self.batch_size, self.rng, self.collator = windows, batch_size, rng, collator
        self.epoch, self.pos, self.perm = 0, 0, rng.permutation(len(windows))

    def next_batch(self) -> dict:
        rows: list[list[int]] = []
        while len(rows) < self.batch_size:
            if self.pos >= len(self.perm):
                self.epoch += 1
                self.pos = 0
                self.perm = self.rng.permutation(len(self.windows))
            take = self.perm[self.pos : self.pos + self.batch_size - len(rows)]
            self.pos += len(take)
            rows.extend(self.windows[i] for i in take)
        return self.collator([{"input_ids": w} for w in rows])

    @property
    def epochs(self) -> float:
        return round(self.epoch + self.pos / max(1, len(self.perm)), 4)


class _Run:
    """One pre-training run: set-up (model, held-out texts, windows, fixed eval masks), the two training
    phases under the step and time limits, evaluations, and the report."""

    def __init__(self, corpus: Corpus, cfg: PretrainConfig):
        self.corpus, self.cfg = corpus, cfg
        self.start = time.monotonic()
        self.budget = cfg.max_minutes * 60.0
        self.out = Path(cfg.out)
        if self.out.exists() and not cfg.overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite=True (--overwrite) to replace it")
        if not corpus.texts:
            raise ValueError("empty corpus")
        if cfg.batch_size < 1 or cfg.max_steps < 1 or cfg.max_length < 8:
            raise ValueError("batch_size and max_steps must be >= 1, max_length >= 8")
        self.device = resolve_device(cfg.device)
        self.amp_dtype = None
        if self.device == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.base = Path(cfg.base) if cfg.base else default_model_dir()
        self.name = cfg.name or self.out.name

        torch.manual_seed(cfg.seed)  # the MLM head's initialisation and dropout
        rng = np.random.default_rng(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base, local_files_only=True)
        self.model = BertForMaskedLM.from_pretrained(self.base, local_files_only=True, dtype=torch.float32)
        if cfg.max_length > self.model.config.max_position_embeddings:
            raise ValueError(f"max_length={cfg.max_length} > {self.model.config.max_position_embeddings} positions")
        self.model.to(self.device)  # type: ignore[arg-type]  # transformers types .to via @wraps: no bound self
        self._split_and_window(rng)
        collator = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=cfg.mlm_prob, seed=cfg.seed)
        eval_collator = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=cfg.mlm_prob, seed=cfg.seed + 1)
        self.eval_batches = [
            eval_collator([{"input_ids": w} for w in self.eval_windows[i : i + cfg.batch_size]])
            for i in range(0, len(self.eval_windows), cfg.batch_size)
        ]
        self.stream = _Windows(self.train_windows, cfg.batch_size, rng, collator)
        self.evals: list[dict] = []
        self.curve: list[dict] = []
        self.step = 0
        self.stopped = "max_steps"
        self.eval_seconds = self.evaluate(0, "random head")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _split_and_window(self, rng: np.random.Generator) -> None:
        """Hold out whole texts, so no window of an eval text is trained on; cut both into windows."""
        cfg, texts = self.cfg, self.corpus.texts
        n = len(texts)
        order = rng.permutation(n)
        self.n_eval = min(n - 1, max(1, int(round(cfg.eval_frac * n)))) if cfg.eval_frac > 0 and n > 1 else 0
        eval_idx, self.train_idx = np.sort(order[: self.n_eval]), np.sort(order[self.n_eval :])
        t0 = time.monotonic()
        self.train_windows = _windows(self.tokenizer, [texts[i] for i in self.train_idx], cfg)
        self.eval_windows = _windows(self.tokenizer, [texts[i] for i in eval_idx], cfg)
        if len(self.eval_windows) > cfg.eval_max_seqs:
            keep = np.sort(rng.choice(len(self.eval_windows), cfg.eval_max_seqs, replace=False))
            self.eval_windows = [self.eval_windows[i] for i in keep]
        self.tokens = sum(len(w) for w in self.train_windows)
        log.info(
            "corpus: %d texts %s → %d training windows (%d tokens), %d held-out texts → %d eval windows "
            "(tokenised in %.1fs)",
            n,
            self.corpus.counts(),
            len(self.train_windows),
            self.tokens,
            self.n_eval,
            len(self.eval_windows),
            time.monotonic() - t0,
        )
        if not self.train_windows:
            raise ValueError("no training windows")

    def seconds_left(self) -> float:
        """Of the time budget, keeping room for one more evaluation and the save."""
        return self.budget - (time.monotonic() - self.start) - self.eval_seconds - 5.0

    def evaluate(self, step: int, phase: str) -> float:
        """The held-out MLM loss, recorded; returns how long it took (0 without held-out texts: it
        returned nan, and a nan in seconds_left() switched the time bound off)."""
        if not self.eval_batches:
            return 0.0
        t = time.monotonic()
        loss = evaluate_mlm(self.model, self.eval_batches, self.device, self.amp_dtype)
        self.evals.append(
            {
                "step": step,
                "phase": phase,
                "loss": round(loss, 5),
                "perplexity": round(math.exp(loss), 3),
                "seconds": round(time.monotonic() - t, 1),
            }
        )
        log.info(
            "eval [%s] step %d: MLM loss %.4f (perplexity %.2f) in %.1fs",
            phase,
            step,
            loss,
            math.exp(loss),
            time.monotonic() - t,
        )
        return time.monotonic() - t

    def train_steps(self, params, n_steps: int, lr_at, phase: str, after_step=None) -> None:
        cfg = self.cfg
        opt = _optimizer(params, lr_at(0), cfg.weight_decay)
        window_loss, window_n, t_window = 0.0, 0, time.monotonic()
        for k in range(n_steps):
            if self.step >= cfg.max_steps:
                self.stopped = "max_steps"
                return
            if self.seconds_left() <= 0:
                self.stopped = "max_minutes"
                return
            lr = lr_at(k)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, _ = _mlm_loss(self.model, self.stream.next_batch(), self.device, self.amp_dtype)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            self.scaler.step(opt)
            self.scaler.update()
            self.step += 1
            window_loss += float(loss.detach())
            window_n += 1
            if self.step % cfg.log_every == 0 or k == n_steps - 1:
                self._log_window(phase, lr, window_loss / window_n, window_n, time.monotonic() - t_window)
                window_loss, window_n, t_window = 0.0, 0, time.monotonic()
            if after_step is not None:
                after_step(k + 1)

    def _log_window(self, phase: str, lr: float, loss: float, steps: int, seconds: float) -> None:
        minutes = (time.monotonic() - self.start) / 60
        self.curve.append(
            {"step": self.step, "phase": phase, "loss": round(loss, 5), "lr": lr, "minutes": round(minutes, 2)}
        )
        log.info(
            "%s step %d: loss %.4f lr %.2e  %.2f steps/s %.1f seq/s  %.1f min",
            phase,
            self.step,
            loss,
            lr,
            steps / seconds,
            steps * self.cfg.batch_size / seconds,
            minutes,
        )

    def train(self) -> None:
        self.model.train()
        try:
            self._train_head()
            self._train_everything()
        except KeyboardInterrupt:
            self.stopped = "interrupted"
            log.warning("interrupted at step %d: evaluating and saving what there is", self.step)

    def _train_head(self) -> None:
        """Phase 1: the fresh head learns to read the frozen encoder."""
        cfg, model = self.cfg, self.model
        head_steps = min(cfg.head_steps, cfg.max_steps)
        if head_steps <= 0:
            return
        for p in model.bert.parameters():
            p.requires_grad_(False)
        head = [(n, p) for n, p in model.cls.named_parameters() if p.requires_grad]
        self.train_steps(head, head_steps, lambda k: cfg.head_lr, "head")
        for p in model.bert.parameters():
            p.requires_grad_(True)
        self.eval_seconds = self.evaluate(self.step, "frozen encoder, trained head")

    def _train_everything(self) -> None:
        """Phase 2: everything, on a schedule re-planned from the measured speed and the time left.
        Tied decoder weights appear once in named_parameters."""
        cfg = self.cfg
        schedule = _Schedule(cfg.lr, max(1, cfg.max_steps - self.step), cfg.warmup_frac)
        # (done, time) after recent steps: the speed the plan uses, evaluations left out.
        stamps: deque[tuple[int, float]] = deque([(0, time.monotonic())], maxlen=31)

        def on_full_step(done: int) -> None:
            stamps.append((done, time.monotonic()))
            if done >= 5 and done % 5 == 0:  # re-plan from the speed of the last <= 30 steps
                (d0, t0), (d1, t1) = stamps[0], stamps[-1]
                schedule.plan(done, self.seconds_left(), (t1 - t0) / max(1, d1 - d0))
            if cfg.eval_every and done % cfg.eval_every == 0:
                self.evaluate(self.step, "full")
                stamps.clear()
                stamps.append((done, time.monotonic()))

        if self.step < cfg.max_steps and self.seconds_left() > 0:
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.train_steps(params, cfg.max_steps - self.step, schedule, "full", after_step=on_full_step)

    def finish(self) -> dict:
        """The final evaluation, the saved encoder and its report."""
        self.evaluate(self.step, "final")
        by_phase = {e["phase"]: e["loss"] for e in self.evals}
        report = {
            "name": self.name,
            "base": str(self.base),
            "device": self.device,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
            "torch_threads": torch.get_num_threads(),
            "steps": self.step,
            "stopped_by": self.stopped,
            "epochs": self.stream.epochs,
            "sequences_seen": self.step * self.cfg.batch_size,
            "minutes": round((time.monotonic() - self.start) / 60, 2),
            "corpus": {
                **self.corpus.description,
                "texts": self.corpus.counts(),
                "train_texts": int(len(self.train_idx)),
                "eval_texts": int(self.n_eval),
                "train_windows": len(self.train_windows),
                "train_tokens": int(self.tokens),
                "eval_windows": len(self.eval_windows),
            },
            "eval": self.evals,
            "eval_loss_random_head": by_phase.get("random head"),
            "eval_loss_before": by_phase.get("frozen encoder, trained head", by_phase.get("random head")),
            "eval_loss_after": by_phase.get("final"),
            "loss_curve": self.curve,
            "config": self.cfg.to_dict(),
        }
        out = self.out
        save_encoder(self.model, self.base, self.tokenizer, out, self.name, report, overwrite=self.cfg.overwrite)
        report["minutes_with_save"] = round((time.monotonic() - self.start) / 60, 2)
        (out / "pretrain.json").write_text(json.dumps(report, indent=2))
        log.info(
            "saved %s (%d steps, eval MLM loss %s → %s, %.1f min)",
            out,
            self.step,
            report["eval_loss_before"],
            report["eval_loss_after"],
            report["minutes_with_save"],
        )
        return report


def save_encoder(
    model: BertForMaskedLM, base: Path, tokenizer, out: Path, name: str, report: dict, overwrite: bool = False
) -> None:
    """Save the adapted encoder (no MLM head) as a complete BERT model directory.

    The MLM model's encoder has no pooler; it is put into a copy of the base model so the saved
    checkpoint is complete (a missing pooler would be re-initialised at random on every load, and
    the random weights would change the encoder's fingerprint each time)."""
    encoder = AutoModel.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.bert.state_dict().items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"encoder weights do not fit the base model: missing {missing}, unexpected {unexpected}")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    encoder.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    texts = ", ".join(f"{n} {s}" for s, n in report["corpus"]["texts"].items())
    # The title line is the encoder's name (TextEncoder reads it), so the cache tells it apart.
    (tmp / "README.md").write_text(
        f"# {name}\n\n{_model_name(Path(base))} after in-domain masked-language-model training on "
        f"MyAnimeList text (anime2vec `pretrain`): {report['steps']} steps on {report['device']}, corpus "
        f"{texts} texts; held-out MLM loss {report['eval_loss_before']} (trained head, frozen encoder) → "
        f"{report['eval_loss_after']}. Mean pooling + L2 as the base. Details: pretrain.json.\n",
        encoding="utf-8",
    )
    (tmp / "pretrain.json").write_text(json.dumps(report, indent=2))
    for f in tmp.iterdir():  # safetensors writes 0600; the directory is meant to be shipped and shared
        f.chmod(0o644)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def encode_catalogue(
    encoder, data, recipe: str = "default", cache_path: Path | None = None, progress: bool = False
) -> dict:
    """Encode the pipeline's item texts (every item of the evaluation universe, `recipe`) with
    `encoder` into the shared encoding cache, so a pipeline run with this encoder finds them."""
    from anime2vec.data.dataset import build_dataset
    from anime2vec.data.text import RECIPES, build_texts
    from anime2vec.features.cache import EncodingCache, encode_cached
    from anime2vec.paths import default_cache_dir

    ds = build_dataset(data.catalog, data.interactions, seed=0)  # the universe does not depend on the seed
    texts = build_texts(data.catalog.loc[ds.item_ids], RECIPES.get(recipe, recipe)).tolist()
    path = Path(cache_path) if cache_path else default_cache_dir() / "encodings.sqlite"
    t = time.monotonic()
    with EncodingCache(path) as cache:
        vectors = encode_cached(encoder, texts, cache, progress=progress)
        stats = cache.last_stats
    assert stats is not None  # set by encode_cached
    return {
        "encoder": encoder.name,
        "fingerprint": encoder.fingerprint,
        "dim": encoder.dim,
        "texts": len(texts),
        "hits": stats.hits,
        "encoded": stats.encoded,
        "cache": str(path),
        "seconds": round(time.monotonic() - t, 1),
        "vectors_shape": list(vectors.shape),
    }
