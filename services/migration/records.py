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
from services.common.migration_states import MigrationState
from services.engine.ports import StagePort


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

    def __post_init__(self) -> None:
        for name in ("default_lease_s", "max_lease_s", "data_timeout_s", "check_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.default_lease_s > self.max_lease_s:
            raise ConfigError("default_lease_s must not exceed max_lease_s")
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
    reason: str = ""
    weights_dropped: bool = False
    # donor only: the data-plane connection to the helper and the stage port using it
    link: Any = None  # services.migration.link.HelperLink
    port: StagePort | None = None

    @property
    def layers(self) -> range:
        return range(self.start, self.end)

    def moved(self, nbytes: int, request_ids: object) -> None:
        self.bytes_moved += nbytes
        self.sequences.update(request_ids)  # type: ignore[arg-type]


def layer_digest(layer: nn.Module) -> str:
    """16-byte BLAKE2b (hex) of a layer's parameters and buffers: names, dtypes, shapes, bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(layer.state_dict().items()):
        if tensor.is_mkldnn:  # a oneDNN-packed weight (packed_linear.py): digest its values
            tensor = tensor.to_dense()
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{list(tensor.shape)};".encode())
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()
