"""The simulator's time model: what ``banaserve sim calibrate`` measures and the simulator loads.

One JSON file per (machine, model). Every number in it is a fit of measurements (``fit.py``) or
a measurement itself; nothing here is a guess the simulator makes up. Step times:

- prefill: ``a + b·tokens + c·Σ tokens_i·context_i`` (the last term is attention: for one fresh
  prompt of ``n`` tokens it is ``n²``; a chunk after a cached prefix attends to the prefix too);
- decode: ``a + b·batch + c·total context``, or with ``batch_s`` (calibrated since session 31)
  the step time measured at each batch size, interpolated, instead of the line ``a + b·batch``;
- a mixed step (chunks and decodes in one batch, colocated workers) pays the decode model's
  time and the prefill model's less its fixed cost (one fixed cost, the decode step's).

Serving (``ServingModel``): a serving worker's cost over those step times (multipliers, a
per-prefill-step cost; a colocated worker's optionally apart from a PD worker's; a decode
worker's steps while a hand-off to it is computed) and the router's time per request, fitted on
a real run (``sim serving``). Transports: ``latency + bytes / bandwidth``. Migrations: the coordinator record's split (weights,
staged KV copy, switch pause), per layer and per byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from services.common.errors import ConfigError
from services.sim.inputs import is_count, is_number, read_json

T = TypeVar("T")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _seconds(**values: object) -> None:
    """Each value a finite real number >= 0 (a time, or a time per unit of work): a NaN, an
    infinity or a negative time would run the simulated clock backwards or never end."""
    for name, value in values.items():
        _require(is_number(value), f"{name} must be >= 0 (a finite number), got {value!r}")


def _scales(**values: object) -> None:
    """Each value a finite real number > 0 (a multiplier of a step time, a bandwidth)."""
    for name, value in values.items():
        _require(is_number(value, above=True),
                 f"{name} must be > 0 (a finite number), got {value!r}")  # fmt: skip


def _part(name: str, build: Callable[..., T], value: object) -> T:
    """``build(**value)`` for the profile's part ``name`` (``prefill``, ``transports.tcp``,
    ``serving.mixed``...), its errors naming the part: one that is not an object, lacks a
    field or has one of another name is a ``TypeError`` (``Profile.load``: not a profile), a
    bad value a ``ConfigError``."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be an object of its fields, got {value!r}")
    try:
        return build(**value)
    except ConfigError as exc:  # a value: "field must be ...", named within the part
        message = str(exc)
        raise ConfigError(message if message.startswith(name) else f"{name}.{message}") from None
    except TypeError as exc:  # a missing or unknown field
        raise TypeError(f"{name}: {exc}") from None


def _counts(minimum: int, **values: object) -> None:
    for name, value in values.items():
        _require(is_count(value, minimum), f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class PrefillModel:
    a: float  # s per step
    b: float  # s per token
    c: float  # s per token x context token (attention)

    def __post_init__(self) -> None:
        _seconds(**{f"prefill.{k}": v for k, v in asdict(self).items()})
        _require(self.a + self.b + self.c > 0,
                 "prefill: a step must take time (a + b + c > 0): all 0 models a prefill worker "
                 "that computes any prompt at once")  # fmt: skip

    def time(self, num_tokens: int, attention_work: float) -> float:
        return self.a + self.b * num_tokens + self.c * attention_work


@dataclass(frozen=True)
class DecodeModel:
    a: float  # s per step (a line's fit: the fixed cost a step pays whatever its batch)
    b: float  # s per sequence
    c: float  # s per context token
    # (batch, s) of a step with no context, by calibrated batch size, ascending (empty: the
    # line ``a + b·batch``). A step's matmuls run other kernels at other batch sizes, and on
    # some CPUs no line fits them: on the 2-vCPU AMD VM a decode step of smollm2 at small
    # context took ~43 ms at batch 1, ~51 ms at 2 and ~38 ms at 3-6 (session 31). Between two
    # calibrated sizes the time is interpolated; past the last it grows at the last two's slope.
    batch_s: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        _seconds(**{f"decode.{k}": v for k, v in asdict(self).items() if k != "batch_s"})
        pairs = self.batch_s
        _require(isinstance(pairs, (list, tuple))
                 and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in pairs),
                 f"decode.batch_s must be a list of [batch, seconds], got {pairs!r}")  # fmt: skip
        for batch, t in pairs:
            _require(is_number(batch, above=True), f"decode.batch_s: batch {batch!r} must be > 0")
            _seconds(**{f"decode.batch_s[{batch:g}]": t})
        knots = tuple((float(b), float(t)) for b, t in pairs)
        object.__setattr__(self, "batch_s", knots)
        _require(all(x[0] < y[0] for x, y in zip(knots, knots[1:], strict=False)),
                 "decode.batch_s must be in ascending batch order")  # fmt: skip
        _require(self.batch_time(1) + self.c > 0,
                 "decode: a step must take time (a + b + c > 0, or batch_s's first time or c > "
                 "0): all 0 models a decode worker that makes every token at once")  # fmt: skip

    def time(self, batch: int, context: int) -> float:
        return self.batch_time(batch) + self.c * context

    def batch_time(self, batch: float) -> float:
        """The step's time at ``batch`` sequences before their context's."""
        knots = self.batch_s
        if not knots:
            return self.a + self.b * batch
        if batch <= knots[0][0] or len(knots) == 1:
            return knots[0][1]
        for (b0, t0), (b1, t1) in zip(knots, knots[1:], strict=False):
            if batch <= b1:
                return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        (b0, t0), (b1, t1) = knots[-2:]
        return t1 + max(0.0, (t1 - t0) / (b1 - b0)) * (batch - b1)


