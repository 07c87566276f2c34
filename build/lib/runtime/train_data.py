"""Training data: read the user's writing once, into memory, and turn it into token examples.

Accepted inputs (files or folders of them, walked in sorted order so runs are reproducible):
  * ``.txt`` and ``.md``: the user's own prose, used for continued training (next-token loss on
    every token, cut into fixed-length blocks);
  * ``.jsonl`` chat exports: one JSON object per line, either OpenAI-style
    ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "response": ...}``;
    formatted with the base model's chat template and trained on the assistant turns only.

Nothing here writes to disk: the bytes are read once and live only in this process. This module
imports neither torch nor transformers; the tokenizer is passed in.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from vault.errors import TrainingError

__all__ = [
    "TEXT_SUFFIXES",
    "CHAT_SUFFIXES",
    "MAX_FILE_BYTES",
    "MAX_TOTAL_BYTES",
    "Corpus",
    "Example",
    "Tokenizer",
    "read_corpus",
    "build_examples",
    "split_examples",
]

TEXT_SUFFIXES = (".txt", ".md")
CHAT_SUFFIXES = (".jsonl",)
MAX_FILE_BYTES = 64 << 20  # one file; a personal corpus larger than this is not a laptop job
MAX_TOTAL_BYTES = 256 << 20
IGNORE = -100  # label of tokens that carry no loss (prompt side of a chat, padding)


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer that this module uses."""

    eos_token_id: int | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass
class Corpus:
    """Everything read from the user's paths, in memory."""

    texts: list[str] = field(default_factory=list)
    chats: list[list[dict[str, str]]] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    skipped_lines: int = 0

    def digest(self) -> str:
        """sha256 over the content (not the paths): a resumed run must see the same data."""
        h = hashlib.sha256()
        for text in self.texts:
            h.update(b"t%d:" % len(text.encode()) + text.encode())
        for chat in self.chats:
            h.update(b"c" + json.dumps(chat, sort_keys=True).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and labels (``-100`` where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _files(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            found.extend(
                p for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + CHAT_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES + CHAT_SUFFIXES:
                raise TrainingError(f"unsupported training file {path.name!r}: use .txt, .md or .jsonl")
            found.append(path)
        else:
            raise TrainingError(f"training data not found: {path}")
    return found


def _read(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TrainingError(f"failed to read training file {path.name!r}: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise TrainingError(f"training file {path.name!r} is larger than {MAX_FILE_BYTES >> 20} MiB")
    return raw.decode("utf-8", errors="replace")


def _chat_from_json(obj: Any) -> list[dict[str, str]] | None:
    """OpenAI-style messages or a prompt/response pair; None when the line is neither."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        chat = []
        for m in obj["messages"]:
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                return None
            chat.append({"role": m["role"], "content": m["content"]})
        return chat if any(m["role"] == "assistant" for m in chat) else None
    prompt, response = obj.get("prompt"), obj.get("response", obj.get("completion"))
    if isinstance(prompt, str) and isinstance(response, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return None


def read_corpus(paths: Sequence[Path | str]) -> Corpus:
    """Read every supported file under ``paths`` once, into memory.

    Raises:
        TrainingError: a path is missing or unsupported, a file is too large, or nothing usable was found.
    """
    corpus = Corpus()
    for path in _files(Path(p) for p in paths):
        text = _read(path)
        corpus.files += 1
        corpus.bytes += len(text.encode())
        if corpus.bytes > MAX_TOTAL_BYTES:
            raise TrainingError(f"training data is larger than {MAX_TOTAL_BYTES >> 20} MiB")
        if path.suffix.lower() in TEXT_SUFFIXES:
            if text.strip():
                corpus.texts.append(text)
            continue
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                chat = _chat_from_json(json.loads(line))
            except ValueError:
                chat = None
            if chat is None:
                corpus.skipped_lines += 1
            else:
                corpus.chats.append(chat)
    if not corpus.texts and not corpus.chats:
        raise TrainingError("no usable training data: give .txt/.md files or .jsonl chat exports")
    return corpus


def _ids(encoded: Any) -> list[int]:
    """apply_chat_template may return a list or a BatchEncoding depending on the version."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(x) for x in encoded]


def _text_examples(texts: list[str], tokenizer: Tokenizer, block: int) -> list[Example]:
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(int(eos))
    # Fixed-length blocks; a short tail is kept if it is worth a gradient.
    out = []
    for start in range(0, len(ids), block):
        chunk = tuple(ids[start : start + block])
        if len(chunk) >= 16:
            out.append(Example(chunk, chunk))
    return out


def _chat_example(chat: list[dict[str, str]], tokenizer: Tokenizer, block: int) -> Example | None:
    full = _ids(tokenizer.apply_chat_template(chat, tokenize=True))
    labels = [IGNORE] * len(full)
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer.apply_chat_template(chat[:i], tokenize=True, add_generation_prompt=True)))
        end = len(_ids(tokenizer.apply_chat_template(chat[: i + 1], tokenize=True)))
        labels[start:end] = full[start:end]
    full, labels = full[:block], labels[:block]
    example = Example(tuple(full), tuple(labels))
    return example if example.n_target else None


def build_examples(corpus: Corpus, tokenizer: Tokenizer, *, block_size: int) -> list[Example]:
    """Token examples: ``block_size`` blocks of the user's prose, and one example per chat."""
    if block_size < 32:
        raise ValueError("block_size must be at least 32")
    examples = _text_examples(corpus.texts, tokenizer, block_size)
    for chat in corpus.chats:
        example = _chat_example(chat, tokenizer, block_size)
        if example is not None:
            examples.append(example)
    if not examples:
        raise TrainingError("the training data is too short to make a single example")
    return examples


def split_examples(examples: list[Example], *, heldout: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic (seeded) train / held-out split; held-out is empty only when there is one example."""
    if not 0.0 <= heldout < 1.0:
        raise ValueError("heldout must be in [0, 1)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = min(len(examples) - 1, max(1, round(len(examples) * heldout))) if heldout > 0 else 0
    held = [examples[i] for i in sorted(order[:n_held])]
    train = [examples[i] for i in sorted(order[n_held:])]
    return train, held
