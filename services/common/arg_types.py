"""argparse ``type=`` parsers shared by the command line tools: a bad value is a usage error
(``error: argument --x: expected ...``, exit 2) before any work, never a traceback later."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive(kind: type, allow_inf: bool = False) -> Callable[[str], float]:
    """A number > 0 (``kind``: int or float; infinity only with ``allow_inf``)."""

    def parse(text: str):  # noqa: ANN202 - int or float, as ``kind``
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0 or (math.isinf(value) and not allow_inf):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def non_negative(kind: type) -> Callable[[str], float]:
    """A finite number >= 0."""

    def parse(text: str):  # noqa: ANN202 - int or float, as ``kind``
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
        return value

    return parse


def number_list(kind: type) -> Callable[[str], list]:
    """A comma list of positive numbers, like ``8`` or ``8,16``."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(v > 0 and math.isfinite(v) for v in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers like 8 or 8,16; {text!r}")
        return values

    return parse


def share_list(text: str) -> list[float]:
    """A comma list of shares strictly between 0 and 1, like ``0.25,0.5``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected shares in (0, 1) like 0.25,0.5; got {text!r}")
    return values


def name_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """A comma list of names, each one of ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if not names or unknown:
            told = f"; unknown: {', '.join(map(repr, unknown))}" if unknown else ""
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}{told}")
        return names

    return parse
