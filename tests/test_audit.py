"""The adapter audit: static abliteration check, behavioural check, verdict cache, force, `vault audit`.

Real components throughout: the embedded SmolLM2 GGUF (dequantized for the numpy forward pass and the
fixtures), llama.cpp through runtime.engine for the behavioural check, a real vault with a real private
gnome-keyring for the MAC key, and the `vault` CLI in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import abliteration as ab

REPO = Path(__file__).resolve().parent.parent


# -- session fixtures (expensive: dequantization and numpy forward passes, done once) ---------------------


@pytest.fixture(scope="session")
def base_model():
    from runtime.models import default_model

    return default_model()


@pytest.fixture(scope="session")
def base_data(base_model):
    """Shipped directions and the base's projections onto their span (no caching: computed from the GGUF)."""
    from runtime.guard.directions import base_projections, load_directions

    directions = load_directions(base_model)
    return directions, base_projections(base_model, directions)


@pytest.fixture(scope="session")
def fixture_base(base_model):
    return ab.load_base(base_model)


@pytest.fixture(scope="session")
def fixtures(base_model, fixture_base, shared_data):
    attacker = ab.attacker_directions(base_model, shared_data)
    return ab.abliteration_fixtures(fixture_base, attacker), ab.benign_fixtures(fixture_base)


def _blob(tensors, cfg, base_model) -> bytes:
    from vault.adapter import make_blob

    return make_blob(tensors, cfg, base_name=base_model.name, base_sha256=base_model.sha256)


# -- the numpy forward pass and the directions ----------------------------------------------------------------


