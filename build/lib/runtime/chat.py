"""A conversation with the guard on the way in and out, independent of any terminal or HTTP.

Two entry points over the same path:

- :func:`respond` is stateless (for ``vault serve``): messages in, :class:`Chunk` stream out.
- :class:`Chat` keeps history for ``vault run``: ``send(text)`` yields text pieces.

Guard semantics:
- ``guard.screen_prompt(messages)`` runs before anything is generated; a blocked prompt gets
  :data:`REFUSAL` from the runtime itself (the model never sees it), finish_reason
  ``"content_filter"``.
- Output is held back and screened with ``guard.screen_output(text_so_far, messages)`` every
  ``screen_every`` tokens and once at the end; only screened text is released, so a caller
  never receives text the guard has not passed. On a hit generation stops, and the final chunk
  has ``finish_reason="content_filter"``, ``replace=True`` and ``text=REFUSAL``: the caller
  replaces what it showed for this turn with the refusal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from runtime.engine import Engine
from runtime.guard.base import Guard, Verdict

__all__ = ["Chunk", "Completion", "respond", "complete", "Chat", "REFUSAL", "SCREEN_EVERY"]

REFUSAL = "I can't help with that."
SCREEN_EVERY = 16


@dataclass(frozen=True)
class Chunk:
    """A piece of an assistant turn. The last chunk of every stream has ``finish_reason`` set."""

    text: str
    finish_reason: str | None = None     # "stop" | "length" | "content_filter"
    replace: bool = False                # True: discard this turn's earlier text, show ``text`` instead
    verdict: Verdict | None = None       # the blocking verdict when finish_reason == "content_filter"
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Completion:
    """A whole assistant turn (non-streaming)."""

    text: str
    finish_reason: str
    verdict: Verdict | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _clean(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role = str(m.get("role", ""))
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported message role {role!r}")
        out.append({"role": role, "content": str(m.get("content") or "")})
    if not out or out[-1]["role"] != "user":
        raise ValueError("the last message must be a user message")
    return out


def respond(
    engine: Engine,
    guard: Guard,
    messages: Sequence[Mapping[str, Any]],
    *,
    adapter: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
    screen_every: int = SCREEN_EVERY,
) -> Iterator[Chunk]:
    """Answer the last user message of ``messages`` with ``adapter`` (None: the bare base).

    The adapter must already be loaded in ``engine`` (runtime.loader.attach). Holds
    ``engine.lock`` while generating; close the iterator to abandon a turn early.

    Raises:
        ValueError: malformed messages. EngineError: unknown adapter, prompt too long.
        GuardError: whatever the guard raises.
    """
    msgs = _clean(messages)
    verdict = guard.screen_prompt(msgs)
    if not verdict.allowed:
        yield Chunk(REFUSAL, "content_filter", True, verdict)
        return
    with engine.lock:
        engine.use(adapter)
        held: list[str] = []     # generated but not yet screened
        released: list[str] = []  # screened and handed out
        pending_tokens = 0
        stream = engine.stream(msgs, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        try:
            for piece in stream:
                held.append(piece.text)
                pending_tokens += 1
                if piece.finish_reason is None and pending_tokens < screen_every:
                    continue
                text = "".join(released + held)
                verdict = guard.screen_output(text, msgs)
                if not verdict.allowed:
                    yield Chunk(REFUSAL, "content_filter", True, verdict, piece.prompt_tokens,
                                piece.completion_tokens)
                    return
                chunk_text = "".join(held)
                released.append(chunk_text)
                held.clear()
                pending_tokens = 0
                yield Chunk(chunk_text, piece.finish_reason, False, None, piece.prompt_tokens,
                            piece.completion_tokens)
        finally:
            stream.close()


def complete(engine: Engine, guard: Guard, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> Completion:
    """Non-streaming :func:`respond`: the final text (REFUSAL when filtered) and usage."""
    parts: list[str] = []
    last = Chunk("")
    for chunk in respond(engine, guard, messages, **kwargs):
        if chunk.replace:
            parts = []
        parts.append(chunk.text)
        last = chunk
    return Completion("".join(parts), last.finish_reason or "stop", last.verdict, last.prompt_tokens,
                      last.completion_tokens)


@dataclass
class Chat:
    """A conversation with history; ``send`` streams the reply and records it.

    A filtered turn is recorded as the refusal, so later turns never see the blocked text.
    """

    engine: Engine
    guard: Guard
    adapter: str | None = None
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    last: Completion | None = None

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.history)

    def reset(self) -> None:
        self.history.clear()
        self.last = None

    def send(self, text: str) -> Iterator[Chunk]:
        """Add a user turn and stream the answer; the history is updated when the stream ends."""
        pending = self.messages() + [{"role": "user", "content": text}]
        parts: list[str] = []
        last = Chunk("")
        for chunk in respond(self.engine, self.guard, pending, adapter=self.adapter, max_tokens=self.max_tokens,
                             temperature=self.temperature, seed=self.seed):
            if chunk.replace:
                parts = []
            parts.append(chunk.text)
            last = chunk
            yield chunk
        reply = "".join(parts)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        self.last = Completion(reply, last.finish_reason or "stop", last.verdict, last.prompt_tokens,
                               last.completion_tokens)
