"""PEFT -> GGUF LoRA conversion in memory: format, validation, and numerical layout through llama.cpp."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures_adapters import lora_tensors
from runtime.lora_gguf import convert, lora_alpha, permute_rows
from runtime.memfd import MemFile
from vault.errors import InvalidAdapterError

SMOL = {"n_head": 9, "n_head_kv": 3}


def _read(buf: bytearray) -> gguf.GGUFReader:
    with MemFile(buf) as mem:
        return gguf.GGUFReader(mem.path)  # memmaps the memfd; the mapping outlives the fd


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_header_names_and_values() -> None:
    tensors = lora_tensors(r=4, targets=("q_proj", "k_proj", "v_proj", "down_proj"), layers=[0, 7])
    reader = _read(convert(tensors, {"r": 4, "lora_alpha": 8}, **SMOL))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 8.0}
    got = {t.name: np.array(t.data) for t in reader.tensors}
    assert len(got) == len(tensors)
    for layer in (0, 7):
        prefix = f"base_model.model.model.layers.{layer}"
        a = tensors[f"{prefix}.self_attn.v_proj.lora_A.weight"]
        np.testing.assert_array_equal(got[f"blk.{layer}.attn_v.weight.lora_a"], a)
        np.testing.assert_array_equal(got[f"blk.{layer}.ffn_down.weight.lora_b"],
                                      tensors[f"{prefix}.mlp.down_proj.lora_B.weight"])
        # q/k lora_b rows follow llama.cpp's rotary permutation; lora_a is untouched
        q_b = tensors[f"{prefix}.self_attn.q_proj.lora_B.weight"]
        np.testing.assert_array_equal(got[f"blk.{layer}.attn_q.weight.lora_b"], permute_rows(q_b, 9))
        assert not np.array_equal(got[f"blk.{layer}.attn_q.weight.lora_b"], q_b)
        np.testing.assert_array_equal(_unpermute(got[f"blk.{layer}.attn_k.weight.lora_b"], 3),
                                      tensors[f"{prefix}.self_attn.k_proj.lora_B.weight"])
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"] == (576, 4)  # ggml ne0 first: [in, r]
    assert shapes["blk.0.attn_q.weight.lora_b"] == (4, 576)  # [r, out]


@settings(max_examples=25, deadline=None)
@given(r=st.integers(1, 16), layers=st.lists(st.integers(0, 29), min_size=1, max_size=3, unique=True),
       dtype=st.sampled_from(["float32", "float16"]), seed=st.integers(0, 2**16))
def test_roundtrip_property(r: int, layers: list[int], dtype: str, seed: int) -> None:
    tensors = lora_tensors(r=r, targets=("v_proj", "o_proj", "gate_proj"), layers=layers, dtype=dtype, seed=seed)
    reader = _read(convert(tensors, {"r": r, "lora_alpha": 2 * r}, **SMOL))
    assert len(reader.tensors) == len(tensors)
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert t.data_offset % gguf.GGUF_DEFAULT_ALIGNMENT == 0


def test_permute_rows_matches_llama_cpp_definition() -> None:
    w = np.arange(192 * 3, dtype=np.float32).reshape(192, 3)
    # llama.cpp convert_hf_to_gguf: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
    expected = w.reshape(3, 2, 32, 3).swapaxes(1, 2).reshape(192, 3)
    np.testing.assert_array_equal(permute_rows(w, 3), expected)
    np.testing.assert_array_equal(_unpermute(permute_rows(w, 3), 3), w)


def test_alpha_rslora_and_patterns() -> None:
    assert lora_alpha({"r": 16, "lora_alpha": 32}) == 32
    assert math.isclose(lora_alpha({"r": 16, "lora_alpha": 32, "use_rslora": True}), 32 * 4)
    with pytest.raises(InvalidAdapterError):
        lora_alpha({"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}})
    with pytest.raises(InvalidAdapterError):
        lora_alpha({"lora_alpha": 16})


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 576), np.float32)}), "not LoRA"),
    (lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"), "incomplete"),
    (lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         np.zeros((5, 576), np.float32)}), "rank"),
    (lambda t: t.clear(), "no LoRA"),
])
def test_rejects_bad_adapters(mutate, message: str) -> None:
    tensors = lora_tensors(r=4, targets=("q_proj",), layers=[0])
    mutate(tensors)
    with pytest.raises(InvalidAdapterError, match=message):
        convert(tensors, {"r": 4, "lora_alpha": 8}, **SMOL)


# -- numerical layout through the real llama.cpp engine -------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from runtime.engine import Engine
    from runtime.models import default_model

    with Engine(default_model(), n_ctx=512) as eng:
        yield eng


@pytest.fixture(scope="module")
def base_weights():
    from runtime.models import default_model

    reader = gguf.GGUFReader(default_model().path)
    by_name = {t.name: t for t in reader.tensors}

    def weight(name: str) -> np.ndarray:
        t = by_name[name]
        shape = tuple(reversed([int(x) for x in t.shape]))
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)

    return weight


_MODULES = {  # short -> (PEFT module, GGUF tensor, heads for the rotary un-permutation)
    "q": ("self_attn.q_proj", "attn_q", 9), "k": ("self_attn.k_proj", "attn_k", 3),
    "v": ("self_attn.v_proj", "attn_v", None), "o": ("self_attn.o_proj", "attn_output", None),
    "up": ("mlp.up_proj", "ffn_up", None), "down": ("mlp.down_proj", "ffn_down", None),
}
_PROMPT = [{"role": "user", "content": "Tell me a story about a dragon."}]


def _scaling_logits(engine, base_weights, short: str, *, c: float = 0.5, hf_layout: bool = True) -> np.ndarray:
    """Logits with a full-rank LoRA whose B @ A = c * W: it multiplies that projection's output by 1 + c.

    A is the base weight in Hugging Face layout (un-permuting q/k as a PEFT adapter would see them);
    with ``hf_layout=False`` A is llama.cpp's permuted weight, which only a wrong converter would get right.
    """
    module, tensor, heads = _MODULES[short]
    tensors = {}
    for layer in (3, 10):
        w = base_weights(f"blk.{layer}.{tensor}.weight")
        if heads and hf_layout:
            w = _unpermute(w, heads)
        prefix = f"base_model.model.model.layers.{layer}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = w
        tensors[f"{prefix}.lora_B.weight"] = (c * np.eye(w.shape[0])).astype(np.float32)
    r = w.shape[0]
    name = f"scale-{short}-{hf_layout}"
    with MemFile(convert(tensors, {"r": r, "lora_alpha": r}, **SMOL)) as mem:
        engine.load_adapter(name, mem.path)
    try:
        return engine.first_token_logits(_PROMPT, adapter=name)
    finally:
        engine.unload_adapter(name)


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.mark.slow
def test_zero_b_adapter_is_identity_and_nonzero_changes(engine) -> None:
    base = engine.first_token_logits(_PROMPT)
    zero = lora_tensors(r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    nonzero = dict(zero)
    for name in zero:
        if "lora_B" in name:
            zero[name] = np.zeros_like(zero[name])
    for label, tensors in (("zero", zero), ("nonzero", nonzero)):
        with MemFile(convert(tensors, {"r": 8, "lora_alpha": 16}, **SMOL)) as mem:
            engine.load_adapter(label, mem.path)
    np.testing.assert_allclose(engine.first_token_logits(_PROMPT, adapter="zero"), base, atol=1e-4)
    assert _dist(engine.first_token_logits(_PROMPT, adapter="nonzero"), base) > 1e-2
    engine.unload_adapter("zero")
    engine.unload_adapter("nonzero")


@pytest.mark.slow
@pytest.mark.parametrize("left, right, bound", [("v", "o", 0.25), ("up", "down", 0.4)])
def test_orientation_equivalent_scalings(engine, base_weights, left: str, right: str, bound: float) -> None:
    """Scaling v by 1+c equals scaling o by 1+c (attention is linear in v); same for up/down in the MLP.

    Equality holds only if A and B land in llama.cpp in the right orientation. The bound leaves room
    for quantisation noise (the base runs Q4_1, the LoRA path f32) and is checked against the effect size.
    """
    base = engine.first_token_logits(_PROMPT)
    a = _scaling_logits(engine, base_weights, left)
    b = _scaling_logits(engine, base_weights, right)
    effect = _dist(a, base)
    assert effect > 0.2
    assert _dist(a, b) < bound * effect


@pytest.mark.slow
def test_rotary_permutation_q_equals_k(engine, base_weights) -> None:
    """Scaling q by 1+c equals scaling k by 1+c (scores are q.k); only true with the q/k row permutation."""
    q = _scaling_logits(engine, base_weights, "q")
    k = _scaling_logits(engine, base_weights, "k")
    q_wrong = _scaling_logits(engine, base_weights, "q", hf_layout=False)
    k_wrong = _scaling_logits(engine, base_weights, "k", hf_layout=False)
    assert _dist(q, k) < 0.25 * _dist(q_wrong, k_wrong)
    assert _dist(q, q_wrong) > 4 * _dist(q, k)
