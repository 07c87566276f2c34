"""A small BERT encoder in numpy: the guard's contextual reader of prompt windows.

The screen's transformer is the first layers of all-MiniLM-L6-v2 (Apache-2.0), fine-tuned by
``train_screen.py`` to tell harmful requests from benign ones, with a linear harm head and a
hazard-category head on the mean of its last hidden states. It runs on CPU without torch, on
windows of at most ``MAX_TOKENS`` WordPiece tokens: the transformer layers as an int8 onnxruntime
graph (:mod:`encoder_int8`, the run-time path), or as the float32 numpy reference
(:meth:`Encoder.reference_forward`) that calibrates the int8 graph and that tests hold it to.

Tokenisation is the uncased BERT WordPiece over the words of :func:`features.featurize`
(normalised: leetspeak, spacing and zero-width tricks undone; punctuation dropped), the same
function the training script uses, so run time sees exactly what training saw.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import numpy as np

from runtime.guard import encoder_int8
from runtime.guard.features import StaticEmbedding

__all__ = ["MAX_TOKENS", "STRIDE", "Encoder", "bert_layers", "token_windows"]

MAX_TOKENS = 128  # per window, [CLS] and [SEP] included
STRIDE = 96  # tokens between window starts: windows overlap by 32 tokens
_LN_EPS = 1e-12
_MEMO_WINDOWS = 256


def token_windows(ids: Sequence[int], cls_id: int, sep_id: int) -> list[list[int]]:
    """[CLS] + up to MAX_TOKENS-2 ids + [SEP] per window; a long text is covered with overlap."""
    body = MAX_TOKENS - 2
    ids = list(ids)
    if len(ids) <= body:
        return [[cls_id, *ids, sep_id]]
    return [[cls_id, *ids[s : s + body], sep_id] for s in range(0, len(ids) - body + STRIDE, STRIDE)]


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + _LN_EPS) * g + b


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), enough for BERT's exact GELU in float32
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * np.exp(-a * a)
    return s * y


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def bert_layers(x: np.ndarray, bias: np.ndarray, layers: Sequence[Mapping[str, np.ndarray]], n_heads: int,
                observe: Callable[[int, str, np.ndarray], None] | None = None) -> np.ndarray:
    """BERT's transformer layers in float32 numpy: last hidden states (windows, tokens, dims) of the embedding
    output ``x`` under the additive attention ``bias`` (windows, 1, 1, tokens). ``layers`` hold (in, out)
    weights keyed as :data:`encoder_int8.KINDS`; ``observe(layer, kind, x)`` sees each linear layer's input."""
    n, length, dims = x.shape
    d = dims // n_heads
    scale = np.float32(1.0 / math.sqrt(d))
    for li, L in enumerate(layers):
        if observe:
            observe(li, "qkv", x)
        qkv = x @ L["qkv"] + L["qkv_b"]  # (n, len, 3*dims)
        q, k, v = (qkv[..., j * dims : (j + 1) * dims].reshape(n, length, n_heads, d).transpose(0, 2, 1, 3)
                   for j in range(3))
        att = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
        att = np.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(n, length, dims)
        if observe:
            observe(li, "o", ctx)
        x = _layer_norm(ctx @ L["o"] + L["o_b"] + x, L["ln1_g"], L["ln1_b"])
        if observe:
            observe(li, "i", x)
        h = _gelu(x @ L["i"] + L["i_b"])
        if observe:
            observe(li, "f", h)
        x = _layer_norm(h @ L["f"] + L["f_b"] + x, L["ln2_g"], L["ln2_b"])
    return x


