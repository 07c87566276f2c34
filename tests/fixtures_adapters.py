"""Make real LoRA adapters (PEFT directories and GGUF LoRA files) shaped for the embedded base model.

SmolLM2-135M-Instruct: hidden 576, 30 layers, 9 query heads x 64, 3 KV heads x 64 (so k/v project to
192), MLP intermediate 1536. Other test files import this module (``from fixtures_adapters import ...``;
tests/conftest.py puts tests/ on sys.path) and scripts/demo.sh uses it to make its demo adapter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import safetensors.numpy

__all__ = ["SMOLLM2_SHAPES", "SMOLLM2_LAYERS", "BASE_NAME", "lora_tensors", "make_peft_adapter", "make_gguf_lora"]

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_LAYERS = 30
# module -> (in_features, out_features)
SMOLLM2_SHAPES: dict[str, tuple[int, int]] = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
_SHORT = {m.split(".")[1]: m for m in SMOLLM2_SHAPES}


def lora_tensors(
    *,
    r: int = 8,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    layers: Iterable[int] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    scale: float = 0.01,
) -> dict[str, np.ndarray]:
    """PEFT-named LoRA weights with random (not zero) A and B, so the adapter really changes the model."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in range(SMOLLM2_LAYERS) if layers is None else layers:
        for short in targets:
            module = _SHORT[short]
            fan_in, fan_out = SMOLLM2_SHAPES[module]
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            out[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r, fan_in)) / np.sqrt(fan_in)).astype(dtype)
            out[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, r)) * scale).astype(dtype)
    return out


def make_peft_adapter(
    directory: Path | str,
    *,
    r: int = 8,
    alpha: float = 16,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    layers: Iterable[int] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    scale: float = 0.01,
    base: str | None = BASE_NAME,
    tensors: dict[str, np.ndarray] | None = None,
    config_overrides: dict | None = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT saves them; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = list(targets)
    if tensors is None:
        tensors = lora_tensors(r=r, targets=targets, layers=layers, dtype=dtype, seed=seed, scale=scale)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": targets,
        "base_model_name_or_path": base,
        "inference_mode": True,
        "fan_in_fan_out": False,
    }
    config.update(config_overrides or {})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    safetensors.numpy.save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def make_gguf_lora(
    path: Path | str,
    *,
    r: int = 8,
    alpha: float = 16,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    layers: Iterable[int] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    base: str | None = "SmolLM2-135M-Instruct",
) -> Path:
    """Write a GGUF LoRA the way llama.cpp's convert_lora_to_gguf.py lays it out; returns the path."""
    import gguf

    from vault.adapter_names import peft_to_gguf_name

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    if base:
        writer.add_uint32("general.base_model.count", 1)
        writer.add_string("general.base_model.0.name", base)
    for name, array in lora_tensors(r=r, targets=targets, layers=layers, dtype=dtype, seed=seed).items():
        writer.add_tensor(peft_to_gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
