"""What a load test checks before it sends any load, and how it compares the service's counters
after a run with those before it.

Every check here turns a run that would fail (or write where it should not) after its load into
a one-line error before it (exit 2): the report's files must be writable where they go, the
processes whose CPU it watches must exist. ``leaks_of`` is the leak check: a scenario's
``held`` counts after a run against the same counts taken before the first step, so what an
earlier run left (a pin inside the kvstore's TTL) is not this run's leak.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.loadtest.driver import process_cpu_seconds
from services.common.arg_types import MAX_LABEL_CHARS, plain_name
from services.common.errors import ConfigError
from services.common.paths import output_dir

MAX_NONCE_CHARS = 64
FILE_SUFFIXES = (".json", ".csv", "-samples.csv")


label_arg = plain_name("label", MAX_LABEL_CHARS)
nonce_arg = plain_name("nonce", MAX_NONCE_CHARS)


def output_paths(out: Path, stem: str) -> list[Path]:
    """The report's three files in ``out``, each checked by creating and removing a file there
    (``os.access`` says yes to root in a read-only or virtual file system, ``/sys``)."""
    out = output_dir(out, "--out")
    paths = [out / f"{stem}{suffix}" for suffix in FILE_SUFFIXES]
    for path in paths:
        if path.is_dir():
            raise ConfigError(f"--out {out}: {path.name} is a directory, not a file")
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError(f"--out {out}: {path.name} is not writable")
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".loadtest-", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write a file there ({exc.strerror})") from None
    return paths


def check_pids(pids: list[int] | None) -> None:
    """Every ``--server-pid`` names a local process whose CPU time can be read."""
    for pid in pids or ():
        try:
            process_cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            raise ConfigError(f"--server-pid {pid}: no such local process") from None


def leaks_of(held: dict[str, int], before: dict[str, int]) -> str:
    """What is held above its count before the run, e.g. ``kvstore-0 pins 1 (1 before)``."""
    leaks = []
    for what, count in held.items():
        had = before.get(what, 0)
        if count > had:
            leaks.append(f"{what} {count}" + (f" ({had} before the run)" if had else ""))
    return "; ".join(leaks)
