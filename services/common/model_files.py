"""A model directory's JSON files (config.json, tokenizer_config.json), read for any service.

A file that is not UTF-8 JSON holding an object is a ``ModelFormatError`` naming it (the CLI's
``banaserve: error: ...``, exit 2; a service's one line at start), not a traceback from
wherever it was first read. Torch-free: the router reads them too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.common.errors import ModelFormatError


def read_json_object(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{file} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{file} holds {type(value).__name__}, not a JSON object")
    return value
