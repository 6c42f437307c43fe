"""Where a command writes its results: checked before any work, so that a long run (a load
test, a benchmark, a simulation) never ends in a traceback at its first write and loses what it
measured. A path that cannot be written is a ``ConfigError`` naming the flag
(``banaserve: error: ...``, exit 2)."""

from __future__ import annotations

import os
from pathlib import Path

from services.common.errors import ConfigError


def output_dir(path: Path, what: str) -> Path:
    """``path`` as a directory this process can write into, created if need be."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file or a missing, read-only filesystem on the way
        raise ConfigError(f"{what} {path}: cannot create the directory ({exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: the directory is not writable")
    return path


def output_file(path: Path, what: str) -> Path:
    """``path`` as a file this process can write (its directory created if need be)."""
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a file")
    output_dir(path.parent, f"{what} {path}: its directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path}: the file is not writable")
    return path