@pytest.mark.slow
def test_numpy_forward_matches_llama_cpp(base_model) -> None:
    """Same logits as llama.cpp up to its activation quantization, at several positions of a chat prompt."""
    import llama_cpp

    from runtime.guard.directions import chat_tokens
    from runtime.guard.numpy_llama import NumpyLlama

    llm = llama_cpp.Llama(str(base_model.path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    tokens = chat_tokens(lambda b: llm.tokenize(b, add_bos=False, special=True), "What is the capital of France?")
    llm.eval(tokens)
    cuts = (5, 20, len(tokens))
    _, logits = NumpyLlama(base_model.path).run([tokens[:k] for k in cuts], logits=True)
    for k, mine in zip(cuts, logits):
        ref = np.asarray(llm.scores[k - 1], dtype=np.float64)
        mine = mine.astype(np.float64)
        assert np.corrcoef(ref, mine)[0, 1] > 0.995, k   # measured 0.9975..0.9991
        assert ref.argmax() in np.argsort(mine)[-3:], k   # the final position is a near-tie (0.4 logits)
        p = np.exp(ref - ref.max()); p /= p.sum()
        q = np.exp(mine - mine.max()); q /= q.sum()
        assert float(np.sum(p * np.log(p / q))) < 0.1, k
    # a wrong RoPE or a missing norm would not survive this: shuffle the positions and the match is gone
    _, shuffled = NumpyLlama(base_model.path).run([tokens[:1] + tokens[1:][::-1]], logits=True)
    assert np.corrcoef(np.asarray(llm.scores[len(tokens) - 1]), shuffled[0])[0, 1] < 0.99


def test_shipped_directions_are_pinned_to_the_embedded_base(base_model, base_data) -> None:
    from runtime.guard.directions import SHIPPED_DIR

    directions, projections = base_data
    assert directions.source == "shipped" and directions.base_sha256 == base_model.sha256
    assert (SHIPPED_DIR / f"{base_model.sha256}.npz").is_file()
    assert directions.last.shape == (31, 576) and np.allclose(np.linalg.norm(directions.last[1:], axis=1), 1, atol=1e-5)
    q = directions.span
    assert np.allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-4) and 4 <= q.shape[1] <= 48
    assert projections.o.shape == (30, q.shape[1], 576) and projections.d.shape == (30, q.shape[1], 1536)


@pytest.mark.slow
def test_directions_separate_held_out_prompts(base_model, base_data, shared_data) -> None:
    """The shipped mid-layer direction separates AdvBench rows and XSTest safe prompts it never saw."""
    from runtime.guard.directions import _tokenizer, chat_tokens
    from runtime.guard.numpy_llama import NumpyLlama

    with (shared_data / "advbench_harmful_behaviors.csv").open(newline="") as fh:
        harmful = [r["goal"] for r in csv.DictReader(fh)][450:466]
    with (shared_data / "xstest_prompts.csv").open(newline="") as fh:
        harmless = [r["prompt"] for r in csv.DictReader(fh) if r["label"] == "safe"][200:216]
    tok = _tokenizer(base_model.path)
    states, _ = NumpyLlama(base_model.path).run([chat_tokens(tok, p) for p in harmful + harmless])
    directions, _ = base_data
    layer = 20
    proj = states.last[layer] @ directions.last[layer]
    threshold = (proj[:16].mean() + proj[16:].mean()) / 2
    accuracy = (np.sum(proj[:16] > threshold) + np.sum(proj[16:] <= threshold)) / 32
    assert accuracy >= 0.9, accuracy


# -- the static check on the fixtures ------------------------------------------------------------------------


@pytest.mark.slow
def test_every_abliteration_fixture_is_rejected(fixtures, base_data) -> None:
    from runtime.guard.audit import decide, static_check

    abliterations, _ = fixtures
    assert len(abliterations) >= 30
    missed = []
    for f in abliterations:
        verdict, _ = decide(static_check(f.tensors, f.peft_config, *base_data), None)
        if verdict != "reject":
            missed.append(f.name)
    assert not missed, missed


@pytest.mark.slow
def test_no_benign_fixture_is_rejected_or_warned(fixtures, base_data) -> None:
    from runtime.guard.audit import SUPPRESS_WEAK, decide, static_check

    _, benign = fixtures
    assert len(benign) >= 60
    flagged = []
    for f in benign:
        result = static_check(f.tensors, f.peft_config, *base_data)
        verdict, _ = decide(result, None)
        if verdict != "pass" or result.peak >= SUPPRESS_WEAK:
            flagged.append((f.name, verdict, round(result.peak, 3)))
    assert not flagged, flagged


def test_exact_abliteration_scores_its_strength(fixture_base, base_data) -> None:
    """With the audit's own direction, suppression equals heretic's weight, also past 1 (reflection)."""
    from runtime.guard.audit import static_check

    directions, projections = base_data
    r = directions.last[18]
    for weight in (0.25, 1.0, 2.5):
        ws = {ab.O_PROJ: [weight] * 30, ab.DOWN_PROJ: [0.0] * 30}
        tensors, cfg = ab.heretic_adapter(fixture_base, lambda m, l: r, ws, rank=1, rng=np.random.default_rng(0))
        result = static_check(tensors, cfg, directions, projections)
        top = max(result.modules, key=lambda m: m.suppression)
        assert abs(top.suppression - weight) < 0.02 * max(1.0, weight), (weight, top)
        assert result.writer_modules == 30 and len(result.strong) == 30


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 6), seed=st.integers(0, 2**32 - 1), alpha=st.floats(0.25, 64.0))
@example(rank=3, seed=59057, alpha=1.0)  # cond(G) ≈ 2,700: broke the float32 version of the score
def test_score_is_invariant_to_refactoring_and_alpha(base_data, rank, seed, alpha) -> None:
    """B·A is what llama.cpp applies: any (B·G, G⁻¹·A) split and any alpha with the same alpha/r·B·A score alike."""
    from runtime.guard.audit import static_check

    directions, projections = base_data
    rng = np.random.default_rng(seed)
    name = "base_model.model.model.layers.{}.mlp.down_proj.lora_{}.weight"
    a = rng.standard_normal((rank, 1536)).astype(np.float32) / 40
    b = (rng.standard_normal((576, rank)) + 3 * np.outer(directions.last[12], np.ones(rank))).astype(np.float32)
    t1 = {name.format(7, "A"): a, name.format(7, "B"): b}
    g = rng.standard_normal((rank, rank)) + 3 * np.eye(rank)
    t2 = {name.format(7, "A"): (np.linalg.inv(g) @ a).astype(np.float32),
          name.format(7, "B"): (b @ g * (rank / alpha)).astype(np.float32)}
    s1 = static_check(t1, {"r": rank, "lora_alpha": rank}, directions, projections).modules[0]
    s2 = static_check(t2, {"r": rank, "lora_alpha": alpha}, directions, projections).modules[0]
    assert s1.suppression == pytest.approx(s2.suppression, rel=1e-3, abs=1e-4)
    assert s1.alignment == pytest.approx(s2.alignment, rel=1e-3, abs=1e-4)


