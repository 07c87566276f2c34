"""Where the vault lives on disk.

``VAULT_HOME`` overrides the platform's per-user data directory (XDG on Linux,
``~/Library/Application Support`` on macOS, ``%LOCALAPPDATA%`` on Windows), so tests and
scripts can point vault at a throwaway directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["vault_home"]


def vault_home() -> Path:
    """The vault directory: ``$VAULT_HOME`` if set and non-empty, else platformdirs' user data dir."""
    env = os.environ.get("VAULT_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("vault", appauthor=False))
