"""A model directory's JSON files (config.json, tokenizer_config.json), read for any service.

A file that is not UTF-8 JSON holding an object is a ``ModelFormatError`` naming it (the CLI's
``banaserve: error: ...``, exit 2; a service's one line at start), not a traceback from
wherever it was first read. Torch-free: the router reads them too, and takes a model's context
length from them as the engine does (``DEFAULT_MAX_POSITIONS``, ``declared_sliding_window``).
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


# Hugging Face's LlamaConfig default, for a config.json that declares no max_position_embeddings.
DEFAULT_MAX_POSITIONS = 2048


def declared_sliding_window(config: dict[str, Any]) -> Any:
    """A config.json's ``sliding_window`` where it is in use (Qwen2 configs carry one with
    ``use_sliding_window: false``: then the model attends to its whole context)."""
    return config.get("sliding_window") if config.get("use_sliding_window", True) else None
