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

from runtime.guard.features import DENSE_NAMES, LEXICON, N_HASH, Features, StaticEmbedding, decode_escapes, featurize
from runtime.guard.base import Verdict
from runtime.guard.encoder import MAX_TOKENS as ENC_MAX_TOKENS, STRIDE as ENC_STRIDE, Encoder, token_windows
from runtime.guard.multilingual import SEGMENT_MARGIN, SEGMENTS_READ, MultilingualHead
from vault.errors import GuardError

__all__ = [
    "CATEGORIES",
    "CATEGORY_NAMES",
    "WEIGHTS_PATH",
    "WEIGHTS_SHA256",
    "ScreenModel",
    "TextScore",
    "load_model",
    "read_weights",
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
WEIGHTS_SHA256 = "59d1519b0eb1a4577e770525446816a6695065b8fd31d6b295e8f59670b16c54"

WINDOW_WORDS = 48  # sliding window (words) of the n-gram part for long texts; about one paragraph
MAX_ENCODER_WINDOWS = 4  # encoder windows per text (~500 tokens; ~25 ms each on one core, 6 layers); longer texts: where the n-gram part scores highest
WINDOW_STRIDE = 16
# the multi-window length term grows with log2(windows) up to this many windows (~1,500 tokens): the
# n-gram part reads every window of a text, not just the MAX_ENCODER_WINDOWS the encoder reads
LENGTH_CAP_WINDOWS = 16
_CHUNK_CHARS = 100_000  # texts longer than this are screened chunk by chunk (bounded memory)
_OBFUSCATED = DENSE_NAMES.index("obfuscated")  # featurize's flag: normalize undid an obfuscation (an escape among them)

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
    start: int  # word span [start, end) of the deciding n-gram window
    end: int
    features: Features
    pooled: np.ndarray | None = None  # the encoder's mean hidden state of its deciding window
    parts: tuple[float, float] = (0.0, 0.0)  # the n-gram part's and the encoder's own logits
    windows: int = 1  # encoder token windows the text spans (before the MAX_ENCODER_WINDOWS cap)
    gated: bool = False  # lifted to the threshold by the jailbreak-wrapper gate (:class:`WrapperGate`)
    multilingual: np.ndarray | None = None  # lifted by the non-Latin reader (:mod:`multilingual`): its deciding window
    # a non-Latin text lifted because the reader's own logit cleared its cut (its logit is pinned at the threshold)
    reader_cut: bool = False


@dataclass(frozen=True)
class WrapperGate:
    """A linear detector of jailbreak framing ("you are DAN", "no restrictions", "ignore your rules"),
    trained on strong wrapper templates around requests of *both* labels, so it reads the framing and not
    the request. Alone it would block persona prompts ("You are a calculator"); as a gate it only lifts a
    text whose stacked logit is already within ``delta`` of the threshold.

    Its input is the text's hashed features summed per feature id and L2-normalised, plus the dense
    jailbreak signals.
    """

    w: np.ndarray  # (N_HASH,) float32
    w_dense: np.ndarray  # (len(DENSE_NAMES),) float64
    bias: float
    threshold: float  # the detector's own cut (picked on dev benign texts)
    delta: float  # how far below the screen's threshold a text may be and still be lifted

    def logit(self, feats: Features) -> float:
        dense = float(self.w_dense @ feats.dense) + self.bias
        if feats.idx.size == 0:
            return dense
        ids, inverse = np.unique(feats.idx, return_inverse=True)
        counts = np.bincount(inverse, weights=feats.val)
        return float(self.w[ids].astype(np.float64) @ counts) / float(np.linalg.norm(counts)) + dense


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(x, 60.0), -60.0)))


