"""Least-squares fits of the time model (pure: points in, coefficients out).

Each fit solves ``X·θ ≈ y`` with numpy's ``lstsq``; with exact points from known coefficients
it recovers them to rounding. Negative coefficients (noise on a term the data barely excites)
are refitted without that term, so a step never gets cheaper with more work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from services.sim.profile import DecodeModel, PrefillModel, TransportModel


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0: drop the most negative term and refit."""
    active = list(range(x.shape[1]))
    while True:
        theta, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (theta >= -1e-15).all() or len(active) == 1:
            out = [0.0] * x.shape[1]
            for i, v in zip(active, theta, strict=True):
                out[i] = max(0.0, float(v))
            return out
        del active[int(np.argmin(theta))]


def fit_prefill(points: Sequence[tuple[float, float]]) -> PrefillModel:
    """``points``: (prompt tokens, step seconds) of single fresh prompts."""
    if len(points) < 3:
        raise ValueError(f"a prefill fit needs at least 3 points, got {len(points)}")
    n = np.array([p[0] for p in points], dtype=float)
    x = np.stack([np.ones_like(n), n, n * n], axis=1)
    a, b, c = _nonnegative_lstsq(x, np.array([p[1] for p in points], dtype=float))
    return PrefillModel(a, b, c)


def fit_decode(points: Sequence[tuple[float, float, float]]) -> DecodeModel:
    """``points``: (batch size, total context tokens, step seconds). The line
    ``a + b·batch + c·context``, and with points enough the step time at each batch size
    measured (``DecodeModel.batch_s``): ``t = g(batch) + c·context``, ``g`` a value per
    distinct batch size, all fitted together — when some batch size was measured at two
    contexts or more (which fixes ``c``) and there are more points than unknowns."""
    if len(points) < 3:
        raise ValueError(f"a decode fit needs at least 3 points, got {len(points)}")
    batch = np.array([p[0] for p in points], dtype=float)
    ctx = np.array([p[1] for p in points], dtype=float)
    y = np.array([p[2] for p in points], dtype=float)
    x = np.stack([np.ones_like(batch), batch, ctx], axis=1)
    a, b, c = _nonnegative_lstsq(x, y)
    sizes = sorted(set(batch.tolist()))
    contexts = {size: set(ctx[batch == size].tolist()) for size in sizes}
    if len(points) <= len(sizes) + 1 or max(len(v) for v in contexts.values()) < 2:
        return DecodeModel(a, b, c)
    columns = [(batch == size).astype(float) for size in sizes]
    *knots, c_knots = _nonnegative_lstsq(np.stack([*columns, ctx], axis=1), y)
    return DecodeModel(a, b, c_knots, tuple(zip(sizes, knots, strict=True)))


def fit_transport(points: Sequence[tuple[float, float]]) -> TransportModel:
    """``points``: (bytes, seconds) of one transfer each -> latency + bytes / bandwidth."""
    if len(points) < 2:
        raise ValueError(f"a transport fit needs at least 2 points, got {len(points)}")
    size = np.array([p[0] for p in points], dtype=float)
    x = np.stack([np.ones_like(size), size], axis=1)
    latency, per_byte = _nonnegative_lstsq(x, np.array([p[1] for p in points], dtype=float))
    return TransportModel(latency, 1.0 / per_byte if per_byte > 0 else float("inf"))


def fit_two_terms(points: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """``points``: (x1, x2, y) -> (c1, c2) of ``y = c1 * x1 + c2 * x2``, both >= 0."""
    x = np.array([[p[0], p[1]] for p in points], dtype=float)
    c1, c2 = _nonnegative_lstsq(x, np.array([p[2] for p in points], dtype=float))
    return c1, c2


def fit_step_overhead(points: Sequence[tuple[int, float, float]]) -> tuple[float, float]:
    """``points``: (steps, model seconds, real seconds) of lone requests -> (seconds per step,
    scale) of ``real = per_step * steps + scale * model``."""
    return fit_two_terms(points)


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    return [abs(p - m) / m if m else 0.0 for p, m in zip(predicted, measured, strict=True)]
