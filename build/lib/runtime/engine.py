"""llama.cpp engine: one base model and context loaded once, LoRA adapters switched in place.

Adapters go through llama.cpp's adapter API (``llama_adapter_lora_init`` from a path, then
``llama_set_adapters_lora`` on the context), so switching is a pointer swap, not a reload.
Generation formats messages with the model's own chat template (GGUF
``tokenizer.chat_template``), streams decoded text, and stops on an end-of-generation token
or ``max_tokens``. One Engine serves one request at a time: callers hold :attr:`Engine.lock`.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Mapping, Sequence

import numpy as np

from runtime.models import BaseModel, HardwareFit, hardware_fit
from vault.errors import EngineError

__all__ = ["Engine", "Piece"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Piece:
    """One step of a stream: decoded ``text`` (may be ""), and on the last piece ``finish_reason``."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last piece
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine:
    """The base model in llama.cpp plus any number of loaded adapters, at most one active.

    Args:
        base: the base model record (runtime.models).
        n_ctx, n_threads: override the hardware-fit choice.
        seed: default sampling seed (per-call ``seed`` overrides it).

    Raises:
        EngineError: llama.cpp failed to load the model.
    """

    def __init__(self, base: BaseModel, *, n_ctx: int | None = None, n_threads: int | None = None,
                 seed: int = 0, progress: Progress | None = None) -> None:
        import llama_cpp

        self._ll = llama_cpp
        self.base = base
        self.fit: HardwareFit = hardware_fit(base)
        self.n_ctx = int(n_ctx or self.fit.n_ctx)
        self.n_threads = int(n_threads or self.fit.n_threads)
        if progress:
            progress(f"loading {base.name} (n_ctx={self.n_ctx}, threads={self.n_threads})")
        try:
            self.llm = llama_cpp.Llama(str(base.path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                                       n_threads_batch=self.n_threads, seed=seed, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"failed to load base model {base.name}: {exc}") from exc
        self.lock = threading.RLock()
        self._seed = seed
        self._adapters: dict[str, Any] = {}
        self._scales: dict[str, float] = {}
        self._active: str | None = None
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self._formatter = self._make_formatter()
        self.n_head = int(self.llm.metadata.get(f"{self.architecture}.attention.head_count", 0))
        self.n_head_kv = int(self.llm.metadata.get(f"{self.architecture}.attention.head_count_kv", self.n_head))

    @property
    def architecture(self) -> str:
        return str(self.llm.metadata.get("general.architecture", "llama"))

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    # -- adapters ---------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    @property
    def active(self) -> str | None:
        return self._active

    def load_adapter(self, name: str, path: str, *, scale: float = 1.0) -> None:
        """Load a GGUF LoRA from ``path`` (e.g. a memfd's /proc/self/fd/N) under ``name``.

        llama.cpp copies the tensors into its own buffers, so the path can be closed on return.

        Raises:
            EngineError: llama.cpp refused the file (wrong architecture, shapes, format).
        """
        with self.lock:
            if name in self._adapters:
                self.unload_adapter(name)
            handle = self._ll.llama_adapter_lora_init(self.llm._model.model, path.encode())
            if not handle:
                raise EngineError(f"llama.cpp could not load adapter {name!r} (does it match {self.base.name}?)")
            self._adapters[name] = handle
            self._scales[name] = float(scale)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            handle = self._adapters.pop(name, None)
            self._scales.pop(name, None)
            if handle is None:
                return
            if self._active == name:
                self.use(None)
            self._ll.llama_adapter_lora_free(handle)

    def use(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: the bare base). The KV cache is dropped."""
        with self.lock:
            if name == self._active:
                return
            ctx = self.llm._ctx.ctx
            if name is None:
                rc = self._ll.llama_set_adapters_lora(ctx, None, 0, None)
            else:
                if name not in self._adapters:
                    raise EngineError(f"adapter {name!r} is not loaded")
                arr = (self._ll.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
                scales = (ctypes.c_float * 1)(self._scales[name])
                rc = self._ll.llama_set_adapters_lora(ctx, arr, 1, scales)
            if rc != 0:
                raise EngineError(f"llama.cpp failed to switch to adapter {name!r}")
            self._active = name
            self.llm.reset()  # cached keys/values were computed with the previous weights

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Temporarily switch adapter; restores the previous one."""
        with self.lock:
            previous = self._active
            self.use(name)
            try:
                yield
            finally:
                self.use(previous)

    # -- prompts ----------------------------------------------------------------------

    def _make_formatter(self) -> Any:
        from llama_cpp import llama_chat_format

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise EngineError(f"{self.base.name} has no chat template in its GGUF metadata")
        eos = self.llm._model.token_get_text(self.llm.token_eos())
        bos = self.llm._model.token_get_text(self.llm.token_bos())
        return llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def prompt_tokens(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The chat-templated prompt (with the assistant header) as tokens."""
        msgs = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in messages]
        formatted = self._formatter(messages=msgs)
        return self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True)

    def _is_eog(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    # -- generation -------------------------------------------------------------------

    def stream(self, messages: Sequence[Mapping[str, Any]], *, max_tokens: int = 256, temperature: float = 0.7,
               top_p: float = 0.95, seed: int | None = None) -> Generator[Piece, None, None]:
        """Generate an assistant turn with the active adapter; the last Piece has finish_reason.

        Holds :attr:`lock` while the generator is alive; close it (or exhaust it) to release.

        Raises:
            EngineError: the prompt does not fit the context window.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        with self.lock:
            tokens = self.prompt_tokens(messages)
            room = self.n_ctx - len(tokens)
            if room < 1:
                raise EngineError(f"the conversation ({len(tokens)} tokens) does not fit the context ({self.n_ctx})")
            limit = min(max_tokens, room)
            self.llm.set_seed(self._seed if seed is None else seed)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            produced = 0
            finish = "length"
            for token in self.llm.generate(tokens, temp=max(float(temperature), 0.0), top_p=top_p,
                                           top_k=40, min_p=0.05, repeat_penalty=1.0):
                if self._is_eog(token):
                    finish = "stop"
                    break
                produced += 1
                text = decoder.decode(self.llm.detokenize([token], special=False))
                if text:
                    yield Piece(text, None, len(tokens), produced)
                if produced >= limit:
                    break
            yield Piece(decoder.decode(b"", final=True), finish, len(tokens), produced)

    def generate(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[str, str]:
        """Non-streaming convenience: (text, finish_reason)."""
        parts: list[str] = []
        finish = "stop"
        for piece in self.stream(messages, **kwargs):
            parts.append(piece.text)
            finish = piece.finish_reason or finish
        return "".join(parts), finish

    def first_token_logits(self, messages: Sequence[Mapping[str, Any]], *, adapter: str | None = None) -> np.ndarray:
        """Logits (float32, n_vocab) of the first assistant token for ``messages`` under ``adapter``.

        The guard's audit compares these with and without an adapter.
        """
        return self.logits(self.prompt_tokens(messages), adapter=adapter)

    def logits(self, tokens: Sequence[int], *, adapter: str | None = None) -> np.ndarray:
        """Next-token logits after ``tokens`` (raw tokens, no template) under ``adapter``."""
        if not tokens:
            raise ValueError("tokens must not be empty")
        with self.lock, self.using(adapter):
            self.llm.reset()
            self.llm.eval(list(tokens))
            out = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()
            self.llm.reset()  # the next generate must not reuse a half-known state
            return out

    def first_token_logprobs(self, messages: Sequence[Mapping[str, Any]], *, adapter: str | None = None) -> np.ndarray:
        """log-softmax of :meth:`first_token_logits`."""
        z = self.first_token_logits(messages, adapter=adapter).astype(np.float64)
        z -= z.max()
        return (z - np.log(np.exp(z).sum())).astype(np.float32)

    def close(self) -> None:
        with self.lock:
            if getattr(self, "llm", None) is None:
                return
            self.use(None)
            for name in list(self._adapters):
                self.unload_adapter(name)
            self.llm.close()
            self.llm = None  # type: ignore[assignment]

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
