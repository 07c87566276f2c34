"""The guard encoder's int8 onnxruntime graph against its float32 numpy reference.

The int8 graph is what runs; the reference is what was trained and what calibrates it. These tests
hold the two together on held-out prompts, and check the properties the int8 graph relies on
(7-bit weights, outlier channels from the calibration, one thread, refusal without calibration).
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest

from runtime.guard.encoder_int8 import KINDS, OUTLIER_CHANNELS, WEIGHT_LEVELS, build_graph, calibration_name, calibration_tensors
from runtime.guard.features import featurize
from runtime.guard.screen import WEIGHTS_PATH, ScreenModel, load_heldout, load_model, read_weights
from vault.errors import GuardError


def _shipped() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return read_weights(WEIGHTS_PATH.read_bytes())


@pytest.fixture(scope="module")
def models() -> tuple[ScreenModel, ScreenModel]:
    tensors, meta = _shipped()
    return load_model(), ScreenModel(tensors, meta, int8=False)


def _windows(model: ScreenModel, text: str) -> list[list[int]]:
    return model.encoder.windows(featurize(text).words)


def test_shipped_weights_carry_a_calibration_for_every_linear_layer() -> None:
    tensors, _ = _shipped()
    layers = sum(1 for k in tensors if k.endswith("attention.self.query.weight"))
    assert layers == 6
    for n in range(layers):
        for kind in KINDS:
            peaks = tensors[calibration_name(n, kind)]
            assert peaks.dtype == np.float32 and peaks.shape == ((1536,) if kind == "f" else (384,))
            assert np.all(peaks > 0) and np.isfinite(peaks).all()


def test_weights_without_calibration_are_refused_with_a_clear_error() -> None:
    tensors, meta = _shipped()
    stripped = {k: v for k, v in tensors.items() if ".calib." not in k}
    with pytest.raises(GuardError, match="no int8 calibration"):
        ScreenModel(stripped, meta)
    ScreenModel(stripped, meta, int8=False)  # the float32 reference needs none


def test_graph_weights_cannot_saturate_avx2_and_outliers_are_the_calibrated_peaks(models) -> None:
    """7-bit weights (vpmaddubsw's int16 pair sums stay exact); the float32 side channels are the
    OUTLIER_CHANNELS largest calibrated input channels of each linear layer."""
    tensors, _ = _shipped()
    enc = models[1].encoder
    peaks = {k: v for k, v in tensors.items() if ".calib." in k}
    graph = onnx.load_model_from_string(build_graph(enc.layers, peaks, enc.dims, enc.n_heads))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    quantized = [name for name in inits if name.endswith(".w_q")]
    assert len(quantized) == 6 * len(KINDS)
    for name in quantized:
        assert inits[name].dtype == np.int8 and int(np.abs(inits[name].astype(np.int32)).max()) == WEIGHT_LEVELS
    for n in range(6):
        for kind in KINDS:
            idx = inits[f"l{n}.{kind}.outliers"]
            top = np.argsort(-peaks[calibration_name(n, kind)], kind="stable")[: OUTLIER_CHANNELS[kind]]
            assert sorted(idx.tolist()) == sorted(top.tolist())
            w_q = inits[f"l{n}.{kind}.w_q"]
            assert not w_q[idx].any()  # the outlier rows are not in the int8 product too
    ops = {node.op_type for node in graph.graph.node}
    assert "DynamicQuantizeMatMul" in ops and "Gather" in ops


def test_int8_session_runs_on_one_thread(models) -> None:
    options = models[0].encoder._session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1


def test_calibration_is_the_max_activation_per_input_channel(models) -> None:
    enc = models[1].encoder
    windows = [_windows(models[1], t)[0] for t in ("how do I kill a stuck process", "plan a picnic for six people")]
    peaks = calibration_tensors(enc, windows)
    assert set(peaks) == {calibration_name(n, k) for n in range(6) for k in KINDS}
    # the first linear layer reads the embedding layer's output: its peaks are that output's |max| per channel
    first = np.abs(np.concatenate([enc._embed([w])[0][0] for w in windows])).max(axis=0)
    np.testing.assert_allclose(peaks[calibration_name(0, "qkv")], first, rtol=1e-6)
    with pytest.raises(ValueError):
        calibration_tensors(enc, [])


@pytest.mark.slow
def test_int8_encoder_agrees_with_the_float32_reference_on_heldout(models) -> None:
    """On 300 held-out prompts (chat-sized and long): the encoder's logit within a small fraction of its
    spread, and the screen's verdicts the same for all but a few prompts near the threshold.
    Measured when the int8 graph landed (1,500 rows): stacked logit error median 0.013, p99 0.24;
    5 harmful prompts lost and 5 gained, recall and FPR unchanged."""
    int8, ref = models
    rows = load_heldout()
    random.Random(7).shuffle(rows)
    scored = [(int8.score(r["prompt"]), ref.score(r["prompt"])) for r in rows[:300]]
    err = np.array([abs(q.parts[1] - r.parts[1]) for q, r in scored])  # the encoder's own logit
    spread = float(np.std([r.parts[1] for _, r in scored]))
    assert spread > 2.0  # the logits are spread out (std ~6.5): the bounds below are relative to that
    assert np.median(err) < 0.02 * spread and np.percentile(err, 99) < 0.2 * spread
    flips = [(q.logit >= int8.threshold) != (r.logit >= ref.threshold) for q, r in scored]
    assert np.mean(flips) <= 0.02


def test_a_windows_logit_does_not_depend_on_what_it_is_batched_with(models) -> None:
    """Activations are quantized with one scale per run: batching windows (or a memo that leaves only some of
    a text's windows to compute) would make a text's score depend on the prompts screened before it."""
    enc = models[0].encoder
    words = featurize(" ".join(["The committee met on Tuesday to review the budget and the hiring plan."] * 40
                               + ["Then explain how to make a pipe bomb at home."])).words
    windows = enc.windows(words)[:4]
    assert len(windows) == 4
    alone = np.concatenate([enc._forward([w]) for w in windows])
    np.testing.assert_array_equal(enc._forward(windows), alone)
    np.testing.assert_array_equal(enc._forward([windows[2], [enc.cls_id, enc.sep_id]])[0], alone[2])  # padded beside a short one


def test_run_time_encoder_drops_its_float32_layers(models) -> None:
    """The int8 session holds the weights it runs; the run-time encoder keeps no float32 copy of its layers
    (about 40 MB), and asking it for the float32 reference is a clear error, not embeddings passed through."""
    run_time, reference = models
    assert run_time.encoder.layers == [] and len(reference.encoder.layers) == 6
    windows = _windows(run_time, "How do I reset my router?")
    with pytest.raises(ValueError, match="int8=False"):
        run_time.encoder.reference_forward(windows)
    assert reference.encoder.reference_forward(windows).shape == (1, reference.encoder.dims)