class Encoder:
    """BERT layers + mean pooling + harm and category heads, from ``enc.*`` tensors.

    Tensor names follow Hugging Face's BertModel (``enc.embeddings.word_embeddings.weight``,
    ``enc.encoder.layer.N.attention.self.query.weight``, ...); linear weights are (out, in).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], vocab: StaticEmbedding, n_heads: int, *,
                 int8: bool = True) -> None:
        """``vocab``: the WordPiece vocabulary (and its word cache) shared with the static-vector part.
        ``int8``: run the layers as the int8 graph (needs the calibration tensors); else the float32
        numpy reference (calibration itself, tests).

        Raises:
            ValueError: malformed weights, or ``int8`` without calibration.
        """
        def t(name: str) -> np.ndarray:
            return np.asarray(tensors["enc." + name], dtype=np.float32)

        self.vocab = vocab
        self.cls_id, self.sep_id = self.vocab.index["[CLS]"], self.vocab.index["[SEP]"]
        # int8 rows with a float32 scale per row (the bulk of the weights); dequantised per lookup
        self.word_q = np.asarray(tensors["enc.embeddings.word_embeddings.q"], dtype=np.int8)
        self.word_scale = np.asarray(tensors["enc.embeddings.word_embeddings.scale"], dtype=np.float32)
        self.pos = t("embeddings.position_embeddings.weight")
        self.type0 = t("embeddings.token_type_embeddings.weight")[0]
        self.ln_g, self.ln_b = t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias")
        self.n_heads = n_heads
        self.layers = []
        i = 0
        while f"enc.encoder.layer.{i}.attention.self.query.weight" in tensors:
            p = f"encoder.layer.{i}."
            q, k, v = (t(p + f"attention.self.{n}.weight") for n in ("query", "key", "value"))
            qb, kb, vb = (t(p + f"attention.self.{n}.bias") for n in ("query", "key", "value"))
            self.layers.append({
                "qkv": np.concatenate([q, k, v]).T.copy(), "qkv_b": np.concatenate([qb, kb, vb]),
                "o": t(p + "attention.output.dense.weight").T.copy(), "o_b": t(p + "attention.output.dense.bias"),
                "ln1_g": t(p + "attention.output.LayerNorm.weight"), "ln1_b": t(p + "attention.output.LayerNorm.bias"),
                "i": t(p + "intermediate.dense.weight").T.copy(), "i_b": t(p + "intermediate.dense.bias"),
                "f": t(p + "output.dense.weight").T.copy(), "f_b": t(p + "output.dense.bias"),
                "ln2_g": t(p + "output.LayerNorm.weight"), "ln2_b": t(p + "output.LayerNorm.bias"),
            })
            i += 1
        self._memo: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.harm_w, self.harm_b = t("head.weight")[0], float(t("head.bias")[0])
        self.cat_w, self.cat_b = t("cat.weight").T.copy(), t("cat.bias")
        self.dims = self.pos.shape[1]
        n_vocab = vocab.table.shape[0]
        if not self.layers or self.dims % n_heads or self.word_q.shape != (n_vocab, self.dims) \
                or self.word_scale.shape != (n_vocab,):
            raise ValueError("malformed encoder weights")
        self._session = None
        if int8:
            peaks = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items() if ".calib." in k}
            self._session = encoder_int8.session(encoder_int8.build_graph(self.layers, peaks, self.dims, n_heads))
            self.layers = []  # the session holds its own copy; the float32 layers would be ~40 MB more, unused

    def ids(self, words: Sequence[str]) -> list[int]:
        """WordPiece ids of normalised words."""
        return [i for w in words for i in self.vocab.word_ids(w)]

    def windows(self, words: Sequence[str]) -> list[list[int]]:
        """All token windows of normalised words (:func:`token_windows`)."""
        return token_windows(self.ids(words), self.cls_id, self.sep_id)

    def pooled(self, windows: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean of the last hidden states of each window (padding masked): (windows, dims).

        Results are memoised per window (a small LRU): the output screen re-reads a growing answer
        every few tokens, and only its last window changes between reads.
        """
        keys = [tuple(w) for w in windows]
        out = np.zeros((len(keys), self.dims), dtype=np.float32)
        todo = []
        with self._lock:
            for r, key in enumerate(keys):
                hit = self._memo.get(key)
                if hit is None:
                    todo.append(r)
                else:
                    self._memo.move_to_end(key)
                    out[r] = hit
        if todo:
            fresh = self._forward([windows[r] for r in todo])
            with self._lock:
                for r, vec in zip(todo, fresh):
                    out[r] = vec
                    self._memo[keys[r]] = vec
                    if len(self._memo) > _MEMO_WINDOWS:
                        self._memo.popitem(last=False)
        return out

    def clear_memo(self) -> None:
        """Forget memoised windows (benchmarks time the screen cold)."""
        with self._lock:
            self._memo.clear()

    def _embed(self, windows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Embedding layer output (windows, tokens, dims) of padded windows (float32), the padding mask,
        and the additive attention bias that masks the padding (windows, 1, 1, tokens)."""
        n, length = len(windows), max(len(w) for w in windows)
        ids = np.zeros((n, length), dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.float32)
        for r, w in enumerate(windows):
            ids[r, : len(w)] = w
            mask[r, : len(w)] = 1.0
        x = self.word_q[ids].astype(np.float32) * self.word_scale[ids][..., None] + self.pos[:length] + self.type0
        bias = (1.0 - mask)[:, None, None, :] * np.float32(-1e9)
        return _layer_norm(x, self.ln_g, self.ln_b), mask, bias

    def _forward(self, windows: Sequence[Sequence[int]]) -> np.ndarray:
        if self._session is None:
            return self.reference_forward(windows)
        # one window per run: the int8 graph quantizes activations with one scale per run, so a batch would let a
        # window's logit depend on the windows (and padding) it was batched with, i.e. on the memo's history
        out = np.empty((len(windows), self.dims), dtype=np.float32)
        for r, window in enumerate(windows):
            x, _, _ = self._embed([window])
            out[r] = self._session.run(None, {"x": x})[0][0].mean(axis=0)
        return out

    def reference_forward(self, windows: Sequence[Sequence[int]],
                          observe: Callable[[int, str, np.ndarray], None] | None = None) -> np.ndarray:
        """Pooled last hidden states in float32 numpy (no memo). ``observe(layer, kind, x)`` sees the
        input of every linear layer (kinds: :data:`encoder_int8.KINDS`), for calibration.

        Raises:
            ValueError: this encoder runs the int8 graph and has dropped its float32 layers (build one with ``int8=False``).
        """
        if not self.layers:
            raise ValueError("the float32 reference needs an Encoder built with int8=False")
        x, mask, bias = self._embed(windows)
        x = bert_layers(x, bias, self.layers, self.n_heads, observe)
        return (x * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)

    def harm_logits(self, pooled: np.ndarray) -> np.ndarray:
        return pooled @ self.harm_w + self.harm_b

    def category_logits(self, pooled: np.ndarray) -> np.ndarray:
        return pooled @ self.cat_w + self.cat_b
