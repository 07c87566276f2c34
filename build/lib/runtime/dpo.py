"""Direct Preference Optimization (DPO) on the user's sealed preference pairs, on CPU.

``vault run`` records ``/good``, ``/bad`` and ``/prefer`` as sealed records of kind "preference"
(JSON ``{"messages", "chosen", "rejected", "adapter", "created"}``). ``train_preferences`` opens the
pairs recorded for one adapter, tunes that adapter with the DPO loss (Rafailov et al., 2023)

    loss = -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))

where ``ref`` is the adapter as it was before this run (its log-probabilities are computed once,
up front, so no second model is held in memory), and seals the result under the same name.

We use a small loss of our own rather than TRL: TRL's DPOTrainer keeps a reference model copy and
writes its output and logs to a directory on disk, both against this project's budget and its
no-plaintext rule; the loss itself is a few lines and is tested against a hand computation.

Preference accuracy, reported on held-out pairs before and after, is the fraction of pairs for
which the model gives the chosen answer a higher log-likelihood than the rejected one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from runtime.models import resolve
from runtime.train import (
    TrainConfig,
    TrainEvent,
    adapter_config,
    adapter_tensors,
    audit_new_adapter,
    load_adapter_tensors,
    load_base,
    require_torch,
    wrap_lora,
)
from vault.errors import TrainingError
from vault.paths import vault_home

__all__ = ["PREFERENCE_KIND", "Pair", "DpoConfig", "DpoResult", "dpo_loss", "load_pairs", "pair_logps",
           "preference_accuracy", "train_preferences", "tune"]

PREFERENCE_KIND = "preference"
MAX_PAIR_CHARS = 32_000

Progress = Callable[[TrainEvent], None]


@dataclass(frozen=True)
class Pair:
    messages: tuple[dict[str, str], ...]  # the conversation up to the answer (ends with a user turn)
    chosen: str
    rejected: str


@dataclass(frozen=True)
class DpoConfig:
    beta: float = 0.1
    learning_rate: float = 1e-4
    epochs: int = 3
    heldout: float = 0.2
    seed: int = 0
    max_tokens: int = 384  # prompt + answer, per sequence
    max_minutes: float | None = None
    threads: int | None = None

    def validate(self) -> None:
        if not 0 < self.beta <= 10:
            raise TrainingError("beta must be in (0, 10]")
        if not 1 <= self.epochs <= 100:
            raise TrainingError("epochs must be between 1 and 100")
        if not 0.0 <= self.heldout < 1.0:
            raise TrainingError("held-out fraction must be in [0, 1)")


@dataclass
class DpoResult:
    name: str
    pairs: int
    train_pairs: int
    heldout_pairs: int
    steps: int
    accuracy_before: float | None
    accuracy_after: float | None
    train_accuracy_before: float
    train_accuracy_after: float
    final_loss: float | None
    seconds: float
    sha256: str
    audit: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def dpo_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> Any:
    """Mean DPO loss over a batch of summed sequence log-probabilities (torch tensors)."""
    import torch.nn.functional as F

    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def _parse_pair(raw: bytes | bytearray) -> Pair | None:
    try:
        obj = json.loads(bytes(raw))
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    messages, chosen, rejected = obj.get("messages"), obj.get("chosen"), obj.get("rejected")
    if not (isinstance(messages, list) and isinstance(chosen, str) and isinstance(rejected, str)):
        return None
    clean = []
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            return None
        clean.append({"role": m["role"], "content": m["content"]})
    size = sum(len(m["content"]) for m in clean) + len(chosen) + len(rejected)
    if not clean or chosen == rejected or size > MAX_PAIR_CHARS:
        return None
    return Pair(tuple(clean), chosen, rejected)


def load_pairs(vault: Any, adapter: str) -> list[Pair]:
    """The sealed preference pairs recorded while ``adapter`` was active, oldest record name first."""
    pairs = []
    for record in vault.records(PREFERENCE_KIND):
        raw = vault.open_record(PREFERENCE_KIND, record)
        try:
            obj = json.loads(bytes(raw)) if raw else None
            if isinstance(obj, dict) and obj.get("adapter") == adapter:
                pair = _parse_pair(raw)
                if pair is not None:
                    pairs.append(pair)
        except ValueError:
            continue
        finally:
            raw[:] = bytes(len(raw))
    return pairs


def _encode(tokenizer: Any, pair: Pair, answer: str, max_tokens: int) -> tuple[list[int], int]:
    """Token ids of prompt+answer (chat template) and where the answer starts."""
    def ids(x: Any) -> list[int]:
        return [int(t) for t in (x["input_ids"] if hasattr(x, "keys") else x)]

    prompt = ids(tokenizer.apply_chat_template(list(pair.messages), tokenize=True, add_generation_prompt=True))
    full = ids(tokenizer.apply_chat_template(list(pair.messages) + [{"role": "assistant", "content": answer}],
                                             tokenize=True))
    if full[: len(prompt)] != prompt:  # a template that rewrites earlier turns: fall back to plain concatenation
        full = prompt + ids(tokenizer(answer, add_special_tokens=False))
    if len(full) > max_tokens:  # keep the answer, cut the oldest prompt tokens
        cut = len(full) - max_tokens
        if cut >= len(prompt):
            raise TrainingError("a preference answer is longer than the token limit")
        full, start = full[cut:], len(prompt) - cut
    else:
        start = len(prompt)
    return full, start


def pair_logps(model: Any, tokenizer: Any, pairs: Sequence[Pair], *, max_tokens: int) -> tuple[Any, Any]:
    """Summed log-probabilities of the chosen and rejected answers, one pair at a time (differentiable)."""
    import torch

    chosen, rejected = [], []
    for pair in pairs:
        for answer, out in ((pair.chosen, chosen), (pair.rejected, rejected)):
            ids, start = _encode(tokenizer, pair, answer, max_tokens)
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = x[0, 1:]
            token_logp = logp.gather(1, target.unsqueeze(1)).squeeze(1)
            out.append(token_logp[start - 1 :].sum())
    return torch.stack(chosen), torch.stack(rejected)


def preference_accuracy(model: Any, tokenizer: Any, pairs: Sequence[Pair], *, max_tokens: int) -> float | None:
    """Fraction of pairs where log p(chosen) > log p(rejected); None for no pairs."""
    import torch

    if not pairs:
        return None
    with torch.no_grad():
        c, r = pair_logps(model, tokenizer, pairs, max_tokens=max_tokens)
    return float((c > r).float().mean())


def _split(pairs: list[Pair], heldout: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = min(len(pairs) - 1, max(1, round(len(pairs) * heldout))) if heldout > 0 and len(pairs) > 1 else 0
    return [pairs[i] for i in sorted(order[n_held:])], [pairs[i] for i in sorted(order[:n_held])]


def tune(model: Any, tokenizer: Any, train: Sequence[Pair], config: DpoConfig, *,
         progress: Progress | None = None, clock: Callable[[], float] = time.monotonic) -> tuple[int, float | None]:
    """Run DPO on a PEFT model in place (one pair per step). Returns (steps, last loss).

    The reference log-probabilities are those of the model as passed in, computed before any update.
    """
    import torch

    with torch.no_grad():
        ref_c, ref_r = pair_logps(model, tokenizer, train, max_tokens=config.max_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    total = len(train) * config.epochs
    start, step, last = clock(), 0, None
    deadline = start + config.max_minutes * 60 if config.max_minutes else None
    model.train()
    for epoch in range(config.epochs):
        order = list(range(len(train)))
        random.Random(config.seed * 7919 + epoch).shuffle(order)
        for i in order:
            if deadline is not None and clock() >= deadline:
                model.eval()
                return step, last
            c, r = pair_logps(model, tokenizer, [train[i]], max_tokens=config.max_tokens)
            loss = dpo_loss(c, r, ref_c[i : i + 1], ref_r[i : i + 1], config.beta)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = float(loss.detach())
            if not math.isfinite(last):
                raise TrainingError(f"preference tuning diverged at step {step}; try a lower learning rate")
            elapsed = clock() - start
            if progress is not None:
                progress(TrainEvent("train", step=step, total=total, loss=last,
                                    eta_s=(total - step) * elapsed / step))
    model.eval()
    return step, last


def train_preferences(vault: Any, name: str, config: DpoConfig = DpoConfig(), *, base: str | None = None,
                      progress: Progress | None = None, clock: Callable[[], float] = time.monotonic) -> DpoResult:
    """Tune adapter ``name`` on its sealed preference pairs and seal the result under the same name.

    Raises:
        UnknownNameError: no adapter ``name``.
        TrainingError: no usable pairs, or the [train] extra is missing.
        BaseModelError: the adapter was made for another base than ``base``.
        AuditRejectedError: the guard rejected the tuned adapter.
        LicenceError: ``name`` arrived under a licence that does not permit 'merge' (derived weights).
    """
    require_torch()
    from runtime.memfd import harden
    from vault.adapter import load_blob
    from vault.errors import BaseModelError
    from vault.licence import enforce

    config.validate()
    harden()  # no core dump and no same-uid ptrace while pairs and weights are in memory
    started = clock()
    enforce(vault.get(name), "merge")  # tuning a licensed adapter makes derived weights
    pairs = load_pairs(vault, name)
    if len(pairs) < 2:
        raise TrainingError(f"{len(pairs)} preference pair(s) recorded for {name!r}; record at least 2 with "
                            "/good, /bad or /prefer in 'vault run'")
    model_info = resolve(base, cache_dir=vault_home())
    blob = vault.open(name)
    try:
        tensors, meta = load_blob(blob)
        if meta.base_sha256 and meta.base_sha256 != model_info.sha256:
            raise BaseModelError(f"adapter {name!r} was made for base {meta.base_name}; pass that base with --base")
        targets = tuple(meta.target_modules)
        lora = TrainConfig(rank=meta.r, alpha=int(meta.alpha) if float(meta.alpha).is_integer() else meta.alpha,
                           target_modules=targets)
        if progress:
            progress(TrainEvent("load", message=f"loading {model_info.name} and {name!r}"))
        model, tokenizer = load_base(model_info, threads=config.threads)
        model = wrap_lora(model, lora)
        load_adapter_tensors(model, tensors)
        del tensors
    finally:
        blob[:] = bytes(len(blob))
    model.eval()
    train, held = _split(pairs, config.heldout, config.seed)
    if progress:
        progress(TrainEvent("eval", message="held-out preference accuracy before"))
    acc_before = preference_accuracy(model, tokenizer, held, max_tokens=config.max_tokens)
    train_before = preference_accuracy(model, tokenizer, train, max_tokens=config.max_tokens)
    steps, last = tune(model, tokenizer, train, config, progress=progress, clock=clock)
    if progress:
        progress(TrainEvent("eval", step=steps, message="held-out preference accuracy after"))
    acc_after = preference_accuracy(model, tokenizer, held, max_tokens=config.max_tokens)
    train_after = preference_accuracy(model, tokenizer, train, max_tokens=config.max_tokens)
    from vault.adapter import make_blob

    if progress:
        progress(TrainEvent("seal", step=steps, message=f"sealing {name!r}"))
    new_blob = make_blob(adapter_tensors(model), adapter_config(lora, model_info), base_name=model_info.name,
                         base_sha256=model_info.sha256)
    entry = vault.add_blob(name, new_blob, source="train", force=True)
    audit = audit_new_adapter(vault, name, model_info, progress)
    return DpoResult(
        name=name, pairs=len(pairs), train_pairs=len(train), heldout_pairs=len(held), steps=steps,
        accuracy_before=acc_before, accuracy_after=acc_after, train_accuracy_before=float(train_before or 0.0),
        train_accuracy_after=float(train_after or 0.0), final_loss=last, seconds=clock() - started,
        sha256=getattr(entry, "sha256", ""), audit=audit,
    )