class ScreenModel:
    """The shipped classifier. Build with :func:`load_model` (checks the pinned digest).

    Two parts whose logits add up, both evaluated per word span: a linear model over the
    hashed n-grams (``harm.*``) and a one-hidden-layer MLP (``mlp.*``) over the span's mean
    static WordPiece vector, the whole text's jailbreak signals and the span's hazard-lexicon
    counts. The category head (``cat.*``) reads the MLP's hidden layer.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str], *, int8: bool = True) -> None:
        """``int8``: the encoder's layers as the calibrated int8 graph (run time); else its float32 reference."""
        try:
            self.w = tensors["harm.w"].astype(np.float32)
            self.w_dense = tensors["harm.w_dense"].astype(np.float64)
            self.b = float(tensors["harm.b"][0])
            vocab = bytes(tensors["static.vocab"].astype(np.uint8)).decode("utf-8").split("\n")
            self.embedding = StaticEmbedding(vocab, tensors["static.table"])
            self.w1 = tensors["mlp.w1"].astype(np.float32)
            self.b1 = tensors["mlp.b1"].astype(np.float32)
            self.w2 = tensors["mlp.w2"].astype(np.float32)
            self.b2 = float(tensors["mlp.b2"][0])
            self.cat_w = tensors["cat.w"].astype(np.float32)
            self.cat_b = tensors["cat.b"].astype(np.float32)
            self.encoder = Encoder(tensors, self.embedding, int(meta["encoder_heads"]), int8=int8)
            stack = json.loads(meta["stack"])
            self.stack_cheap, self.stack_enc, self.stack_bias, self.stack_length = (
                float(stack[k]) for k in ("cheap", "encoder", "bias", "length"))
            # texts of several encoder windows: their own weights (absent in older files: the same as chat-sized)
            multi = stack.get("multi", {k: stack[k] for k in ("cheap", "encoder", "bias", "length")})
            self.multi_cheap, self.multi_enc, self.multi_bias, self.multi_length = (
                float(multi[k]) for k in ("cheap", "encoder", "bias", "length"))
            self.multi_cap = int(multi.get("cap", MAX_ENCODER_WINDOWS))  # older files: the encoder's window cap
            self.threshold = float(meta["threshold"])
            self.output_threshold = float(meta["output_threshold"])
            self.context_margin = float(meta["context_margin"])
            self.version = str(meta["version"])
            self.gate = None
            if "gate.w" in tensors:  # files before the wrapper gate have none
                gate = json.loads(meta["gate"])
                self.gate = WrapperGate(tensors["gate.w"].astype(np.float32), tensors["gate.w_dense"].astype(np.float64),
                                        float(gate["bias"]), float(gate["threshold"]), float(gate["delta"]))
            self.multilingual = None
            if "multilingual" in meta:  # files before the non-Latin reader have none
                ml = json.loads(meta["multilingual"])
                calibration = {k[len("ml."):]: v.astype(np.float32) for k, v in tensors.items()
                               if k.startswith("ml.") and ".calib." in k}
                self.multilingual = MultilingualHead(
                    *(tensors[f"ml.{k}"].astype(np.float32) for k in ("w1", "b1", "w2", "b2", "cat_w", "cat_b")),
                    float(ml["threshold"]), float(ml["min_share"]),
                    int(ml["layers"]), calibration if int8 else None,
                    float(ml["latin_threshold"]), float(ml["latin_min_prob"]),
                    tuple(float(v) for v in ml["latin_stack"]) if "latin_stack" in ml else None)
        except (KeyError, ValueError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GuardError(f"guard weights are incomplete: {exc}") from None
        n_in = self.embedding.dims + len(DENSE_NAMES) + len(LEXICON)
        hidden = self.b1.shape[0]
        if self.w.shape != (N_HASH,) or self.w1.shape != (n_in, hidden) or self.w2.shape != (hidden,) \
                or self.cat_w.shape != (hidden, len(CATEGORIES)) or self.cat_b.shape != (len(CATEGORIES),):
            raise GuardError("guard weights have the wrong shape for this version of vault")
        if self.w_dense.shape != (len(DENSE_NAMES),) or json.loads(meta.get("dense", "[]")) != list(DENSE_NAMES):
            raise GuardError("guard weights were trained with other dense features")
        if self.gate is not None and (self.gate.w.shape != (N_HASH,) or self.gate.w_dense.shape != (len(DENSE_NAMES),)):
            raise GuardError("guard weights have the wrong shape for this version of vault")

    def hidden(self, feats: Features, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The MLP's hidden layer for each word span [start, end): (spans, hidden)."""
        return np.maximum(span_inputs(self.embedding, feats, starts, ends) @ self.w1 + self.b1, 0.0)

    # -- scoring -------------------------------------------------------------------------------
    def score(self, text: str, *, multilingual: bool = True) -> TextScore:
        """Harm logit of ``text``: the two parts' logits (each a max over its windows), stacked.

        ``multilingual``: a text in a non-Latin script that the parts pass may be lifted to the threshold by the
        multilingual reader (:class:`MultilingualHead`); a Latin-script text in another language than English (by the
        language identifier) is judged by the reader and the parts weighed together, which may lift it or lower it
        (:meth:`MultilingualHead.latin_logit`; older weights: lifted like the others); an English text that the parts
        pass is lifted when a segment of it in another language, screened alone, clears the threshold by
        SEGMENT_MARGIN, or is in a non-Latin script and lifted by the reader at its own cut
        (:meth:`MultilingualHead.foreign_segments`); so is a Latin-script text in another language that the Latin
        stack passes, by its segments in a non-Latin script. Off where this decides nothing (the context
        score, which has a margin subtracted, and the output screen's higher threshold).
        """
        return self._score(text, multilingual, segments=multilingual)

    def _score(self, text: str, multilingual: bool, *, segments: bool) -> TextScore:
        if len(text) > _CHUNK_CHARS:
            parts = [text[i : i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS)]
            return max((self._score(p, multilingual, segments=segments) for p in parts), key=lambda s: s.logit)
        feats = featurize(text)
        starts, ends = word_spans(feats.n_words)
        cheap = self.cheap_logits(feats, starts, ends)
        i = int(np.argmax(cheap))
        windows, total = self._encoder_windows(feats, starts, ends, cheap)
        pooled = self.encoder.pooled(windows)
        enc = self.encoder.harm_logits(pooled)
        j = int(np.argmax(enc))
        # a max over more windows is higher on benign text too (the n-gram part's most of all: it reads
        # every 48-word window): longer texts have their own weights, and the bar rises with
        # log2(windows), up to multi_cap windows (log2(1) = 0 for chat-sized texts)
        if total == 1:
            w_cheap, w_enc, bias, length = self.stack_cheap, self.stack_enc, self.stack_bias, self.stack_length
        else:
            w_cheap, w_enc, bias, length = self.multi_cheap, self.multi_enc, self.multi_bias, self.multi_length
        logit = w_cheap * float(cheap[i]) + w_enc * float(enc[j]) + bias
        logit -= length * math.log2(min(total, self.multi_cap))
        # a jailbreak framing around a request the parts read only weakly (another language, ordinary words)
        gated = (self.gate is not None and self.threshold - self.gate.delta <= logit < self.threshold
                 and self.gate.logit(feats) >= self.gate.threshold)
        if gated:
            logit = self.threshold
        # a text in a script the encoder reads as [UNK] (Cyrillic, CJK, Arabic, Indic, ...), or in Latin script but
        # not in English (the parts read English): a second, multilingual reader
        lifted, reader_cut = None, False
        ml = self.multilingual
        if ml is not None and multilingual and feats.dense[_OBFUSCATED]:
            # the reader and the language identifier read escaped blobs decoded, as the parts do (featurize found any:
            # the text is within normalize's limit, so without the flag there is nothing to decode)
            text = decode_escapes(text)[0]
        kind = ml.kind(text) if multilingual and ml is not None else None
        if kind == "latin" and ml.latin_stack is not None:
            # a Latin-script text in another language: the English parts read it only partly, so both readers are
            # weighed together (fitted on dev), and the stack decides either way, up to a cap: it lifts and it vetoes
            ml_logit, ml_pooled = ml.score(text)
            stacked = ml.latin_logit(logit, ml_logit, self.threshold)
            if stacked >= self.threshold > logit:
                lifted = ml_pooled
            logit = stacked
        elif kind is not None and logit < self.threshold:
            ml_logit, ml_pooled = ml.score(text)
            if ml_logit >= ml.kind_cut(kind):
                logit, lifted, reader_cut = self.threshold, ml_pooled, True
        if segments and ml is not None and kind != "non_latin" and logit < self.threshold:
            # an English text around a request in another language, or a Latin-script text in another language
            # around one in a non-Latin script: each such segment screened alone (never searched for segments again),
            # and the first that clears the bar lifts the text. The bar is SEGMENT_MARGIN above the threshold for the
            # parts' and the Latin stack's logits; a non-Latin segment that the reader lifted at its own cut counts as
            # it is (its logit is pinned at the threshold, so no margin could be cleared; the reader's cut already
            # holds its FPR: docs/experiments)
            for segment in ml.foreign_segments(text, within=kind)[:SEGMENTS_READ]:
                alone = self._score(segment, True, segments=False)
                if alone.reader_cut or alone.logit >= self.threshold + SEGMENT_MARGIN:
                    lifted_logit = self.threshold if alone.reader_cut else alone.logit - SEGMENT_MARGIN
                    return TextScore(lifted_logit, int(starts[i]), int(ends[i]), feats, alone.pooled,
                                     (float(cheap[i]), float(enc[j])), total, gated, alone.multilingual)
        return TextScore(logit, int(starts[i]), int(ends[i]), feats, pooled[j], (float(cheap[i]), float(enc[j])), total,
                         gated, lifted, reader_cut)

    def tokens(self, text: str) -> int:
        """WordPiece tokens the encoder would read for ``text`` (before windowing)."""
        return len(self.encoder.ids(featurize(text).words))

    def cheap_logits(self, feats: Features, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Logit of the n-gram + static-vector part on each word span."""
        n = feats.n_words
        contrib = self.w[feats.idx] * feats.val
        cs = np.concatenate(([0.0], np.cumsum(np.bincount(feats.pos, weights=contrib, minlength=n))))
        cc = np.concatenate(([0.0], np.cumsum(np.bincount(feats.pos, weights=feats.val, minlength=n))))
        linear = (cs[ends] - cs[starts]) / np.sqrt(np.maximum(cc[ends] - cc[starts], 1.0))
        return float(feats.dense @ self.w_dense) + self.b + linear + self.hidden(feats, starts, ends) @ self.w2 + self.b2

    def _encoder_windows(self, feats: Features, starts: np.ndarray, ends: np.ndarray,
                         cheap: np.ndarray) -> tuple[list[list[int]], int]:
        """The encoder's token windows (past MAX_ENCODER_WINDOWS, those where the n-gram part scores
        highest) and how many windows the whole text spans."""
        per_word = [self.encoder.vocab.word_ids(w) for w in feats.words]
        ids = [i for p in per_word for i in p]
        windows = token_windows(ids, self.encoder.cls_id, self.encoder.sep_id)
        if len(windows) <= MAX_ENCODER_WINDOWS:
            return windows, len(windows)
        # word index of each token, then each token window's best overlapping n-gram window
        word_of_tok = np.repeat(np.arange(len(per_word)), [len(p) for p in per_word])
        tok_starts = np.arange(len(windows)) * ENC_STRIDE
        w_lo = word_of_tok[np.minimum(tok_starts, len(ids) - 1)]
        w_hi = word_of_tok[np.minimum(tok_starts + ENC_MAX_TOKENS - 3, len(ids) - 1)] + 1
        prio = np.array([cheap[(starts < hi) & (ends > lo)].max(initial=-1e9) for lo, hi in zip(w_lo, w_hi)])
        keep = sorted(np.argsort(-prio, kind="stable")[:MAX_ENCODER_WINDOWS].tolist())
        return [windows[k] for k in keep], len(windows)

    def category(self, scored: TextScore) -> tuple[str, float]:
        """Most likely hazard category: the encoder's category head on its deciding window (the non-Latin
        reader's, when it decided)."""
        if scored.multilingual is not None and self.multilingual is not None:
            logits = self.multilingual.category_logits(scored.multilingual)
        elif scored.pooled is not None:
            logits = self.encoder.category_logits(scored.pooled[None, :])[0]
        else:
            logits = self.hidden(scored.features, np.array([scored.start]), np.array([scored.end]))[0] @ self.cat_w + self.cat_b
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


def word_spans(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-gram part's windows over ``n`` words: the whole text, or WINDOW_WORDS every WINDOW_STRIDE."""
    if n <= WINDOW_WORDS:
        return np.array([0]), np.array([n])
    starts = np.arange(0, n - WINDOW_WORDS + WINDOW_STRIDE, WINDOW_STRIDE)
    return starts, np.minimum(starts + WINDOW_WORDS, n)


def span_inputs(embedding: StaticEmbedding, feats: Features, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """MLP input of each word span: [mean static vector, jailbreak signals, lexicon counts] (float32).

    Lexicon counts are per span (a hazard word elsewhere in a long text does not count), squashed
    like the dense signals (min(count, 3) / 3); the jailbreak signals are whole-text.
    """
    starts, ends = np.asarray(starts), np.asarray(ends)
    pooled = embedding.pooled(feats.words, starts, ends)
    n_groups = len(LEXICON)
    counts = np.zeros((feats.n_words + 1, n_groups))
    if feats.lex_group.size:
        np.add.at(counts, (feats.lex_pos + 1, feats.lex_group), 1.0)
    counts = np.cumsum(counts, axis=0)
    lex = np.minimum(counts[ends] - counts[starts], 3.0) / 3.0
    dense = np.broadcast_to(feats.dense, (len(starts), feats.dense.size))
    return np.concatenate([pooled, dense, lex], axis=1).astype(np.float32)


def read_weights(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a weights file's bytes (verify them first: this parses).

    safetensors.numpy.load() drops ``__metadata__``; it is read from the header here.

    Raises:
        ValueError, KeyError, json.JSONDecodeError: malformed file.
    """
    header_len = int.from_bytes(data[:8], "little")
    return st_load(data), json.loads(data[8 : 8 + header_len]).get("__metadata__", {})


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, sha256: str) -> ScreenModel:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise GuardError(f"failed to read guard weights {path}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise GuardError("guard weights do not match their pinned sha256; reinstall vault")
    try:
        tensors, meta = read_weights(data)
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
        ctx = model.score("\n".join(systems[-1:] + users[-3:]), multilingual=False)
        ctx = TextScore(ctx.logit - model.context_margin, ctx.start, ctx.end, ctx.features)
        if ctx.logit > scored.logit:
            scored = ctx
    return model.verdict(scored, model.threshold, "prompt")


def screen_text_output(model: ScreenModel, text: str) -> Verdict:
    """Judge generated text: the classifier on the text, raised when it reads like a hazardous procedure."""
    scored = model.score(text, multilingual=False)
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


def length_bucket(tokens: int) -> str:
    """chat (< 127 WordPiece tokens: one encoder window), mid (127-999) or long (1,000+)."""
    return "chat" if tokens < ENC_MAX_TOKENS - 1 else "mid" if tokens < 1000 else "long"


def evaluate(model: ScreenModel, rows: Sequence[Mapping[str, Any]], *, by_length: bool = False) -> list[dict[str, Any]]:
    """Per-set recall (harmful sets) or false-positive rate (benign sets) and latency.

    Latency is wall time of :func:`screen_messages` per prompt, in this process, measured
    once per prompt (the caller decides threads); tokens are the encoder's WordPiece tokens.
    ``by_length`` splits every set by :func:`length_bucket` (``"direct [chat]"``, ...).
    """
    by_set: dict[str, list[tuple[Mapping[str, Any], int]]] = {}
    for row in rows:
        n_tokens = model.tokens(str(row["prompt"]))
        name = f"{row['set']} [{length_bucket(n_tokens)}]" if by_length else str(row["set"])
        by_set.setdefault(name, []).append((row, n_tokens))
    table = []
    for name in sorted(by_set):
        items = [row for row, _ in by_set[name]]
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
        tokens = np.array([n for _, n in by_set[name]])
        table.append({
            "set": name, "n": len(items), "kind": "harmful" if harmful else "benign",
            "metric": "recall" if harmful else "fpr", "value": blocked / len(items),
            "category_accuracy": (cat_hits / cat_total) if cat_total else None,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "median_tokens": float(np.median(tokens)),
        })
    return table
