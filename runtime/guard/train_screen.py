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
import hashlib
import json
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.guard.features import DENSE_NAMES, N_HASH, featurize
from runtime.guard.screen import CATEGORIES, WINDOW_WORDS, ScreenModel

__all__ = ["Example", "build_datasets", "train", "main"]

SEED = 20261125
DATA = Path(__file__).resolve().parent / "data"
HELDOUT_PCT = 30  # % of written requests held out (by hash of the request text)
DEV_PCT = 15  # % of the remaining ones used to pick the threshold, then trained on
TARGET_DEV_FPR = 0.03
CONTEXT_MARGIN = 1.0  # a context window must beat the threshold by this much (logit) to block
OUTPUT_MARGIN = 0.5  # generated text is longer and noisier than prompts: a stricter threshold


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 harmful, 0 benign
    category: str | None
    source: str


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
    return pools["train"], pools["dev"], sets


# -- training ------------------------------------------------------------------------------------
def _matrix(examples: list[Example]):
    from scipy import sparse

    rows, cols, vals, dense = [], [], [], []
    for i, ex in enumerate(examples):
        f = featurize(ex.text)
        rows.append(np.full(f.idx.size, i, dtype=np.int64))
        cols.append(f.idx)
        vals.append(f.val / np.sqrt(max(f.val.sum(), 1.0)))
        dense.append(f.dense)
    x = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(examples), N_HASH))
    x.sum_duplicates()
    return sparse.hstack([x, sparse.csr_matrix(np.array(dense))], format="csr")


def _fit_binary(x, y: np.ndarray, l2: float) -> np.ndarray:
    from scipy.optimize import minimize

    pos = y.sum()
    sw = np.where(y == 1, 0.5 / pos, 0.5 / (len(y) - pos))  # balanced classes, sums to 1

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        z = x @ w + b
        p = 1.0 / (1.0 + np.exp(-z))
        loss = float(sw @ (np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * float(w @ w)
        g = sw * (p - y)
        return loss, np.concatenate([x.T @ g + l2 * w, [g.sum()]])

    res = minimize(f, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B", options={"maxiter": 400})
    return res.x


def _fit_softmax(x, labels: np.ndarray, k: int, l2: float) -> np.ndarray:
    from scipy.optimize import minimize

    n, d = x.shape
    onehot = np.eye(k)[labels]

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[: d * k].reshape(d, k)
        b = theta[d * k :]
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = -float(np.sum(onehot * np.log(p + 1e-12))) / n + 0.5 * l2 * float(np.sum(w * w))
        g = (p - onehot) / n
        return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(axis=0)])

    res = minimize(f, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": 80})
    return res.x


def train(examples: list[Example], *, l2: float = 3e-5, l2_cat: float = 1e-5, category: bool = True) -> dict[str, np.ndarray]:
    """Fit the harm head and (unless ``category`` is False) the category head; safetensors-ready tensors."""
    t0 = time.perf_counter()
    x = _matrix(examples)
    y = np.array([e.label for e in examples], dtype=np.float64)
    print(f"  features: {x.shape[0]} x {x.shape[1]}, {x.nnz} non-zeros ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    theta = _fit_binary(x, y, l2)
    print(f"  harm head fitted ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    harm_rows = np.flatnonzero(y == 1)
    k = len(CATEGORIES)
    d = x.shape[1]
    if category:
        labels = np.array([CATEGORIES.index(examples[i].category) for i in harm_rows])
        cat = _fit_softmax(x[harm_rows], labels, k, l2_cat)
        print(f"  category head fitted ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    else:
        cat = np.zeros(d * k + k)
    w_cat = cat[: d * k].reshape(d, k)
    nd = len(DENSE_NAMES)
    return {
        "harm.w": theta[:N_HASH].astype(np.float32),
        "harm.w_dense": theta[N_HASH : N_HASH + nd].astype(np.float32),
        "harm.b": np.array([theta[-1]], dtype=np.float32),
        "cat.w": w_cat[:N_HASH].astype(np.float16),
        "cat.w_dense": w_cat[N_HASH:].astype(np.float32),
        "cat.b": cat[d * k :].astype(np.float32),
    }


def _meta(threshold: float) -> dict[str, str]:
    return {
        "format": "vault-guard-screen/1",
        "version": "screen-1",
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
        dtype = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}[arr.dtype]
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def _pick_threshold(model: ScreenModel, dev: list[Example]) -> float:
    benign = np.array([model.score(e.text).logit for e in dev if e.label == 0])
    harmful = np.array([model.score(e.text).logit for e in dev if e.label == 1])
    t = float(np.quantile(benign, 1.0 - TARGET_DEV_FPR))
    print(f"dev: {len(benign)} benign, {len(harmful)} harmful; threshold {t:.3f}: "
          f"FPR {np.mean(benign >= t):.3f}, recall {np.mean(harmful >= t):.3f}", file=sys.stderr)
    return t


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
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    train_set, dev_set, sets = build_datasets(args.shared_data)
    print(f"train {len(train_set)} ({sum(e.label for e in train_set)} harmful), dev {len(dev_set)}, "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), file=sys.stderr)
    first = train(train_set, category=False)
    threshold = _pick_threshold(ScreenModel(first, _meta(0.0)), dev_set)
    tensors = train(train_set + dev_set)
    blob = serialize(tensors, _meta(threshold))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "screen.safetensors").write_bytes(blob)
    _write_heldout(sets, DATA / "heldout.jsonl")
    print(f"done in {time.perf_counter() - t0:.0f}s; sha256 {hashlib.sha256(blob).hexdigest()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
