"""Checks a transfer's header against this worker's engine and the reserved prompt."""

from __future__ import annotations

from services.common.errors import InvalidRequestError
from services.common.hashing import block_hashes
from services.decode.transfer import TransferHeader
from services.engine.engine import Engine


def check_layout(
    engine: Engine, prompt_token_ids: list[int], header: TransferHeader, first_block: int = 0
) -> None:
    """Raises ``InvalidRequestError`` unless the KV fits this engine and the prompt (model,
    dtype, block size, heads, head size, layers, tokens and block hashes) and starts at the
    reservation's ``first_block`` (the blocks before it are reused here). Reads only the
    engine's fixed configuration, so any thread may call it."""
    e, got = engine, header.layout
    mine = (e.kv_cache.dtype_name, e.config.block_size, e.spec.num_kv_heads, e.spec.head_dim)
    theirs = (got.dtype, got.block_size, got.num_kv_heads, got.head_dim)
    if got.fingerprint != e.fingerprint:
        raise InvalidRequestError("KV was computed by a different model or dtype")
    if theirs != mine or header.num_layers != e.spec.num_layers:
        raise InvalidRequestError(
            f"KV layout (dtype, block, heads, dim, layers) {(*theirs, header.num_layers)} "
            f"!= this worker's {(*mine, e.spec.num_layers)}"
        )
    if got.num_tokens != len(prompt_token_ids):
        raise InvalidRequestError(
            f"KV covers {got.num_tokens} tokens, the reservation {len(prompt_token_ids)}"
        )
    if got.first_block != first_block:
        raise InvalidRequestError(
            f"KV starts at block {got.first_block}; this reservation takes it from block "
            f"{first_block} (ReserveKVResponse.num_cached_blocks: the blocks before are cached)"
        )
    expected = block_hashes(prompt_token_ids, got.block_size, e.fingerprint)[first_block:]
    if list(got.block_hashes) != expected:
        raise InvalidRequestError("KV block hashes do not match the reserved prompt")