@dataclass(frozen=True)
class TransportModel:
    latency_s: float
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        _seconds(latency_s=self.latency_s)
        _scales(bandwidth_bytes_per_s=self.bandwidth_bytes_per_s)

    def time(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class MigrationModel:
    """A layer migration's phases: weights per layer (0 when the helper holds them), the staged
    KV copy at the transport's bandwidth, and the switch pause."""

    weights_s_per_layer: float
    switch_pause_s: float
    revert_s: float  # REVERTING: the KV of the moved layers copied back, then the switch back
    # The protocol's own time from COPYING to SWITCHING besides weights and KV (Prepare on both
    # workers, staged deltas: the policy's T_sync), measured from coordinator state events.
    copy_s: float = 0.0
    # One activation hop while ACTIVE; None: the transport's latency (a loopback transfer).
    hop_s: float | None = None

    def __post_init__(self) -> None:
        _seconds(**{f"migration.{k}": v for k, v in asdict(self).items()
                    if k != "hop_s" or v is not None})  # fmt: skip


@dataclass(frozen=True)
class StepCosts:
    """One kind of serving worker's steps against the in-process engine's model: multipliers
    of the prefill and decode step models and a cost per prefill step."""

    prefill_scale: float = 1.0
    decode_scale: float = 1.0
    prefill_step_s: float = 0.0
    # A decode worker's step while a prefill worker computes a prompt whose KV it receives,
    # against its step otherwise (a multiplier on top of ``decode_scale``; ``sim serving``).
    receiving_scale: float = 1.0

    def __post_init__(self) -> None:
        _seconds(prefill_step_s=self.prefill_step_s)
        _scales(prefill_scale=self.prefill_scale, decode_scale=self.decode_scale,
                receiving_scale=self.receiving_scale)  # fmt: skip

    def describe(self) -> str:
        receiving = (f" (x{self.receiving_scale:.3f} more while receiving a hand-off)"
                     if self.receiving_scale != 1.0 else "")  # fmt: skip
        return (f"prefill x{self.prefill_scale:.3f} + {self.prefill_step_s * 1e3:.1f} ms a step, "
                f"decode x{self.decode_scale:.3f}{receiving}")  # fmt: skip


@dataclass(frozen=True)
class ServingModel:
    """A serving worker's steps against the in-process engine's (which calibrate.py times, in
    CPU time): its loop, gRPC, token streaming and the cores it shares with the router, Redis
    and the client, as multipliers of the prefill and decode step models plus a cost per
    prefill step; and the router's time per request. Fitted on a real ``bench compare`` run
    by ``sim serving`` (serving.py); the defaults: the engine alone.

    The flat fields are a PD worker's (prefill and decode roles: the layer hook's KV hand-off,
    the KV imports, the data plane's loop); ``mixed`` is a colocated worker's, which does
    neither, when ``sim serving --colocated-apart`` fitted it apart (it paid while the local
    data planes were UCX, not since they are TCP: docs/simulator.md, session 13) — None: as the
    PD workers'."""

    prefill_scale: float = 1.0
    decode_scale: float = 1.0
    source: str = ""
    # Seconds a serving prefill step takes past its scaled model whatever its size: the layer
    # hook's per-layer KV hand-off, the step's loop and output (``sim serving`` fits it with
    # ``prefill_scale`` on the real worker's own lone steps). A prefill worker pays it once per
    # prompt the step completes (the hook hands each prompt's layers off one by one; session
    # 21), at least once a step; a colocated worker once a step.
    prefill_step_s: float = 0.0
    # Seconds from a request's arrival to its prefill worker's queue: the router's own work and
    # the decode worker's reservation (the router's ``routing_s``, its median over a real run).
    route_s: float = 0.0
    mixed: StepCosts | None = None
    # A decode worker's step while a prefill worker computes a prompt it will hand to it (its
    # KV streams in layer by layer meanwhile), against the same step otherwise: on the local
    # cluster 1.14-1.15x (docs/simulator.md, session 20). ``sim serving`` fits it on the real
    # decode worker's steps; 1.0: no such effect.
    receiving_scale: float = 1.0
    # A PD worker's costs in a cluster with the global KV store and the coordinator
    # (banaserve): its prefix lookups and write-backs, the store node's and the coordinator's
    # share of the cores. ``sim serving --banaserve-apart`` fits it on the banaserve rows
    # without a migration (docs/simulator.md, session 21); None: as the other PD workers'.
    store: StepCosts | None = None

    def __post_init__(self) -> None:
        self.costs(mixed=False)  # validates the flat fields
        _seconds(route_s=self.route_s)

    def costs(self, mixed: bool, store: bool = False) -> StepCosts:
        """A mixed (colocated) worker's step costs, or a prefill or decode worker's (``store``:
        in a cluster with the KV store and the coordinator)."""
        if mixed:
            if self.mixed is not None:
                return self.mixed
        elif store and self.store is not None:
            return self.store
        return StepCosts(self.prefill_scale, self.decode_scale, self.prefill_step_s,
                         self.receiving_scale)  # fmt: skip

    def describe(self) -> str:
        """Lines for a person: each kind of worker's costs, the routing time and the source."""
        mixed = (self.mixed.describe() if self.mixed is not None
                 else "as the PD workers' (not fitted apart)")  # fmt: skip
        store = "" if self.store is None else f"\nbanaserve's PD workers: {self.store.describe()}"
        return (f"route {self.route_s * 1e3:.1f} ms, PD workers: "
                f"{self.costs(mixed=False).describe()}{store}\ncolocated workers: {mixed}\n"
                f"{self.source or 'not fitted: the engine alone'}")  # fmt: skip

    @classmethod
    def from_json_fields(cls, **data: object) -> ServingModel:
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: dict) -> ServingModel:
        d = dict(data)
        for kind in ("mixed", "store"):
            if d.get(kind) is not None:
                d[kind] = _part(f"serving.{kind}", StepCosts, d[kind])
        return cls(**d)