def test_uninterpretable_adapters_are_errors(base_data) -> None:
    from runtime.guard.audit import static_check
    from vault.errors import GuardError

    a = np.ones((2, 576), np.float32)
    with pytest.raises(GuardError, match="does not exist"):
        static_check({"model.layers.40.self_attn.o_proj.lora_A.weight": a,
                      "model.layers.40.self_attn.o_proj.lora_B.weight": np.ones((576, 2), np.float32)},
                     {"r": 2}, *base_data)
    with pytest.raises(GuardError, match="do not match"):
        static_check({"model.layers.1.self_attn.o_proj.lora_A.weight": a,
                      "model.layers.1.self_attn.o_proj.lora_B.weight": np.ones((500, 2), np.float32)},
                     {"r": 2}, *base_data)
    with pytest.raises(GuardError, match="interpret"):
        static_check({"lm_head.lora_A.weight": a}, {"r": 2}, *base_data)


# -- cache, vault entry, force -------------------------------------------------------------------------------


@pytest.fixture
def vault_with_adapters(keyring_env, base_model, fixture_base):
    from vault.store import Vault

    vault = Vault.create()[0]
    rng = np.random.default_rng(5)
    good = ab.random_lora(fixture_base, ab.ALL_MODULES, 4, 0.1, rng)
    from runtime.guard.directions import load_directions

    evil_dir = load_directions(base_model).last[16]
    evil = ab.heretic_adapter(fixture_base, lambda m, l: evil_dir,
                              {ab.O_PROJ: [1.0] * 30, ab.DOWN_PROJ: [1.0] * 30}, rank=1, rng=rng)
    vault.add_blob("good", _blob(*good, base_model))
    vault.add_blob("evil", _blob(*evil, base_model))
    return vault


def _audit(vault, name, base_model, **kw):
    from runtime.guard.audit import audit_adapter
    from vault.adapter import load_blob

    tensors, meta = load_blob(vault.open(name))
    return audit_adapter(tensors, meta, base_model, vault=vault, name=name, **kw)


def test_verdicts_are_cached_under_a_keyring_mac(vault_with_adapters, base_model, isolated_home) -> None:
    from runtime.guard.audit import MAC_KEY_NAME

    vault = vault_with_adapters
    first = _audit(vault, "evil", base_model)
    assert first.verdict == "reject" and not first.cached
    assert "abliteration fingerprint" in first.reasons[0]
    assert vault.get("evil").audit["verdict"] == "reject"  # shown by `vault list`
    assert _audit(vault, "good", base_model).verdict == "pass"
    assert vault.keys.get(MAC_KEY_NAME) and len(bytes.fromhex(vault.keys.get(MAC_KEY_NAME))) == 32
    cache = isolated_home / "guard" / "audit-cache.json"
    assert cache.stat().st_mode & 0o777 == 0o600
    again = _audit(vault, "evil", base_model)
    assert again.cached and again.verdict == "reject"
    # an edited cache (the attacker flips the verdict) is not trusted: the audit is recomputed
    raw = json.loads(cache.read_text())
    for value in raw["body"]["verdicts"].values():
        value["verdict"] = "pass"
    cache.write_text(json.dumps(raw))
    edited = _audit(vault, "evil", base_model)
    assert edited.verdict == "reject" and not edited.cached
    # a cache MACed under another key is not trusted either (a new process reads the new key)
    from runtime.guard import audit as audit_mod

    vault.keys.set(MAC_KEY_NAME, "00" * 32)
    audit_mod._MAC_KEYS.clear()
    assert not _audit(vault, "evil", base_model).cached


