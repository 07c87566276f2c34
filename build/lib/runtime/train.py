"""LoRA training on CPU, from the same GGUF the runtime serves, straight into the vault.

The flow of ``train()``:
  1. read the user's files once into memory (runtime.train_data), never copying them;
  2. load the base GGUF into torch, dequantized (transformers' GGUF loader), and wrap it with a
     PEFT LoRA;
  3. hold out part of the examples; measure the base's held-out perplexity;
  4. train with AdamW, reporting step / loss / tokens/s / ETA through ``progress``; every
     ``checkpoint_every_s`` seconds the LoRA weights, the optimizer state, the step and the data
     order seed are serialized IN MEMORY (safetensors bytes) and sealed as a vault record of kind
     "checkpoint", so an interrupted run resumes where the last checkpoint left it;
  5. measure the adapter's held-out perplexity and draw a short sample;
  6. serialize the adapter in memory (vault.adapter.make_blob), seal it with ``Vault.add_blob``,
     drop the checkpoint, and have the guard audit it before its first use.

torch, transformers and peft come from the ``[train]`` extra and are imported only inside the
functions that need them, so ``import runtime.train`` costs nothing on a plain install.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime.models import BaseModel, resolve
from runtime.train_data import IGNORE, Corpus, Example, build_examples, read_corpus, split_examples
from vault.errors import TrainingError, VaultError
from vault.paths import vault_home

__all__ = [
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "Estimate",
    "DEFAULT_TARGETS",
    "CHECKPOINT_KIND",
    "train",
    "estimate",
    "require_torch",
    "load_base",
    "adapter_tensors",
    "adapter_config",
]

CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_FORMAT = "vault-train-checkpoint/1"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Measured on the reference machine (2-core Xeon with AVX-512, torch 2.13.0 CPU, fp32, SmolLM2-135M, rank 8 on
# all 7 projections, 256-token sequences, one at a time): ~250 training tokens/s with both cores idle (it drops
# to 40-75 tokens/s when other jobs keep the load average at 7-13); RSS 1.0 GB once the base is loaded and a
# peak of 2.24 GB while training (bench/train.py). The dry run scales these by cores, sequence length and
# parameter count (~1.8 parameters per byte of a 4-bit GGUF): an estimate for an idle machine, and it says so.
_REF_TOKENS_PER_S = 250.0
_REF_CORES = 2
_REF_PARAMS = 135e6
_REF_LOAD_S = 25.0  # GGUF -> torch, tokenizer conversion
_REF_FINISH_S = 40.0  # sample, seal, audit
_LOADED_RSS = 1.0e9
_TRAIN_RSS_PER_256 = 1.24e9  # peak minus loaded, per 256 tokens in one micro-batch

Progress = Callable[["TrainEvent"], None]


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of one training run. Defaults fit a 2-core, 8-24 GB laptop and the embedded base."""

    rank: int = 8
    alpha: int = 16
    epochs: int = 1
    learning_rate: float = 4e-4
    block_size: int = 256
    batch_size: int = 4
    micro_batch: int = 1  # sequences per forward/backward; gradients are accumulated up to batch_size
    heldout: float = 0.1
    seed: int = 0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    max_minutes: float | None = None
    max_steps: int | None = None  # stop (and seal) after this many steps in total; for tests and quick runs
    checkpoint_every_s: float = 120.0
    checkpoint_every_steps: int | None = None
    sample_tokens: int = 40
    threads: int | None = None

    def validate(self) -> None:
        if not 1 <= self.rank <= 256:
            raise TrainingError("rank must be between 1 and 256")
        if self.alpha <= 0:
            raise TrainingError("alpha must be positive")
        if not 1 <= self.epochs <= 100:
            raise TrainingError("epochs must be between 1 and 100")
        if not 32 <= self.block_size <= 4096:
            raise TrainingError("block size must be between 32 and 4096 tokens")
        if not 1 <= self.batch_size <= 256:
            raise TrainingError("batch size must be between 1 and 256")
        if not 1 <= self.micro_batch <= self.batch_size:
            raise TrainingError("micro-batch must be between 1 and the batch size")
        if not 0.0 <= self.heldout < 0.5:
            raise TrainingError("held-out fraction must be in [0, 0.5)")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainingError("max minutes must be positive")
        if not self.target_modules or not set(self.target_modules) <= set(DEFAULT_TARGETS):
            raise TrainingError(f"target modules must be among {', '.join(DEFAULT_TARGETS)}")

    def identity(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to be resumed (not time limits)."""
        keep = ("rank", "alpha", "epochs", "learning_rate", "block_size", "batch_size", "heldout", "seed",
                "target_modules")
        d = asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in keep}


@dataclass(frozen=True)
class TrainEvent:
    """One progress report. ``phase``: load, eval, train, checkpoint, sample, seal, audit."""

    phase: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""


@dataclass
class Estimate:
    """What a run would cost, computed before any model is loaded."""

    files: int
    bytes: int
    examples: int
    train_examples: int
    heldout_examples: int
    train_tokens: int
    steps: int
    tokens_per_s: float
    threads: int
    seconds: float
    peak_rss_bytes: int
    available_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    name: str
    steps: int
    total_steps: int
    resumed_from: int
    stopped_early: bool
    train_tokens: int
    heldout_tokens: int
    ppl_base: float | None
    ppl_adapter: float | None
    sample_prompt: str
    sample_base: str
    sample_adapter: str
    seconds: float
    peak_rss_bytes: int
    sha256: str
    audit: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ppl_drop(self) -> float | None:
        if not self.ppl_base or self.ppl_adapter is None:
            return None
        return 1.0 - self.ppl_adapter / self.ppl_base

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ppl_drop"] = self.ppl_drop
        return d


# --------------------------------------------------------------------------- torch plumbing


def _offline_env() -> None:
    """No hub access and no telemetry, ever; set before transformers is imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # OpenMP threads that spin while waiting for a descheduled sibling make a busy 2-core laptop
    # ~5x slower (measured); passive waiting costs nothing on an idle machine. Only read at torch import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF loader draws a raw tqdm bar; the library never prints


def default_threads() -> int:
    """Threads for torch: the cores not already busy (load average), at least one."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def require_torch() -> None:
    """Raise a TrainingError that says how to install the extra when torch is missing."""
    _offline_env()
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TrainingError(
            f"training needs the [train] extra ({exc.name} is missing): pip install 'vault-llm[train]'"
        ) from None


def load_tokenizer(base: BaseModel) -> Any:
    require_torch()
    _offline_env()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base.path.parent), gguf_file=base.path.name)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainingError(f"failed to read the tokenizer of {base.name}: {exc}") from None


def load_base(base: BaseModel, *, threads: int | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): the GGUF dequantized to fp32 torch weights, frozen, in eval mode."""
    require_torch()
    _offline_env()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, threads or default_threads()))
    tokenizer = load_tokenizer(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(base.path.parent), gguf_file=base.path.name, dtype=torch.float32, low_cpu_mem_usage=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TrainingError(f"failed to load {base.name} for training: {exc}") from None
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def adapter_config(config: TrainConfig, base: BaseModel) -> dict[str, Any]:
    """The adapter_config.json written into the sealed blob (PEFT's own field names)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "target_modules": list(config.target_modules),
    }


def wrap_lora(model: Any, config: TrainConfig) -> Any:
    import warnings

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none",
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated in v5
        return get_peft_model(model, lora)


def _trainable(model: Any) -> list[tuple[str, Any]]:
    return sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)


def adapter_tensors(model: Any) -> dict[str, Any]:
    """LoRA weights as float32 numpy arrays under PEFT's saved names (no ``.default``)."""
    out = {}
    for name, param in _trainable(model):
        out[name.replace(".default.weight", ".weight")] = param.detach().to("cpu").float().numpy().copy()
    return out


def load_adapter_tensors(model: Any, tensors: dict[str, Any]) -> None:
    """Copy sealed LoRA weights (PEFT saved names) into a PEFT model; every tensor must match."""
    import torch

    params = dict(_trainable(model))
    seen = set()
    for name, array in tensors.items():
        key = name.replace(".weight", ".default.weight")
        if key not in params:
            raise TrainingError(f"the adapter has a tensor this model cannot take: {name}")
        if tuple(params[key].shape) != tuple(array.shape):
            raise TrainingError(f"the adapter's tensor {name} has shape {tuple(array.shape)}, "
                                f"expected {tuple(params[key].shape)}")
        with torch.no_grad():
            params[key].copy_(torch.from_numpy(np.array(array, dtype=np.float32)))
        seen.add(key)
    if seen != set(params):
        raise TrainingError("the adapter does not cover every LoRA module of this configuration")


def _batch(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _token_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Summed next-token negative log-likelihood over labelled tokens, and their count."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, int((shift_labels != IGNORE).sum())


def _accumulate(model: Any, chunk: Sequence[Example], pad_id: int, micro: int) -> tuple[float, int]:
    """Backward over ``chunk`` in micro-batches (activations of ``micro`` sequences at a time).

    Gradients equal those of the whole batch: every micro-batch's summed NLL is divided by the
    batch's total number of target tokens. Returns (mean loss, tokens processed).
    """
    n_total = sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in chunk)
    total_nll = 0.0
    for i in range(0, len(chunk), micro):
        nll, _ = _token_nll(model, _batch(chunk[i : i + micro], pad_id))
        (nll / max(1, n_total)).backward()
        total_nll += float(nll.detach())
    return total_nll / max(1, n_total), sum(len(e.input_ids) for e in chunk)


def perplexity(model: Any, examples: Sequence[Example], pad_id: int, *, batch_size: int = 1) -> float | None:
    """exp(mean token NLL) over ``examples``; None when there is nothing to measure."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            nll, n = _token_nll(model, _batch(examples[i : i + batch_size], pad_id))
            total += float(nll)
            count += n
    return math.exp(total / count) if count else None


# --------------------------------------------------------------------------- checkpoints


def _pack_checkpoint(model: Any, optimizer: Any, *, step: int, meta: dict[str, Any]) -> bytes:
    """LoRA weights + AdamW state as safetensors bytes (no pickle), built in memory."""
    from safetensors.torch import save

    tensors = {}
    for i, (name, param) in enumerate(_trainable(model)):
        tensors[f"adapter/{name}"] = param.detach().contiguous()
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                value = state[key]
                tensors[f"optim/{i}/{key}"] = value.detach().reshape(-1).contiguous() if key == "step" \
                    else value.detach().contiguous()
    return save(tensors, metadata={"format": CHECKPOINT_FORMAT, "step": str(step), "meta": json.dumps(meta)})


def _unpack_checkpoint(data: bytes | bytearray) -> tuple[int, dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load

    try:
        tensors = load(bytes(data))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError type
        raise TrainingError(f"the sealed training checkpoint is unreadable: {exc}") from None
    header_len = int.from_bytes(bytes(data[:8]), "little")
    header = json.loads(bytes(data[8 : 8 + header_len]))
    metadata = header.get("__metadata__", {})
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError("the sealed training checkpoint has an unknown format")
    return int(metadata["step"]), json.loads(metadata["meta"]), tensors


def _restore(model: Any, optimizer: Any, tensors: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for i, (name, param) in enumerate(_trainable(model)):
            saved = tensors.get(f"adapter/{name}")
            if saved is None or saved.shape != param.shape:
                raise TrainingError("the checkpoint does not match this model and configuration; use --no-resume")
            param.copy_(saved)
            if f"optim/{i}/exp_avg" in tensors:
                optimizer.state[param] = {
                    "step": tensors[f"optim/{i}/step"].reshape(()).clone(),
                    "exp_avg": tensors[f"optim/{i}/exp_avg"].clone(),
                    "exp_avg_sq": tensors[f"optim/{i}/exp_avg_sq"].clone(),
                }


def _open_checkpoint(vault: Any, name: str) -> bytearray | None:
    if name not in vault.records(CHECKPOINT_KIND):
        return None
    return vault.open_record(CHECKPOINT_KIND, name)


# --------------------------------------------------------------------------- the run


def _lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then linear decay to 10% of the peak."""
    warm = max(1, int(0.05 * total))
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (1.0 - 0.9 * min(1.0, frac))


def _order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sample(tokenizer: Any, held: Sequence[Example], corpus: Corpus) -> tuple[str, list[int]]:
    """A prompt in the user's own style: the start of a held-out block, or a held-out chat prompt."""
    if corpus.texts:
        source = held[0] if held else None
        ids = list(source.input_ids[:24]) if source is not None else tokenizer(corpus.texts[0][:200])["input_ids"][:24]
        return tokenizer.decode(ids), ids
    chat = corpus.chats[-1]
    prompt = [m for m in chat if m["role"] != "assistant"][:1] or chat[:1]
    encoded = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return prompt[0]["content"], ids


def _generate(model: Any, tokenizer: Any, ids: list[int], n_tokens: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                             max_new_tokens=n_tokens, do_sample=False, repetition_penalty=1.15,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def _emit(progress: Progress | None, event: TrainEvent) -> None:
    if progress is not None:
        progress(event)


def estimate(paths: Sequence[Path | str], config: TrainConfig = TrainConfig(), *, base: str | None = None) -> Estimate:
    """Time and memory a run would take, from the real token count and measured reference rates.

    Loads only the tokenizer (seconds), never the model.
    """
    import psutil

    config.validate()
    model = resolve(base)  # no digest cache: a dry run writes nothing at all
    corpus = read_corpus(paths)
    tokenizer = load_tokenizer(model)
    examples = build_examples(corpus, tokenizer, block_size=config.block_size)
    train_ex, held = split_examples(examples, heldout=config.heldout, seed=config.seed)
    train_tokens = sum(len(e.input_ids) for e in train_ex) * config.epochs
    held_tokens = sum(len(e.input_ids) for e in held)
    steps = math.ceil(len(train_ex) / config.batch_size) * config.epochs
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
        train_tokens = min(train_tokens, steps * config.batch_size * config.block_size)
    cores = max(1, min(config.threads or default_threads(), os.cpu_count() or 1))
    scale = 1.0 if model.name == "SmolLM2-135M-Instruct" else max(model.size * 1.8, 1.0) / _REF_PARAMS
    rate = _REF_TOKENS_PER_S * (cores / _REF_CORES) / scale
    # training is ~3x a forward pass; two held-out passes (base, adapter) cost ~2/3 of a training pass
    seconds = _REF_LOAD_S * scale + train_tokens / rate + held_tokens * 2 / (rate * 3) + _REF_FINISH_S * scale
    if config.max_minutes is not None:
        seconds = min(seconds, (_REF_LOAD_S + _REF_FINISH_S) * scale + config.max_minutes * 60)
    peak = _LOADED_RSS * scale + _TRAIN_RSS_PER_256 * scale * config.micro_batch * config.block_size / 256
    return Estimate(
        files=corpus.files, bytes=corpus.bytes, examples=len(examples), train_examples=len(train_ex),
        heldout_examples=len(held), train_tokens=train_tokens, steps=steps, tokens_per_s=rate, threads=cores,
        seconds=seconds, peak_rss_bytes=int(peak), available_bytes=psutil.virtual_memory().available,
    )


def train(
    vault: Any,
    name: str,
    paths: Sequence[Path | str],
    config: TrainConfig = TrainConfig(),
    *,
    base: str | None = None,
    resume: bool = True,
    force: bool = False,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TrainResult:
    """Train a LoRA on ``paths`` and seal it into ``vault`` as ``name``.

    Args:
        vault: an open vault.store.Vault.
        name: the adapter name to create (``force`` to replace an existing one).
        paths: files and folders of .txt/.md/.jsonl.
        config: hyper-parameters and limits.
        base: base model name or GGUF path (default: the embedded model).
        resume: continue from this name's sealed checkpoint if there is one; otherwise start over.
        progress: called with a TrainEvent at every phase and step.
        clock: injectable monotonic clock (tests).

    Returns:
        TrainResult with perplexities, the sample, timings and the audit verdict.

    Raises:
        TrainingError: bad data or settings, the [train] extra is missing, or a checkpoint does not fit.
        AlreadyExistsError: ``name`` exists and ``force`` is False.
    """
    require_torch()
    import torch

    from runtime.memfd import harden

    config.validate()
    harden()  # no core dump and no same-uid ptrace: this process holds the user's text and weights
    started = clock()
    if not force and any(e.name == name for e in vault.entries()):
        from vault.errors import AlreadyExistsError

        raise AlreadyExistsError(f"an adapter named {name!r} already exists; use --force to replace it")
    model_info = resolve(base, cache_dir=vault_home())
    corpus = read_corpus(paths)
    _emit(progress, TrainEvent("load", message=f"loading {model_info.name}"))
    model, tokenizer = load_base(model_info, threads=config.threads)
    examples = build_examples(corpus, tokenizer, block_size=config.block_size)
    train_ex, held = split_examples(examples, heldout=config.heldout, seed=config.seed)
    pad_id = int(tokenizer.pad_token_id)

    model = wrap_lora(model, config)
    params = [p for _, p in _trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_ex) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    identity = {"config": config.identity(), "data": corpus.digest(), "base_sha256": model_info.sha256,
                "examples": len(examples)}

    step, resumed_from, ppl_base = 0, 0, None
    sealed_ckpt = _open_checkpoint(vault, name) if resume else None
    if sealed_ckpt is not None:
        try:
            ckpt_step, meta, tensors = _unpack_checkpoint(sealed_ckpt)
        finally:
            sealed_ckpt[:] = b"\0" * len(sealed_ckpt)
        if meta.get("identity") != identity:
            raise TrainingError(f"the sealed checkpoint of {name!r} was made with other data or settings; "
                                "train with --no-resume to start over")
        _restore(model, optimizer, tensors)
        step = resumed_from = ckpt_step
        ppl_base = meta.get("ppl_base")
        _emit(progress, TrainEvent("checkpoint", step=step, total=total, message=f"resumed at step {step}"))

    if ppl_base is None and held:
        _emit(progress, TrainEvent("eval", total=total, message="held-out perplexity of the base"))
        with model.disable_adapter():
            ppl_base = perplexity(model, held, pad_id)

    def seal_checkpoint(at: int) -> None:
        data = _pack_checkpoint(model, optimizer, step=at, meta={"identity": identity, "ppl_base": ppl_base})
        vault.seal_record(CHECKPOINT_KIND, name, data)
        _emit(progress, TrainEvent("checkpoint", step=at, total=total, message=f"sealed checkpoint at step {at}"))

    model.train()
    deadline = started + config.max_minutes * 60 if config.max_minutes else None
    last_ckpt, ema = clock(), None
    run_t0, run_tokens = clock(), 0
    stopped_early = False
    while step < total:
        if deadline is not None and clock() >= deadline:
            stopped_early = True
            break
        epoch, within = divmod(step, steps_per_epoch)
        order = _order(len(train_ex), epoch, config.seed)
        chunk = [train_ex[i] for i in order[within * config.batch_size : (within + 1) * config.batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, config.learning_rate)
        value, tokens = _accumulate(model, chunk, pad_id, config.micro_batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        run_tokens += tokens
        if not math.isfinite(value):
            raise TrainingError(f"training diverged at step {step} (loss is {value}); try a lower learning rate")
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        now = clock()
        rate = run_tokens / max(now - run_t0, 1e-9)
        eta = (total - step) * (now - run_t0) / max(1, step - resumed_from)
        _emit(progress, TrainEvent("train", step=step, total=total, loss=ema, tokens_per_s=rate, eta_s=eta))
        due_steps = config.checkpoint_every_steps is not None and step % config.checkpoint_every_steps == 0
        if step < total and (due_steps or now - last_ckpt >= config.checkpoint_every_s):
            seal_checkpoint(step)
            last_ckpt = now
    model.eval()

    ppl_adapter = None
    if held:
        _emit(progress, TrainEvent("eval", step=step, total=total, message="held-out perplexity of the adapter"))
        ppl_adapter = perplexity(model, held, pad_id)
    _emit(progress, TrainEvent("sample", step=step, total=total, message="drawing a sample"))
    prompt, ids = _sample(tokenizer, held, corpus)
    sample_adapter = _generate(model, tokenizer, ids, config.sample_tokens)
    with model.disable_adapter():
        sample_base = _generate(model, tokenizer, ids, config.sample_tokens)

    _emit(progress, TrainEvent("seal", step=step, total=total, message=f"sealing {name!r}"))
    from vault.adapter import make_blob

    blob = make_blob(adapter_tensors(model), adapter_config(config, model_info), base_name=model_info.name,
                     base_sha256=model_info.sha256)
    entry = vault.add_blob(name, blob, source="train", force=force)
    if name in vault.records(CHECKPOINT_KIND):
        vault.remove_record(CHECKPOINT_KIND, name)
    audit = audit_new_adapter(vault, name, model_info, progress)
    return TrainResult(
        name=name, steps=step, total_steps=total, resumed_from=resumed_from, stopped_early=stopped_early,
        train_tokens=sum(len(e.input_ids) for e in train_ex), heldout_tokens=sum(len(e.input_ids) for e in held),
        ppl_base=ppl_base, ppl_adapter=ppl_adapter, sample_prompt=prompt, sample_base=sample_base,
        sample_adapter=sample_adapter, seconds=clock() - started, peak_rss_bytes=_peak_rss(),
        sha256=getattr(entry, "sha256", ""), audit=audit,
    )


def audit_new_adapter(
    vault: Any, name: str, base: BaseModel, progress: Progress | None = None
) -> dict[str, Any] | None:
    """Have the guard audit a freshly sealed adapter before anything uses it.

    The guard records its verdict on the vault entry (``audit``) and in its MACed cache, so the
    loader's audit before the first load is a cache hit. Returns the report as JSON, or None when
    this install has no real guard (the runtime's loader then audits before the first load).

    Raises:
        AuditRejectedError: the audit rejected the adapter; it stays sealed, marked rejected, and is never loaded.
    """
    try:
        from runtime.guard import default_guard  # type: ignore[attr-defined]
    except ImportError:
        return None
    from runtime.loader import AdapterTensors
    from vault.adapter import load_blob
    from vault.errors import AuditRejectedError, GuardError

    _emit(progress, TrainEvent("audit", message=f"auditing {name!r}"))
    blob = vault.open(name)
    try:
        tensors, meta = load_blob(blob)
        report = default_guard(vault).audit_adapter(AdapterTensors(tensors, meta, name), base)
        del tensors
    except AuditRejectedError:
        raise
    except GuardError as exc:
        # The adapter is sealed and safe at rest; the loader audits it again before any use and refuses
        # it while the guard cannot run, so a broken guard must not make a finished training run fail.
        return {"verdict": "pending", "reasons": [f"the guard could not audit it yet: {exc.message}"]}
    finally:
        blob[:] = bytes(len(blob))
    verdict = report.to_json()  # the guard records its verdict on the vault entry itself
    if report.verdict == "reject":
        raise AuditRejectedError(f"the adapter audit rejected {name!r}: {'; '.join(report.reasons) or 'no reason'}")
    return verdict


def resumable(vault: Any, name: str) -> bool:
    """True when ``name`` has a sealed training checkpoint."""
    try:
        return name in vault.records(CHECKPOINT_KIND)
    except VaultError:
        return False

