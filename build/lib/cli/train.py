"""`vault train`: personalize the base model from your own writing or your recorded preferences."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from cli.render import console, err_console, human_size, print_json
from vault.errors import UsageError

__all__ = ["COMMANDS", "train_cmd"]


def _minutes(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s" if seconds >= 60 else f"{seconds:.0f} s"


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[Any], None]]:
    """A rich bar on stderr fed by runtime.train's TrainEvent callback (nothing when not a terminal)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda event: None
        return
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
                  TextColumn("{task.fields[stats]}"), console=err_console(), transient=True) as bar:
        task = bar.add_task("loading", total=None, stats="")

        def update(event: Any) -> None:
            if event.phase == "train":
                stats = f"loss {event.loss:.3f}"
                if event.tokens_per_s:
                    stats += f"  {event.tokens_per_s:.0f} tok/s"
                if event.eta_s is not None:
                    stats += f"  ETA {_minutes(event.eta_s)}"
                bar.update(task, description="training", completed=event.step, total=event.total, stats=stats)
            else:
                bar.update(task, description=event.message or event.phase,
                           completed=event.step, total=event.total or None)

        yield update


def _dry_run(data: tuple[Path, ...], config: Any, base: str | None, as_json: bool) -> None:
    from runtime.train import estimate

    est = estimate(list(data), config, base=base)
    if as_json:
        print_json(est.to_json())
        return
    out = console()
    out.print(f"data: {est.files} file(s), {human_size(est.bytes)}, {est.examples} examples "
              f"({est.train_examples} to train on, {est.heldout_examples} held out)")
    out.print(f"training: {est.steps} steps over {est.train_tokens:,} tokens at about {est.tokens_per_s:.0f} tokens/s")
    out.print(f"estimated time: {_minutes(est.seconds)} with {est.threads} thread(s) at the current load "
              "(including ~25 s to load the base model)")
    out.print(f"estimated peak memory: {human_size(est.peak_rss_bytes)} of {human_size(est.available_bytes)} available")
    if est.peak_rss_bytes > est.available_bytes:
        out.print("[bold red]this will not fit in memory: lower --block-size or close other programs[/]")
    out.print("nothing was trained (dry run)")