def test_force_is_logged_remembered_and_refused_under_licence(vault_with_adapters, base_model, isolated_home) -> None:
    from runtime.guard.audit import require_loadable
    from vault.errors import AuditRejectedError, LicenceError

    vault = vault_with_adapters
    report = _audit(vault, "evil", base_model)
    with pytest.raises(AuditRejectedError):
        require_loadable(report)
    forced = _audit(vault, "evil", base_model, force=True)
    assert forced.verdict == "reject" and forced.details["forced"]
    require_loadable(forced)
    log = (isolated_home / "logs" / "audit.log").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["adapter"] == "evil" and json.loads(log[0])["event"] == "forced"
    later = _audit(vault, "evil", base_model)   # the override is remembered (MACed) for this adapter+base
    assert later.details.get("forced") and vault.get("evil").audit["forced"]
    vault.update_entry("evil", licence={"licensor": "someone"})
    with pytest.raises(LicenceError):
        _audit(vault, "evil", base_model, force=True)
    licensed = _audit(vault, "evil", base_model)  # an earlier override no longer applies
    assert not licensed.details.get("forced")
    with pytest.raises(AuditRejectedError):
        require_loadable(licensed)


# -- behavioural check (real llama.cpp) -----------------------------------------------------------------------


@pytest.mark.slow
def test_behavioural_check_is_uninformative_on_a_base_that_complies(vault_with_adapters, base_model, isolated_home):
    from runtime.engine import Engine

    with Engine(base_model, n_threads=1) as engine:  # 1 thread: spinning llama.cpp workers crawl on a busy box
        report = _audit(vault_with_adapters, "evil", base_model, engine=engine)
        behaviour = report.details["behaviour"]
        assert behaviour["status"] == "uninformative" and behaviour["base_refusals"] < 3
        assert behaviour["adapter_refusals"] is None  # not generated: it could not change the verdict
        assert any("uninformative" in r for r in report.reasons)
        assert report.verdict == "reject"          # the static check still decides
        assert behaviour["kl_mean"] > 0.0
        assert list((isolated_home / "guard").glob("behaviour-*.npz"))  # base answers cached per digest
        good = _audit(vault_with_adapters, "good", base_model, engine=engine)
        assert good.details["behaviour"]["status"] == "uninformative" and good.verdict == "pass"
        assert good.details["behaviour"]["seconds"] < behaviour["seconds"]  # base side came from the cache
        assert engine.adapters == []                # the audit's temporary adapter was unloaded


# -- the CLI --------------------------------------------------------------------------------------------------


def vault_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


@pytest.mark.slow
def test_cli_audit(vault_with_adapters, isolated_home) -> None:
    out = vault_cli("audit", "good", "--json", "--no-behaviour")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["verdict"] == "pass"
    out = vault_cli("audit", "evil", "--json", "--no-behaviour")
    assert out.returncode == 16 and json.loads(out.stdout)["verdict"] == "reject"
    out = vault_cli("audit", "evil", "--no-behaviour")
    assert out.returncode == 16 and "REJECT" in out.stdout and "(cached verdict)" in out.stdout
    out = vault_cli("audit", "evil", "--force", "--no-behaviour")
    assert out.returncode == 0 and "forced" in out.stdout
    assert (isolated_home / "logs" / "audit.log").is_file()
    out = vault_cli("list", "--json")
    assert out.returncode == 0, out.stderr
    listed = {e["name"]: e for e in json.loads(out.stdout)}
    assert "reject" in json.dumps(listed["evil"]) and "pass" in json.dumps(listed["good"])
    out = vault_cli("audit", "nosuch")
    assert out.returncode == 8
