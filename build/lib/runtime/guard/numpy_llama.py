"""A small, exact numpy forward pass of a llama-architecture GGUF, for reading the BASE model's residual stream.

The adapter audit needs hidden states of the base model *without* any adapter (an abliteration adapter
removes the refusal direction from the residual stream, so anything computed through it is blind). llama.cpp
does not expose per-layer residuals through llama-cpp-python's high-level API, so this module runs the
model itself: weights are dequantized from the GGUF with ``gguf.quants.dequantize`` one layer at a time
(all prompts go through layer ``l`` before layer ``l+1`` is dequantized), which keeps memory to one layer.

Architecture (llama.cpp ``LLM_ARCH_LLAMA``): RMSNorm, RoPE in llama.cpp's NORM mode (adjacent pairs; the
GGUF converter permutes Q/K so that this matches HF's rotate-half), grouped-query attention, SwiGLU MLP,
tied or separate output head. ``tests/test_audit.py`` checks the final logits against llama.cpp's.

This is used offline (to compute and cache directions) and never on an adapter's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vault.errors import BaseModelError

__all__ = ["LlamaConfig", "NumpyLlama", "LayerStates"]

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    rope_base: float
    rms_eps: float
    n_vocab: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class LayerStates:
    """Residual-stream states per prompt: ``last[l]`` (n_prompts, n_embd) at the final position and
    ``mean[l]`` averaged over positions, for l = 0 (embeddings) .. n_layer (output of the last block)."""

    last: np.ndarray  # (n_layer + 1, n_prompts, n_embd)
    mean: np.ndarray  # (n_layer + 1, n_prompts, n_embd)


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise BaseModelError(f"the base model GGUF lacks {key!r}; cannot audit adapters against it")
    return field.contents()


class NumpyLlama:
    """Lazy, layer-at-a-time numpy evaluation of a llama GGUF (dequantized to float32)."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = Path(path)
        self._reader = gguf.GGUFReader(str(self.path))
        arch = _field(self._reader, "general.architecture")
        if arch != "llama":
            raise BaseModelError(f"the adapter audit supports llama-architecture bases only, not {arch!r}")
        emb = self._tensor_info("token_embd.weight")
        self.config = LlamaConfig(
            n_layer=int(_field(self._reader, "llama.block_count")),
            n_embd=int(_field(self._reader, "llama.embedding_length")),
            n_ff=int(_field(self._reader, "llama.feed_forward_length")),
            n_head=int(_field(self._reader, "llama.attention.head_count")),
            n_head_kv=int(_field(self._reader, "llama.attention.head_count_kv")),
            rope_base=float(_field(self._reader, "llama.rope.freq_base")),
            rms_eps=float(_field(self._reader, "llama.attention.layer_norm_rms_epsilon")),
            n_vocab=int(emb.shape[-1]),
        )

    # -- weights -------------------------------------------------------------------------------------------

    def _tensor_info(self, name: str):
        for tensor in self._reader.tensors:
            if tensor.name == name:
                return tensor
        raise BaseModelError(f"the base model GGUF lacks tensor {name!r}")

    def has_tensor(self, name: str) -> bool:
        return any(t.name == name for t in self._reader.tensors)

    def weight(self, name: str) -> np.ndarray:
        """A dequantized float32 weight, numpy shape (out, in) as used in ``x @ W.T``."""
        import gguf

        tensor = self._tensor_info(name)
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.ascontiguousarray(array, dtype=np.float32)

    # -- forward -------------------------------------------------------------------------------------------

    def _rms(self, x: np.ndarray, gain: np.ndarray) -> np.ndarray:
        var = np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.config.rms_eps)).astype(np.float32) * gain

    def _rope(self, x: np.ndarray) -> np.ndarray:
        # x: (T, heads, head_dim); NORM mode rotates adjacent pairs (x[2i], x[2i+1]) by pos * base^(-2i/d).
        t, _, d = x.shape
        inv = self.config.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
        cos = np.cos(ang)[:, None, :].astype(np.float32)
        sin = np.sin(ang)[:, None, :].astype(np.float32)
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def _attention(self, h: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
        cfg = self.config
        t = h.shape[0]
        hd = cfg.head_dim
        q = (h @ w["attn_q"].T).reshape(t, cfg.n_head, hd)
        k = (h @ w["attn_k"].T).reshape(t, cfg.n_head_kv, hd)
        v = (h @ w["attn_v"].T).reshape(t, cfg.n_head_kv, hd)
        q, k = self._rope(q), self._rope(k)
        group = cfg.n_head // cfg.n_head_kv
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        mask = np.triu(np.ones((t, t), dtype=bool), 1)
        scores[:, mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("hts,shd->thd", probs, v).reshape(t, cfg.n_embd)
        return out @ w["attn_output"].T

    def _mlp(self, h: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
        gate = h @ w["ffn_gate"].T
        up = h @ w["ffn_up"].T
        act = gate / (1.0 + np.exp(-gate)) * up
        return act @ w["ffn_down"].T

    def _layer_weights(self, layer: int) -> dict[str, np.ndarray]:
        names = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
        return {n: self.weight(f"blk.{layer}.{n}.weight") for n in names}

    def run(
        self, prompts: Sequence[Sequence[int]], *, logits: bool = False, progress: ProgressFn | None = None
    ) -> tuple[LayerStates, list[np.ndarray] | None]:
        """Evaluate token sequences; return residual states per layer (and final logits per prompt if asked).

        Args:
            prompts: token id sequences (already templated).
            logits: also return the final-position logits of each prompt (for validation against llama.cpp).
            progress: called with (layers_done, n_layer).
        """
        cfg = self.config
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        emb = self.weight("token_embd.weight")
        xs = [emb[np.asarray(p, dtype=np.int64)] for p in prompts]
        del emb
        n = len(prompts)
        last = np.zeros((cfg.n_layer + 1, n, cfg.n_embd), dtype=np.float32)
        mean = np.zeros_like(last)
        for i, x in enumerate(xs):
            last[0, i], mean[0, i] = x[-1], x.mean(axis=0)
        for layer in range(cfg.n_layer):
            w = self._layer_weights(layer)
            for i, x in enumerate(xs):
                x = x + self._attention(self._rms(x, w["attn_norm"]), w)
                x = x + self._mlp(self._rms(x, w["ffn_norm"]), w)
                xs[i] = x
                last[layer + 1, i], mean[layer + 1, i] = x[-1], x.mean(axis=0)
            if progress:
                progress(layer + 1, cfg.n_layer)
        out_logits = None
        if logits:
            norm = self.weight("output_norm.weight")
            head = self.weight("output.weight") if self.has_tensor("output.weight") else self.weight("token_embd.weight")
            out_logits = [self._rms(x[-1:], norm)[0] @ head.T for x in xs]
        return LayerStates(last=last, mean=mean), out_logits
