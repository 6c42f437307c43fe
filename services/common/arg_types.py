"""argparse ``type=`` parsers shared by the command line tools: a bad value is a usage error
(``error: argument --x: expected ...``, exit 2) before any work, never a traceback later."""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Callable
from pathlib import Path

from services.common.errors import ConfigError
from services.common.limits import MAX_THREADS, check_target


def positive(
    kind: type, allow_inf: bool = False, at_most: float | None = None
) -> Callable[[str], float]:
    """A number > 0 (``kind``: int or float; infinity only with ``allow_inf``), and at most
    ``at_most`` where a field or a call bounds it (a uint32, ``time.sleep``)."""

    def parse(text: str):  # noqa: ANN202 - int or float, as ``kind``
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value > 0 or (math.isinf(value) and not allow_inf):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        _check_at_most(value, at_most, text)
        return value

    return parse


def non_negative(kind: type, at_most: float | None = None) -> Callable[[str], float]:
    """A finite number >= 0, and at most ``at_most`` (as ``positive``'s)."""

    def parse(text: str):  # noqa: ANN202 - int or float, as ``kind``
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
        _check_at_most(value, at_most, text)
        return value

    return parse


def _check_at_most(value: float, at_most: float | None, text: str) -> None:
    if at_most is not None and value > at_most:
        bound = at_most if isinstance(at_most, int) else f"{at_most:g}"
        raise argparse.ArgumentTypeError(f"expected at most {bound}, got {text!r}")


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low}..{high}, got {text!r}")
        return value

    return parse


# Every port flag (``--port``, ``--data-port``, ``--http-port``, ``--metrics-port``): 0 lets the
# OS pick (or, for metrics, turns it off).
port_number = int_range(0, 65535)


# Every ``--threads`` flag: torch threads per process, at most ``MAX_THREADS`` (limits.py: a
# count far above the host's cores crashes OpenMP, so it is refused before any work).
thread_count = int_range(1, MAX_THREADS)


def share(text: str) -> float:
    """A share strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1), got {text!r}")
    return value


def host_port(text: str) -> str:
    """The "HOST:PORT" of a service a client tool connects to (``limits.check_target``: a port
    in 1..65535, a host that is not empty), checked before the tool connects."""
    try:
        return check_target(text, "address")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def path_arg(text: str) -> Path:
    """A path, not the empty string (which ``Path`` reads as ``.``)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return Path(text)


MAX_LABEL_CHARS = 100  # a report's name, label included, stays far below a file name's 255 bytes


def plain_name(what: str, max_chars: int = MAX_LABEL_CHARS) -> Callable[[str], str]:
    """A plain file-name component (a report's ``--label``): no ``/`` or ``\\``, not ``.`` or
    ``..``, no control characters, at most ``max_chars``. An unchecked label ``../x`` wrote
    outside ``--out``, and ``a/b`` failed with a traceback after the whole run (session 44)."""

    def parse(text: str) -> str:
        bad = (
            not text
            or len(text) > max_chars
            or text in (".", "..")
            or "/" in text
            or "\\" in text
            or not text.isprintable()
        )
        if bad:
            raise argparse.ArgumentTypeError(
                f"expected a plain {what} (a file-name part of at most {max_chars} characters, "
                f"no '/'), got {text!r}"
            )
        return text

    return parse


label_arg = plain_name("label")


def shell_words(text: str) -> str:
    """Flags for another command, in one string as a shell splits them (``"--x 1 --y 'a b'"``);
    returned as given, once ``shlex`` can split it."""
    try:
        shlex.split(text)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise argparse.ArgumentTypeError(f"{exc} in {text!r}") from None
    return text


def utf8_text(text: str) -> str:
    """Text that encodes as UTF-8: argv bytes that do not decode reach Python as lone
    surrogates, which no tokenizer or protobuf string takes."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8") from None
    return text


def number_list(kind: type) -> Callable[[str], list]:
    """A comma list of positive numbers, like ``8`` or ``8,16``; an empty item (``8,,16``, a
    trailing comma) is refused, not dropped (probe, session 44: ``--workers 2,,8`` ran 2 and 8)."""

    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]  # "" is not a number: refused
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


def redis_url(text: str) -> str:
    """A Redis URL redis-py can connect with (``redis://``, ``rediss://`` or ``unix://``; a
    port in 1..65535): a malformed one was a ValueError traceback at start."""
    from redis.connection import parse_url  # here: most tools never take a Redis URL

    try:
        options = parse_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a Redis URL: {exc} (got {text!r})") from None
    if "path" not in options and not 0 < options.get("port", 6379) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a Redis URL with a port in 1..65535, got {text!r}"
        )
    return text


def optional_host_port(text: str) -> str:
    """``host_port``, or the empty string: the flag (or its environment default) left unset."""
    return host_port(text) if text else ""


def optional_host_ports(text: str) -> str:
    """``host_port``s with commas between (returned as given), or the empty string: unset."""
    if not text:
        return ""
    for part in text.split(","):
        host_port(part)
    return text
