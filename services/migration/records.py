"""What a worker knows about each migration it takes part in, and the pure helpers around it.

A ``MigrationRecord`` is created by Prepare and changed only by the agent (services/migration/
agent.py); the servicer turns it into a ``MigrationView``. Its ``state`` is this worker's view
of DESIGN.md §5's state machine: the last step done here (see migration.proto).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from services.common.errors import ConfigError
from services.common.migration_states import SMALL_COPY_BYTES, MigrationState
from services.engine.ports import StagePort

# The data-plane messages that move KV, as a helper's host handles them: its view's bytes and
# sequences follow them. ``kv_import_batch`` (how ``HelperLink.send`` sends) and the deltas were
# missing: a helper's view counted none of a copy's bytes (probe, session 44).
KV_IMPORTS = frozenset({"kv_import", "kv_import_batch", "kv_tokens"})
KV_MESSAGES = KV_IMPORTS | {"kv_export", "kv_tokens_export"}


class Role(enum.Enum):
    DONOR = "donor"
    HELPER = "helper"


SWITCHED = (MigrationState.SWITCHING, MigrationState.ACTIVE)  # the donor's steps use the helper


@dataclass(frozen=True)
class Peer:
    worker_id: str = ""
    address: str = ""
    data_address: str = ""
    data_transport: str = ""  # services.rpc.dataplane.KINDS, "" for none


@dataclass(frozen=True)
class AgentConfig:
    default_lease_s: float = 30.0
    max_lease_s: float = 600.0
    data_timeout_s: float = 30.0  # one data-plane message (a KV chunk, a stage's work)
    keep_ended: int = 64  # ended migrations List still shows
    check_interval_s: float = 0.5  # how often leases are checked
    weight_chunk_bytes: int = 4 << 20  # largest weights_import payload (weights.py)
    # KV a copy stage exports per visit of the engine thread (then sends at once, concurrently)
    copy_batch_bytes: int = 64 << 20
    # Copying before the pause is skipped below this much: a copy stage when the snapshot shows
    # at most this much KV of the moved layers in use (after ``learn_layers``), and the switch's
    # own stage before its pause when the last copy stage moved at most this much. Each stage
    # is a visit of the engine thread, a whole step's wait on a loaded prefill worker (~3 s
    # measured), and the pause then sends this much and a step or two's writes more.
    precopy_skip_bytes: int = SMALL_COPY_BYTES
    # attention migrations with ``refill``: how often an ACTIVE donor looks for sequences to move
    refill_interval_s: float = 0.25
    # attention migrations over tcp: the stepping thread's exchanges take a blocking connection
    # of their own (no hop through the agent's loop each way: attention_port.py)
    blocking_attention: bool = True

    def __post_init__(self) -> None:
        names = ("default_lease_s", "max_lease_s", "data_timeout_s", "check_interval_s")
        for name in (*names, "refill_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.default_lease_s > self.max_lease_s:
            raise ConfigError("default_lease_s must not exceed max_lease_s")
        for name in ("weight_chunk_bytes", "copy_batch_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.precopy_skip_bytes < 0:
            raise ConfigError(f"precopy_skip_bytes must be >= 0, got {self.precopy_skip_bytes}")
        if self.keep_ended < 0:
            raise ConfigError(f"keep_ended must be >= 0, got {self.keep_ended}")


@dataclass(eq=False)
class MigrationRecord:
    migration_id: str
    role: Role
    start: int
    end: int
    donor: Peer
    helper: Peer
    lease_s: float
    expires_at: float
    state: MigrationState = MigrationState.PLANNED
    bytes_moved: int = 0
    sequences: set[str] = field(default_factory=set)  # whose KV moved
    # donor only: sequences its end (an abort, a fall-back, a lease run out) sent back to
    # recompute, their KV on the helper lost with it
    num_requeued_at_end: int = 0
    last_copy_bytes: int | None = None  # donor: what its last copy stage moved (None: none yet)
    reason: str = ""
    weights_dropped: bool = False
    # donor only: why the helper is lost, once its port found it unreachable (the fall-back)
    helper_lost: str = ""
    # donor only: the data-plane connection to the helper and the stage port using it
    link: Any = None  # services.migration.link.HelperLink
    port: StagePort | None = None

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def moved(self, nbytes: int, request_ids: object) -> None:
        self.bytes_moved += nbytes
        self.sequences.update(request_ids)  # type: ignore[arg-type]


def layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's parameters and buffers as an unpacked layer names them, dense, on the
    CPU: a oneDNN-packed linear (packed_linear.py) reads back as its ``[out, in]`` weight, so
    packed and unpacked copies of one layer (CPU and GPU workers) look the same."""
    out = {}
    for name, tensor in layer.state_dict().items():
        if tensor.is_mkldnn:
            tensor = tensor.to_dense()
        if name.endswith(".packed"):
            name = name.removesuffix(".packed") + ".weight"
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """16-byte BLAKE2b (hex) over tensors in name order: names, dtypes, shapes, bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(tensors.items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{list(tensor.shape)};".encode())
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def layer_digest(layer: nn.Module) -> str:
    """The digest of a layer's weights (``layer_tensors``): equal means identical weights."""
    return tensors_digest(layer_tensors(layer))
