"""vault.adapter: reading PEFT dirs and GGUF LoRAs, strict validation, and the sealed blob format."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures_adapters import BASE_NAME, lora_tensors, make_gguf_lora, make_peft_adapter
from vault import adapter as adapter_mod
from vault.adapter import FORMAT, declared_base, load_blob, make_blob, read_adapter
from vault.errors import InvalidAdapterError

SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _safetensors_bytes(tensors: dict[str, tuple[str, tuple[int, ...], bytes]], header_extra: str = "") -> bytes:
    """Hand-built safetensors (for dtypes numpy cannot write, and for malformed files)."""
    header, data, offset = {}, b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    text = json.dumps(header)
    if header_extra:
        text = text[:-1] + header_extra + "}"
    encoded = text.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_peft_round_trip_is_plain_safetensors(tmp_path: Path) -> None:
    tensors = lora_tensors(r=4, layers=range(3), targets=("q_proj", "k_proj", "down_proj"))
    make_peft_adapter(tmp_path / "a", r=4, tensors=tensors, targets=("q_proj", "k_proj", "down_proj"))
    result = read_adapter(tmp_path / "a", base_sha256=SHA, created="2026-01-01T00:00:00+00:00")
    assert result.meta.r == 4 and result.meta.alpha == 16.0
    assert result.meta.target_modules == ["down_proj", "k_proj", "q_proj"]
    assert (result.meta.base_name, result.meta.base_sha256) == (BASE_NAME, SHA)
    stock = safetensors.numpy.load(result.blob)  # no vault code needed to read the payload
    assert stock.keys() == tensors.keys()
    for name, array in tensors.items():
        np.testing.assert_array_equal(stock[name], array)
    loaded, meta = load_blob(bytearray(result.blob))
    assert meta == result.meta
    assert all(np.array_equal(loaded[n], tensors[n]) for n in tensors)


def test_blob_metadata_follows_the_contract(tmp_path: Path) -> None:
    make_peft_adapter(tmp_path / "a", layers=range(1))
    blob = read_adapter(tmp_path / "a", base_sha256=SHA).blob
    (header_len,) = struct.unpack("<Q", blob[:8])
    metadata = json.loads(blob[8 : 8 + header_len])["__metadata__"]
    assert metadata["format"] == FORMAT
    assert json.loads(metadata["peft_config"])["r"] == 8
    assert metadata["base_name"] == BASE_NAME and metadata["base_sha256"] == SHA
    assert metadata["created"].endswith("+00:00")


def test_gguf_lora_reads_as_the_same_tensors(tmp_path: Path) -> None:
    path = make_gguf_lora(tmp_path / "a.gguf", r=4, layers=range(2), targets=("q_proj", "up_proj"), dtype="float16")
    result = read_adapter(path, base_sha256=SHA)
    expected = lora_tensors(r=4, layers=range(2), targets=("q_proj", "up_proj"), dtype="float16")
    loaded, meta = load_blob(result.blob)
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert loaded[name].dtype == np.float16
        np.testing.assert_array_equal(loaded[name], expected[name])
    assert meta.r == 4 and meta.alpha == 16.0 and meta.base_name == "SmolLM2-135M-Instruct"
    assert declared_base(path) == "SmolLM2-135M-Instruct"


def test_bf16_is_widened_to_f32_exactly(tmp_path: Path) -> None:
    values = np.random.default_rng(1).standard_normal((2, 576)).astype(np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    b = np.zeros((576, 2), np.uint16)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    raw = _safetensors_bytes({
        f"{prefix}.lora_A.weight": ("BF16", (2, 576), bf16.tobytes()),
        f"{prefix}.lora_B.weight": ("BF16", (576, 2), b.tobytes()),
    })
    make_peft_adapter(tmp_path / "a", r=2, tensors={}, targets=("q_proj",))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(raw)
    loaded, _ = load_blob(read_adapter(tmp_path / "a").blob)
    widened = loaded[f"{prefix}.lora_A.weight"]
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened.view(np.uint32), bf16.astype(np.uint32) << 16)


def _break(tmp_path: Path, **kw) -> Path:
    return make_peft_adapter(tmp_path / "bad", layers=range(2), **kw)


def _tensors(**kw) -> dict[str, np.ndarray]:
    return lora_tensors(layers=range(2), **kw)


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json is missing"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda p: ((p / "adapter_model.safetensors").rename(p / "adapter_model.bin")), "pickle"),
        (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "adapter_config.json").write_text('{"r": 8, "r": 8}'), "duplicate key"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x01\x02"), "shorter than"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}"), "out of bounds"),
        (lambda p: _truncate(p / "adapter_model.safetensors"), "outside the file"),
    ],
)
def test_rejects_broken_files(tmp_path: Path, mutate, reason: str) -> None:
    path = _break(tmp_path)
    mutate(path)
    with pytest.raises(InvalidAdapterError, match=reason):
        read_adapter(path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-100])


def _without(name: str) -> dict[str, np.ndarray]:
    t = _tensors()
    del t[name]
    return t


def _with(name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    t = _tensors()
    t[name] = value
    return t


def _nan() -> dict[str, np.ndarray]:
    t = _tensors()
    t[f"{Q}.lora_B.weight"] = t[f"{Q}.lora_B.weight"].copy()
    t[f"{Q}.lora_B.weight"][3, 1] = np.nan
    return t


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"tensors": _without(f"{Q}.lora_B.weight")}, "lora_B is missing"),
        ({"tensors": _nan()}, "NaN or infinity"),
        ({"tensors": _with(f"{Q}.lora_A.weight", np.full((8, 576), np.inf, np.float32))}, "NaN or infinity"),
        ({"tensors": _with(f"{Q}.lora_A.weight", np.zeros((8, 576), np.int32))}, "only F16, BF16 and F32"),
        ({"tensors": _with("base_model.model.model.embed_tokens.weight", np.zeros((4, 4), np.float32))},
         "unsupported tensor"),
        ({"tensors": _with(f"{Q}.lora_A.weight", np.zeros((8, 576, 1), np.float32))}, "must be 2-D"),
        ({"tensors": _with(f"{Q}.lora_A.weight", np.zeros((4, 576), np.float32))}, "disagree on the rank"),
        ({"r": 4, "tensors": _tensors(r=8)}, "does not match r=4"),
        ({"tensors": _with(f"{Q}.lora_A.weight", np.zeros((8, 500), np.float32))}, "differs from other layers"),
        ({"tensors": _tensors(targets=("q_proj", "o_proj")), "targets": ("q_proj",)}, "target_modules does not list"),
        ({"base": None}, "declares no base model"),
        ({"config_overrides": {"peft_type": "IA3"}}, "only LORA"),
        ({"config_overrides": {"use_dora": True}}, "use_dora"),
        ({"config_overrides": {"lora_alpha": float("nan")}}, "lora_alpha"),
        ({"tensors": {}}, "no tensors"),
    ],
)
def test_rejects_invalid_adapters_with_a_precise_reason(tmp_path: Path, kwargs: dict, reason: str) -> None:
    with pytest.raises(InvalidAdapterError, match=reason):
        read_adapter(_break(tmp_path, **kwargs))


def test_rejects_overlapping_offsets_and_trailing_bytes(tmp_path: Path) -> None:
    a = np.zeros((1, 576), np.float32).tobytes()
    b = np.zeros((576, 1), np.float32).tobytes()
    raw = _safetensors_bytes({f"{Q}.lora_A.weight": ("F32", (1, 576), a), f"{Q}.lora_B.weight": ("F32", (576, 1), b)})
    path = _break(tmp_path, r=1, tensors={}, targets=("q_proj",))
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    header[f"{Q}.lora_B.weight"]["data_offsets"] = [0, len(b)]  # B aliases A
    encoded = json.dumps(header).encode()
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + a + b)
    with pytest.raises(InvalidAdapterError, match="overlaps"):
        read_adapter(path)
    (path / "adapter_model.safetensors").write_bytes(raw + b"extra")
    with pytest.raises(InvalidAdapterError, match="trailing bytes"):
        read_adapter(path)


def test_rejects_gguf_that_is_not_a_lora(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "model")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidAdapterError, match="not a LoRA adapter"):
        read_adapter(path)
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(InvalidAdapterError, match="bad magic"):
        read_adapter(tmp_path / "x.gguf")


def test_rejects_quantized_gguf_lora(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    quantized = gguf.quants.quantize(np.zeros((8, 576), np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidAdapterError, match="Q8_0 is not F32/F16/BF16"):
        read_adapter(path, base_name="x")


def test_size_limit_is_checked_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _break(tmp_path)
    monkeypatch.setattr(adapter_mod, "MAX_ADAPTER_BYTES", 1000)
    with pytest.raises(InvalidAdapterError, match="over the 1000-byte limit"):
        read_adapter(path)


def test_load_blob_rejects_a_plain_safetensors_file() -> None:
    plain = safetensors.numpy.save(_tensors())
    with pytest.raises(InvalidAdapterError, match="not a vault-adapter/1 blob"):
        load_blob(plain)


def test_make_blob_validates_like_read_adapter() -> None:
    blob = make_blob(_tensors(), {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                     base_name="b", base_sha256=SHA)
    assert load_blob(blob)[1].base_name == "b"
    with pytest.raises(InvalidAdapterError, match="r' must be an integer"):
        make_blob(_tensors(), {"r": 0}, base_name="b", base_sha256=SHA)


@pytest.fixture(scope="module")
def small_adapter_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    path = make_peft_adapter(tmp_path_factory.mktemp("fuzz") / "a", r=2, layers=range(1), targets=("q_proj",))
    return (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_corruption_is_rejected_cleanly_or_stays_valid(tmp_path: Path, small_adapter_bytes, data) -> None:
    """Random byte flips and truncations of the weights: InvalidAdapterError or a valid adapter, nothing else."""
    config, weights = small_adapter_bytes
    mutated = bytearray(weights)
    if data.draw(st.booleans()):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] ^= data.draw(st.integers(1, 255))
    else:
        mutated = mutated[: data.draw(st.integers(0, len(mutated) - 1))]
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    (directory / "adapter_config.json").write_bytes(config)
    (directory / "adapter_model.safetensors").write_bytes(bytes(mutated))
    try:
        tensors, _ = load_blob(read_adapter(directory).blob)
    except InvalidAdapterError:
        return
    assert all(np.isfinite(t).all() for t in tensors.values())
