"""Typed configuration: frozen dataclasses, validated on construction.

Only a ``__main__`` (or the CLI) reads the environment; cores receive their own
section already built.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.errors import ConfigError
from services.common.limits import MAX_MICRO_BATCHES, MAX_THREADS, check_target

if TYPE_CHECKING:  # only a type: services/common never imports grpc
    from services.rpc.security import SecurityConfig

DTYPES = ("float32", "bfloat16")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# A waiting prompt steps over a step for a prefix at least this long (whole blocks) that a
# running sequence is computing, and takes it from the cache after: a prefill step's fixed
# cost is that of ~65 prompt tokens on the VM measured (the simulator's fitted smollm2
# profiles of 2026-12-03/04: 87-95 ms a step against 1.3-1.5 ms a token), so waiting a step
# for fewer would cost about what it saves.
DEFER_SHARED_PREFIX_TOKENS = 64


@dataclass(frozen=True)
class EngineConfig:
    """What one engine needs: its model, numeric format, KV pool and batching limits."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    # KV pool size: an explicit block count wins over the byte budget.
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 1 << 30
    # Weights held + KV pools must fit; the KV pool gets every block the weights leave and
    # grows or shrinks as layers leave or return (services/engine/memory.py). Replaces the two
    # options above.
    memory_budget_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # A step that decodes computes at most this many prompt tokens (its decodes wait for them:
    # every decoding sequence's time per token); 0: the step's budget alone
    # (services/engine/scheduler.py).
    max_prefill_tokens_while_decoding: int = 0
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # A waiting prompt steps over a step whose running sequences are computing this many or
    # more tokens of its prefix (whole blocks), so it takes them from the cache instead of
    # computing them too (services/engine/scheduler.py); 0: never.
    defer_shared_prefix_tokens: int = DEFER_SHARED_PREFIX_TOKENS
    num_threads: int | None = None
    # Load only decoder layers [0, n) (None: all). Such an engine serves no request of its own
    # (it refuses them with the reason); it hosts layers migrated to it, whose weights the donor
    # ships when it lacks them (docs/migration.md, "Weight transfer").
    num_loaded_layers: int | None = None
    # Under a layer split with two micro-batches, decode steps overlap across engine steps (two
    # step streams, services/engine/pipeline.py); off: both halves inside one step, as before.
    pipelined_steps: bool = True
    # A step whose batch has sequences attended on a helper (attention migration) runs as this
    # many micro-batches, so that one part's round trips to the helper overlap the other part's
    # layers (services/engine/step.py); 1: the whole batch waits at every layer. 1 by default:
    # on both machines measured (2-vCPU AMD EPYC; 2-vCPU Intel Xeon with a 260 MiB L3, session
    # 40) each part's pass over the layers cost as much as the overlap saved or more, and TPOT
    # p99 rose (docs/migration.md, "Attention migration: figures").
    located_micro_batches: int = 1

    def __post_init__(self) -> None:
        _require(bool(self.model), "model must name a prepared model or a model directory")
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(
            re.fullmatch(r"cpu|cuda(:[0-9]+)?", self.device) is not None,
            f"device must be cpu, cuda or cuda:N, got {self.device!r}",
        )
        _require(
            self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
            f"block_size must be a power of two up to 128, got {self.block_size}",
        )
        _require(
            self.num_kv_blocks is None or self.num_kv_blocks > 0,
            f"num_kv_blocks must be positive, got {self.num_kv_blocks}",
        )
        _require(
            1 <= self.located_micro_batches <= MAX_MICRO_BATCHES,
            f"located_micro_batches must be in [1, {MAX_MICRO_BATCHES}], "
            f"got {self.located_micro_batches}",
        )
        _require(
            self.kv_cache_bytes > 0, f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}"
        )
        _require(
            self.memory_budget_bytes is None or self.memory_budget_bytes > 0,
            f"memory_budget_bytes must be positive, got {self.memory_budget_bytes}",
        )
        _require(
            self.memory_budget_bytes is None or self.num_kv_blocks is None,
            "set num_kv_blocks or memory_budget_bytes, not both",
        )
        _require(self.max_num_seqs > 0, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _require(
            self.defer_shared_prefix_tokens >= 0,
            f"defer_shared_prefix_tokens must be 0 or more, got {self.defer_shared_prefix_tokens}",
        )
        _require(
            self.max_num_batched_tokens >= self.block_size,
            "max_num_batched_tokens must be at least block_size, "
            f"got {self.max_num_batched_tokens} < {self.block_size}",
        )
        _require(
            self.max_prefill_tokens_while_decoding >= 0,
            "max_prefill_tokens_while_decoding must be 0 or more, "
            f"got {self.max_prefill_tokens_while_decoding}",
        )
        _require(
            self.max_model_len is None or self.max_model_len > 0,
            f"max_model_len must be positive, got {self.max_model_len}",
        )
        _require(
            self.num_threads is None or 0 < self.num_threads <= MAX_THREADS,
            f"num_threads must be in 1..{MAX_THREADS}, got {self.num_threads}",
        )
        _require(
            self.num_loaded_layers is None or self.num_loaded_layers > 0,
            f"num_loaded_layers must be positive, got {self.num_loaded_layers}",
        )


def banaserve_home() -> Path:
    """Root of BanaServe's local state; ``BANASERVE_HOME`` moves it."""
    return Path(os.environ.get("BANASERVE_HOME", Path.home() / ".cache" / "banaserve"))


def models_dir() -> Path:
    return banaserve_home() / "models"


TRACING_EXPORTERS = ("none", "console", "otlp")


def _is_reachable_ip(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


# How long a stopping service gives the work it holds (a request's stream, a prompt's prefill,
# a KV transfer) to finish before it cancels it (every service's ``--drain-timeout``,
# services/rpc/server.py). Long enough for most requests to end on their own; what still runs
# then is routed again or resumed elsewhere by the router, or, on a stopping router, fails
# UNAVAILABLE and the client library resumes it. Kubernetes' default termination grace is 30 s:
# the manifests give pods 45 s, and docker-compose.yml the same, so a drain ends before the
# orchestrator's SIGKILL.
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RpcConfig:
    """How a gRPC server listens and how channels to peers behave (services/rpc)."""

    # The IP to bind and to tell peers: loopback unless a deployment gives the container's or
    # pod's own (services/common/network.py); never a wildcard, since peers are told it.
    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port and the server reports it
    # KV layers travel as single messages; gRPC's default 4 MiB limit is far too small.
    max_message_bytes: int = 256 << 20
    # What a server accepts per message, when less than max_message_bytes: a client API whose
    # requests are small (the router's) refuses a huge message before reading it
    # (RESOURCE_EXHAUSTED), instead of decoding it on its event loop. None: max_message_bytes.
    max_receive_message_bytes: int | None = None
    # On SIGTERM/stop: how long in-flight calls may run before they are cancelled (a service's
    # ``--drain-timeout``, DRAIN_TIMEOUT_S by default; this library default is for servers
    # built in-process).
    grace_s: float = 5.0
    # HTTP/2 keepalive pings find a peer that vanished without closing its connection: a
    # server's pings to its clients (and the client library's, services/client) ...
    keepalive_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    # ... and a service's channels to its peers (services/rpc/channels.py). A call in flight
    # on a connection that died without a reset (a black-holed or stranded link) waits for
    # these, at most 2 s + 3 s, before it fails UNAVAILABLE and the router tries elsewhere
    # (10 s + 5 s before session 31). Peers are within one deployment: a ping's answer takes
    # milliseconds there, and the report stream's own 1 s + 2 s has held under load.
    channel_keepalive_s: float = 2.0
    channel_keepalive_timeout_s: float = 3.0
    # Mutual TLS and the client API's token (services/rpc/security.py); None: plaintext, open.
    security: SecurityConfig | None = None

    def __post_init__(self) -> None:
        _require(
            _is_reachable_ip(self.host),
            f"host must be an IP address peers can reach (not 0.0.0.0 or ::), got {self.host!r}",
        )
        _require(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")
        _require(
            1024 <= self.max_message_bytes < (1 << 31),
            f"max_message_bytes must be in [1 KiB, 2 GiB), got {self.max_message_bytes}",
        )
        _require(
            self.max_receive_message_bytes is None
            or 1024 <= self.max_receive_message_bytes <= self.max_message_bytes,
            "max_receive_message_bytes must be in [1 KiB, max_message_bytes], "
            f"got {self.max_receive_message_bytes}",
        )
        _require(self.grace_s >= 0, f"grace_s must be >= 0, got {self.grace_s}")
        _require(self.keepalive_s > 0, f"keepalive_s must be positive, got {self.keepalive_s}")
        for name in ("keepalive_timeout_s", "channel_keepalive_s", "channel_keepalive_timeout_s"):
            value = getattr(self, name)
            _require(value > 0, f"{name} must be positive, got {value}")

    @property
    def server_receive_bytes(self) -> int:
        if self.max_receive_message_bytes is None:
            return self.max_message_bytes
        return self.max_receive_message_bytes


@dataclass(frozen=True)
class TracingConfig:
    """Where OpenTelemetry spans go: nowhere, stderr (``console``) or an OTLP/gRPC collector."""

    exporter: str = "none"
    otlp_endpoint: str = ""  # "HOST:PORT" of the collector; required for, and only for, otlp
    service_name: str = "banaserve"
    sample_ratio: float = 1.0  # share of new traces recorded; children follow their parent

    def __post_init__(self) -> None:
        _require(
            self.exporter in TRACING_EXPORTERS,
            f"tracing exporter must be one of {TRACING_EXPORTERS}, got {self.exporter!r}",
        )
        _require(
            bool(self.otlp_endpoint) == (self.exporter == "otlp"),
            "otlp_endpoint must be set exactly when the exporter is otlp, "
            f"got exporter={self.exporter!r} otlp_endpoint={self.otlp_endpoint!r}",
        )
        if self.otlp_endpoint:  # HOST:PORT, or the exporter's http(s)://HOST:PORT[/]
            target = re.sub(r"^https?://", "", self.otlp_endpoint).removesuffix("/")
            check_target(target, "otlp_endpoint")  # else the spans fail, unseen, in the background
        _require(bool(self.service_name), "service_name must be non-empty")
        _require(
            0 <= self.sample_ratio <= 1, f"sample_ratio must be in [0, 1], got {self.sample_ratio}"
        )
