"""PEFT <-> llama.cpp (GGUF) LoRA tensor names, in one place.

PEFT names a LoRA pair ``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight``
(shape ``(r, in)``) and ``...lora_B.weight`` (shape ``(out, r)``). llama.cpp names the same pair
``blk.{i}.{tensor}.weight.lora_a`` / ``.weight.lora_b`` (llama.cpp's loader looks up the base tensor
by stripping ``.lora_a``; the older ``blk.{i}.{tensor}.lora_a`` spelling is accepted when reading). In GGUF the numpy shapes of a LoRA are stored so that
llama.cpp's ggml shape (ne0 = fastest dim) reads ``lora_a: [in, r]`` and ``lora_b: [r, out]``, which
in numpy (row-major, reversed) is ``lora_a: (r, in)`` and ``lora_b: (out, r)``: the same arrays as PEFT.
"""

from __future__ import annotations

import re

__all__ = ["PEFT_TO_GGUF", "GGUF_TO_PEFT", "peft_to_gguf_name", "gguf_to_peft_name", "parse_peft_name"]

PEFT_TO_GGUF: dict[str, str] = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_TO_PEFT: dict[str, str] = {v: k for k, v in PEFT_TO_GGUF.items()}

_PEFT_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.((?:self_attn|mlp)\.[a-z_]+)\.lora_([AB])(?:\.default)?\.weight$"
)
_GGUF_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)(?:\.weight)?\.lora_([ab])$")


def parse_peft_name(name: str) -> tuple[int, str, str] | None:
    """(layer, module e.g. 'self_attn.o_proj', 'A'|'B') or None if not a LoRA tensor name."""
    m = _PEFT_RE.match(name)
    if not m or m.group(2) not in PEFT_TO_GGUF:
        return None
    return int(m.group(1)), m.group(2), m.group(3)


def peft_to_gguf_name(name: str) -> str:
    parsed = parse_peft_name(name)
    if parsed is None:
        raise ValueError(f"not a supported PEFT LoRA tensor name: {name!r}")
    layer, module, ab = parsed
    return f"blk.{layer}.{PEFT_TO_GGUF[module]}.weight.lora_{ab.lower()}"


def gguf_to_peft_name(name: str) -> str:
    m = _GGUF_RE.match(name)
    if not m or m.group(2) not in GGUF_TO_PEFT:
        raise ValueError(f"not a supported GGUF LoRA tensor name: {name!r}")
    return f"base_model.model.model.layers.{m.group(1)}.{GGUF_TO_PEFT[m.group(2)]}.lora_{m.group(3).upper()}.weight"