@dataclass(frozen=True)
class Profile:
    model: str
    num_layers: int
    block_size: int
    kv_bytes_per_block_layer: int
    num_kv_blocks: int  # per worker (the engine's default 1 GiB pool for this model)
    max_num_seqs: int
    max_num_batched_tokens: int
    prefill: PrefillModel
    decode: DecodeModel
    transports: dict[str, TransportModel]
    migration: MigrationModel
    layer_share: float  # one decoder layer's share of a step (the policy's input)
    source: str = ""  # "calibrated on HOST at TIME" or "hand-made (tests)"
    points: dict[str, list[list[float]]] = field(default_factory=dict)  # the raw measurements
    serving: ServingModel = field(default_factory=ServingModel)

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str), f"model must be a name, got {self.model!r}")
        _counts(2, num_layers=self.num_layers)
        _counts(1, block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                kv_bytes_per_block_layer=self.kv_bytes_per_block_layer,
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens)  # fmt: skip
        _require(bool(self.transports), "a profile needs at least one transport")
        _scales(layer_share=self.layer_share)
        _require(self.layer_share < 1, f"layer_share must be in (0, 1): {self.layer_share}")

    def transport(self, name: str | None = None) -> TransportModel:
        if name is None:
            name = "ucx" if "ucx" in self.transports else "tcp"
        if name not in self.transports:
            raise ConfigError(f"no transport {name!r} in the profile: {sorted(self.transports)}")
        return self.transports[name]

    def kv_bytes(self, num_tokens: int, num_layers: int | None = None) -> int:
        blocks = math.ceil(num_tokens / self.block_size)
        return blocks * self.kv_bytes_per_block_layer * (num_layers or self.num_layers)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        d = dict(data)
        for key, kind in (("prefill", PrefillModel), ("decode", DecodeModel),
                          ("migration", MigrationModel)):  # fmt: skip
            d[key] = _part(key, kind, d.get(key))
        transports = d.get("transports")
        if not isinstance(transports, dict):
            raise TypeError(f"transports must be an object by name, got {transports!r}")
        d["transports"] = {k: _part(f"transports.{k}", TransportModel, v)
                           for k, v in transports.items()}  # fmt: skip
        # absent: profiles from before it
        d["serving"] = _part("serving", ServingModel.from_json_fields, d.get("serving", {}))
        return cls(**d)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Profile:
        """The profile in ``path``; a file that is not one is a ``ConfigError`` naming it."""
        data = read_json(path, "simulator profile")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise ConfigError(f"simulator profile {path}: {exc}") from None
            raise ConfigError(f"{path} is not a simulator profile (`sim calibrate` writes "
                              f"one): {type(exc).__name__}: {exc}") from None  # fmt: skip