def _report(result: Any, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    out = console()
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    early = " (stopped at --max-minutes)" if result.stopped_early else ""
    out.print(f"sealed adapter [bold]{result.name}[/] after {result.steps}/{result.total_steps} steps{resumed}{early} "
              f"in {_minutes(result.seconds)}; peak memory {human_size(result.peak_rss_bytes)}")
    if result.ppl_base is not None and result.ppl_adapter is not None:
        out.print(f"held-out perplexity: base {result.ppl_base:.2f} -> adapter {result.ppl_adapter:.2f} "
                  f"({100 * result.ppl_drop:.1f}% lower)" if result.ppl_drop >= 0 else
                  f"held-out perplexity: base {result.ppl_base:.2f} -> adapter {result.ppl_adapter:.2f} (higher)")
    out.print("sample prompt:", markup=False)
    out.print("  " + result.sample_prompt.strip(), markup=False)
    out.print("base model continues:", markup=False)
    out.print("  " + result.sample_base.strip(), markup=False)
    out.print("your adapter continues:", markup=False)
    out.print("  " + result.sample_adapter.strip(), markup=False)
    if result.audit is None or result.audit.get("verdict") == "pending":
        why = "; ".join((result.audit or {}).get("reasons", [])) or "no guard installed"
        out.print(f"audit: pending ({why}); the runtime audits the adapter before its first load", markup=False)
    else:
        out.print(f"audit: {result.audit.get('verdict')}")


def _report_dpo(result: Any, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    out = console()

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.0f}%"

    out.print(f"preference-tuned [bold]{result.name}[/] on {result.train_pairs} pair(s), {result.steps} steps, "
              f"in {_minutes(result.seconds)}")
    out.print(f"held-out preference accuracy ({result.heldout_pairs} pair(s)): "
              f"{pct(result.accuracy_before)} -> {pct(result.accuracy_after)}")
    out.print(f"training-pair accuracy: {pct(result.train_accuracy_before)} -> {pct(result.train_accuracy_after)}")
    if result.audit is not None:
        out.print(f"audit: {result.audit.get('verdict')}")


@click.command("train")
@click.argument("name")
@click.option("--data", "data", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A .txt/.md file, a .jsonl chat export, or a folder of them (repeatable).")
@click.option("--base", default=None, help="Base model: the embedded default, or a GGUF path.")
@click.option("--rank", default=8, show_default=True, type=click.IntRange(1, 256), help="LoRA rank.")
@click.option("--epochs", default=None, type=click.IntRange(1, 100),
              help="Passes over the data (default 1 for writing, 3 for --preferences).")
@click.option("--max-minutes", type=click.FloatRange(min=0.1), default=None,
              help="Stop training after this many minutes and seal what was learned.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps.")
@click.option("--learning-rate", type=click.FloatRange(min=1e-7, max=1.0), default=None,
              help="Peak learning rate (default 4e-4 for writing, 1e-4 for --preferences).")
@click.option("--block-size", default=256, show_default=True, type=click.IntRange(32, 4096),
              help="Tokens per training example; lower it to save memory.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: the cores not already busy).")
@click.option("--checkpoint-every", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Seconds between sealed checkpoints (0: after every step).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from this name's sealed checkpoint if an earlier run was interrupted.")
@click.option("--preferences", is_flag=True,
              help="Tune the existing adapter NAME on the preference pairs recorded in 'vault run' (DPO).")
@click.option("--dry-run", is_flag=True, help="Estimate time and memory, then stop.")
@click.option("--force", is_flag=True, help="Replace an existing adapter called NAME.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def train_cmd(name: str, data: tuple[Path, ...], base: str | None, rank: int, epochs: int | None,
              max_minutes: float | None,
              max_steps: int | None, learning_rate: float | None, block_size: int, threads: int | None,
              checkpoint_every: float, resume: bool, preferences: bool, dry_run: bool, force: bool,
              as_json: bool) -> None:
    """Train adapter NAME from your own writing, on this computer, sealed into the vault.

    vault reads your files once into memory, teaches a small LoRA adapter on top of the base model
    to continue text the way you write (and to answer like you in any chat exports), and seals it.
    Nothing you wrote, and no checkpoint, is ever written to disk unencrypted. Part of your data is
    held out to show how much better the adapter predicts your writing than the base (perplexity;
    lower is better), with a short sample. With the defaults on a 2-core laptop, 200 KB of text
    takes roughly 10-15 minutes. Interrupt any time: the next run resumes from the last checkpoint.

    With --preferences, the existing adapter NAME is tuned (DPO) on the answers you marked with
    /good, /bad and /prefer in 'vault run', and held-out preference accuracy is shown before and after.

    \b
    Examples:
      vault train me --data ~/writing --dry-run
      vault train me --data ~/writing --data chats.jsonl --max-minutes 20
      vault train me --preferences
    """
    from runtime.train import TrainConfig

    if preferences:
        if data:
            raise UsageError("--preferences trains on recorded preference pairs; drop --data")
        from runtime.dpo import DpoConfig, train_preferences

        dpo = DpoConfig(learning_rate=learning_rate or DpoConfig.learning_rate, epochs=epochs or DpoConfig.epochs,
                        max_minutes=max_minutes, threads=threads)
        if dry_run:
            raise UsageError("--dry-run is for training on writing; preference tuning takes seconds per pair")
        from vault.store import Vault

        with _progress(not as_json) as progress:
            result = train_preferences(Vault(), name, dpo, base=base, progress=progress)
        _report_dpo(result, as_json)
        return
    if not data:
        raise UsageError("give your writing with --data PATH (files or folders), or use --preferences")
    config = TrainConfig(rank=rank, alpha=2 * rank, epochs=epochs or TrainConfig.epochs, block_size=block_size,
                         max_minutes=max_minutes,
                         max_steps=max_steps, threads=threads, checkpoint_every_s=checkpoint_every,
                         learning_rate=learning_rate or TrainConfig.learning_rate)
    config.validate()
    if dry_run:
        _dry_run(data, config, base, as_json)
        return
    from runtime.train import train
    from vault.store import Vault

    vault = Vault()
    with _progress(not as_json) as progress:
        result = train(vault, name, list(data), config, base=base, resume=resume, force=force, progress=progress)
    _report(result, as_json)


COMMANDS = [train_cmd]
