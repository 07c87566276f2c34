"""Prompt and output screening: a hashed n-gram linear classifier with a hazard-category head.

The model (trained by ``runtime/guard/train_screen.py``, shipped in ``weights/``) is a
logistic harm score plus a softmax over the 14 MLCommons hazard categories, both linear
in the features of :mod:`runtime.guard.features`. Because it is linear, one pass over a
text gives the score of the whole text and of every sliding window of it (prefix sums),
so a harmful request buried inside 1,000+ tokens of benign text is scored on its own
window rather than diluted. A text longer than one window is scored as the maximum
over its windows.

Its weights are independent of any adapter and of the base model: nothing here passes
through the weights a personal adapter can change (an abliteration adapter cannot
blind it). They are pinned by sha256 and checked at load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import load as st_load

from runtime.guard.features import DENSE_NAMES, LEXICON, N_HASH, Features, featurize
from runtime.guard.base import Verdict
from vault.errors import GuardError

__all__ = [
    "CATEGORIES",
    "CATEGORY_NAMES",
    "WEIGHTS_PATH",
    "WEIGHTS_SHA256",
    "ScreenModel",
    "TextScore",
    "load_model",
    "screen_messages",
    "screen_text_output",
    "HELDOUT_PATH",
    "load_heldout",
    "evaluate",
]

CATEGORIES: tuple[str, ...] = tuple(f"S{i}" for i in range(1, 15))
CATEGORY_NAMES: dict[str, str] = {
    "S1": "violent crimes", "S2": "non-violent crimes", "S3": "sex-related crimes",
    "S4": "child sexual exploitation", "S5": "defamation", "S6": "specialized advice",
    "S7": "privacy", "S8": "intellectual property", "S9": "indiscriminate weapons",
    "S10": "hate", "S11": "suicide and self-harm", "S12": "sexual content",
    "S13": "elections", "S14": "code interpreter abuse",
}

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "screen.safetensors"
HELDOUT_PATH = Path(__file__).resolve().parent / "data" / "heldout.jsonl"
# Pinned digest of the shipped weights; train_screen.py prints the new one after training.
WEIGHTS_SHA256 = "b840e9b0725db7e4aeaaf4dd7b790643b25492ca91a6fd745326e780242382da"

WINDOW_WORDS = 48  # sliding window (words) for long texts; about one paragraph
WINDOW_STRIDE = 16
_CHUNK_CHARS = 100_000  # texts longer than this are screened chunk by chunk (bounded memory)

# Output screen: generated text that reads like a procedure for a hazard. These raise the
# output logit; they never lower it. Kept narrow: a recipe or a shell tutorial has steps
# too, so steps alone are not enough, they must co-occur with a hazard term.
_STEPS = re.compile(r"(?im)^\s*(?:step\s*\d+|\d+[.)]\s|[-*]\s)|\b(?:first|next|then|finally),")
_HAZARD = re.compile("|".join(f"(?:{p})" for name, p in LEXICON if name in ("weapon", "poison", "drugs", "cyber")))
_OUTPUT_PATTERN_BONUS = 1.5


@dataclass(frozen=True)
class TextScore:
    """Harm logit of a text (max over whole text and windows) and the span that produced it."""

    logit: float
    start: int  # word span [start, end) of the deciding window
    end: int
    features: Features


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(x, 60.0), -60.0)))


class ScreenModel:
    """The shipped classifier. Build with :func:`load_model` (checks the pinned digest)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> None:
        try:
            self.w = tensors["harm.w"].astype(np.float32)
            self.w_dense = tensors["harm.w_dense"].astype(np.float64)
            self.b = float(tensors["harm.b"][0])
            self.cat_w = tensors["cat.w"]  # (N_HASH, 14) float16; gathered rows are cast on use
            self.cat_w_dense = tensors["cat.w_dense"].astype(np.float64)
            self.cat_b = tensors["cat.b"].astype(np.float64)
            self.threshold = float(meta["threshold"])
            self.output_threshold = float(meta["output_threshold"])
            self.context_margin = float(meta["context_margin"])
            self.version = str(meta["version"])
        except (KeyError, ValueError) as exc:
            raise GuardError(f"guard weights are incomplete: {exc}") from None
        if self.w.shape != (N_HASH,) or self.cat_w.shape != (N_HASH, len(CATEGORIES)):
            raise GuardError("guard weights have the wrong shape for this version of vault")
        if self.w_dense.shape != (len(DENSE_NAMES),) or json.loads(meta.get("dense", "[]")) != list(DENSE_NAMES):
            raise GuardError("guard weights were trained with other dense features")

    # -- scoring -------------------------------------------------------------------------------
    def score(self, text: str) -> TextScore:
        """Harm logit of ``text``: the whole text if it fits one window, else the max over its windows."""
        if len(text) > _CHUNK_CHARS:
            parts = [text[i : i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS)]
            return max((self.score(p) for p in parts), key=lambda s: s.logit)
        feats = featurize(text)
        dense_term = float(feats.dense @ self.w_dense) + self.b
        n = feats.n_words
        if n == 0:
            return TextScore(dense_term, 0, 0, feats)
        contrib = self.w[feats.idx] * feats.val
        per_word = np.bincount(feats.pos, weights=contrib, minlength=n)
        counts = np.bincount(feats.pos, weights=feats.val, minlength=n)
        if n <= WINDOW_WORDS:
            return TextScore(dense_term + per_word.sum() / math.sqrt(max(counts.sum(), 1.0)), 0, n, feats)
        # a long text is exactly its windows (the model is trained on window-sized text)
        cs = np.concatenate(([0.0], np.cumsum(per_word)))
        cc = np.concatenate(([0.0], np.cumsum(counts)))
        starts = np.arange(0, n - WINDOW_WORDS + WINDOW_STRIDE, WINDOW_STRIDE)
        ends = np.minimum(starts + WINDOW_WORDS, n)
        logits = dense_term + (cs[ends] - cs[starts]) / np.sqrt(np.maximum(cc[ends] - cc[starts], 1.0))
        i = int(np.argmax(logits))
        return TextScore(float(logits[i]), int(starts[i]), int(ends[i]), feats)

    def category(self, scored: TextScore) -> tuple[str, float]:
        """Most likely hazard category of the deciding span, with its probability."""
        feats = scored.features
        mask = (feats.pos >= scored.start) & (feats.pos < scored.end)
        idx, val = feats.idx[mask], feats.val[mask]
        logits = self.cat_b + feats.dense @ self.cat_w_dense
        if idx.size:
            logits = logits + (val @ self.cat_w[idx].astype(np.float64)) / math.sqrt(val.sum())
        p = np.exp(logits - logits.max())
        p /= p.sum()
        k = int(np.argmax(p))
        return CATEGORIES[k], float(p[k])

    def verdict(self, scored: TextScore, threshold: float, reason: str) -> Verdict:
        """Turn a logit into a Verdict; ``score`` = sigmoid(logit - threshold), blocked iff >= 0.5."""
        score = _sigmoid(scored.logit - threshold)
        if score < 0.5:
            return Verdict(allowed=True, category=None, score=score)
        category, _ = self.category(scored)
        return Verdict(allowed=False, category=category, score=score, reason=f"{reason}: {CATEGORY_NAMES[category]}")


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, sha256: str) -> ScreenModel:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise GuardError(f"failed to read guard weights {path}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise GuardError("guard weights do not match their pinned sha256; reinstall vault")
    try:
        tensors = st_load(data)
        # safetensors.numpy.load() drops __metadata__; read it from the (already verified) header
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise GuardError(f"guard weights are not a valid safetensors file: {exc}") from None
    return ScreenModel(tensors, meta)


def load_model(path: Path | None = None, sha256: str | None = None) -> ScreenModel:
    """Load and verify the classifier. Defaults: the shipped file and its pinned digest.

    Raises:
        GuardError: missing file, digest mismatch, or malformed weights.
    """
    return _load_cached(str(path or WEIGHTS_PATH), sha256 or WEIGHTS_SHA256)


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # OpenAI content parts: [{"type": "text", "text": ...}]
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return str(content)


def screen_messages(model: ScreenModel, messages: Sequence[Mapping[str, Any]]) -> Verdict:
    """Judge the last user turn in its context (earlier user turns and the system prompt).

    The last turn is scored alone; the context (system prompt and the last three user
    turns joined) is scored too, minus a margin, so a request split over turns or set up
    by a jailbreak system prompt is still caught, while an old harmless turn cannot make
    a new one look harmful.
    """
    users = [_content(m) for m in messages if m.get("role") == "user"]
    if not users:
        return Verdict(allowed=True, category=None, score=0.0)
    scored = model.score(users[-1])
    systems = [_content(m) for m in messages if m.get("role") == "system"]
    if len(users) > 1 or systems:
        ctx = model.score("\n".join(systems[-1:] + users[-3:]))
        ctx = TextScore(ctx.logit - model.context_margin, ctx.start, ctx.end, ctx.features)
        if ctx.logit > scored.logit:
            scored = ctx
    return model.verdict(scored, model.threshold, "prompt")


def screen_text_output(model: ScreenModel, text: str) -> Verdict:
    """Judge generated text: the classifier on the text, raised when it reads like a hazardous procedure."""
    scored = model.score(text)
    if _STEPS.search(text) and _HAZARD.search(text.casefold()):
        scored = TextScore(scored.logit + _OUTPUT_PATTERN_BONUS, scored.start, scored.end, scored.features)
    return model.verdict(scored, model.output_threshold, "output")


def load_heldout(path: Path | None = None) -> list[dict[str, Any]]:
    """The shipped held-out prompts (written by train_screen.py): dicts with set, prompt, label, category."""
    path = path or HELDOUT_PATH
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise GuardError(f"failed to read held-out data {path}: {exc.strerror}") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            rows.append({"set": str(row["set"]), "prompt": str(row["prompt"]), "label": int(row["label"]),
                         "category": row.get("category")})
        except (ValueError, KeyError, TypeError):
            raise GuardError(f"held-out data line {n} is malformed") from None
    return rows


def evaluate(model: ScreenModel, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-set recall (harmful sets) or false-positive rate (benign sets) and latency.

    Latency is wall time of :func:`screen_messages` per prompt, in this process, measured
    once per prompt (the caller decides threads); tokens are approximated as words * 1.3.
    """
    by_set: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_set.setdefault(str(row["set"]), []).append(row)
    table = []
    for name in sorted(by_set):
        items = by_set[name]
        blocked, times, cat_hits, cat_total = 0, [], 0, 0
        for row in items:
            t0 = time.perf_counter()
            verdict = screen_messages(model, [{"role": "user", "content": row["prompt"]}])
            times.append(time.perf_counter() - t0)
            blocked += not verdict.allowed
            if not verdict.allowed and row.get("category") and row["label"] == 1:
                cat_total += 1
                cat_hits += verdict.category == row["category"]
        harmful = all(int(r["label"]) == 1 for r in items)
        ms = np.array(times) * 1000.0
        words = np.array([len(str(r["prompt"]).split()) for r in items])
        table.append({
            "set": name, "n": len(items), "kind": "harmful" if harmful else "benign",
            "metric": "recall" if harmful else "fpr", "value": blocked / len(items),
            "category_accuracy": (cat_hits / cat_total) if cat_total else None,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "median_tokens": float(np.median(words) * 1.3),
        })
    return table
