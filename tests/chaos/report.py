"""The chaos table: every case's result as JSON (``BANASERVE_CHAOS_REPORT``, else a temporary
file), and as markdown (``python -m tests.chaos.report PATH`` prints it)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPORT_ENV = "BANASERVE_CHAOS_REPORT"
BLOCK_KEYS = ("decode blocks", "prefill blocks", "hosted blocks")


def report_path(name: str) -> Path:
    if path := os.environ.get(REPORT_ENV):
        return Path(path)
    return Path(tempfile.gettempdir()) / f"banaserve-chaos-{name}.json"


def write(path: Path, meta: dict[str, Any], cases: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "cases": cases}, indent=2) + "\n")


def markdown(report: dict[str, Any]) -> str:
    rows = [
        "| fault | completed | failed (status) | hung | wrong output | blocks leaked | "
        "other held | recover s | idle s | restarts | notes |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for c in report["cases"]:
        failed = ", ".join(f"{k} {v}" for k, v in c["failed"].items()) or "0"
        blocks = sum(v for k, v in c["leaked"].items() if k in BLOCK_KEYS)
        other = ", ".join(f"{k} {v}" for k, v in c["leaked"].items() if k not in BLOCK_KEYS)
        recover = "**no**" if c["recover_s"] is None else f"{c['recover_s']:.1f}"
        rows.append(
            f"| {c['fault']} | {c['completed']} | {failed} | {c['hung']} | {c['wrong']} | "
            f"{blocks} | {other or '—'} | {recover} | {c['idle_s']:.1f} | {c['restarts']} | "
            f"{c['note'].replace('|', '/')} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    meta = ", ".join(f"{k} {v}" for k, v in data.items() if k != "cases")
    print(meta + "\n\n" + markdown(data))
