"""The simulator commands' input documents, read at the boundary: a file that is missing,
unreadable, not JSON or not the kind of document asked for is a ``ConfigError`` naming the file
and what is wrong (``banaserve: error: ...``, exit 2), before any work and never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

from services.common.errors import ConfigError
from services.launcher import Mode


def read_json(path: Path | str, what: str) -> dict:
    """The JSON object in ``path``; ``what`` names the document in errors."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: a JSON object expected, got {type(data).__name__}")
    return data


def read_compare(path: Path | str) -> dict:
    """A ``bench compare`` result, with what the simulator reads of it present and typed: its
    config's seed and arrival window, and a table of rows naming a workload and a known mode."""
    what = "bench compare result"
    report = read_json(path, what)
    config, table = report.get("config"), report.get("table")
    if (
        report.get("benchmark", "compare") != "compare"
        or not isinstance(config, dict)
        or (not isinstance(table, list))
    ):
        raise ConfigError(f"{path} is not a `bench compare` result (no config and table)")
    for key, kind in (("seed", int), ("duration_s", (int, float))):
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ConfigError(f"{what} {path}: config.{key} missing or not a number")
    modes = {m.value for m in Mode}
    for i, row in enumerate(table):
        if not isinstance(row, dict) or not isinstance(row.get("workload"), str):
            raise ConfigError(f"{what} {path}: table row {i} names no workload")
        if row.get("mode") not in modes:
            raise ConfigError(f"{what} {path}: table row {i} has mode {row.get('mode')!r}, "
                              f"not one of {', '.join(sorted(modes))}")  # fmt: skip
    if not table:
        raise ConfigError(f"{what} {path}: its table is empty")
    return report
