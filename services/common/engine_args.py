"""The command-line flags every worker that runs an engine takes, spelled and defaulted once.

``python -m services.prefill`` and ``python -m services.decode`` (``--role decode|mixed``) call
``add_engine_args(parser)`` and build their engine from ``engine_config(args)``; ``banaserve up``
(services/launcher.py) passes the same flags to each. ``add_kv_transport_arg(parser)`` is the
prefill→decode handoff's data plane, with one meaning on both sides:

- on a decode worker, the data plane it serves for incoming KV (named in ``ReserveKVResponse``);
- on a prefill worker, any data plane value sends KV on the plane the decode worker names
  (the sender speaks the receiver's plane), and ``none`` keeps to the TransferKV stream.
"""

from __future__ import annotations

import argparse
import os

from services.common.arg_types import thread_count
from services.common.config import DTYPES, EngineConfig
from services.rpc.dataplane import KINDS as DATA_PLANES

# The handoff's data planes; "none": the DecodeService.TransferKV gRPC stream only.
NO_KV_TRANSPORT = "none"
KV_TRANSPORTS = (*DATA_PLANES, NO_KV_TRANSPORT)
DEFAULT_KV_TRANSPORT = "ucx"

_DEFAULTS = EngineConfig(model="-")


def add_engine_args(p: argparse.ArgumentParser, model_default: str = "tiny-llama") -> None:
    """The ``EngineConfig`` flags; ``model_default`` lets a ``__main__`` read it from the env."""
    p.add_argument("--model", default=model_default, help="prepared model name or directory")
    p.add_argument("--dtype", choices=DTYPES, default=_DEFAULTS.dtype)
    p.add_argument(
        "--device",
        default=os.environ.get("BANASERVE_DEVICE", _DEFAULTS.device),
        help="torch device the engine computes on: cpu (default), cuda, cuda:N",
    )
    p.add_argument("--threads", type=thread_count, default=1, help="torch intra-op threads")
    p.add_argument("--block-size", type=int, default=_DEFAULTS.block_size, help="tokens a block")
    p.add_argument(
        "--num-kv-blocks", type=int, default=None, help="KV blocks (wins over --kv-cache-bytes)"
    )
    p.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=_DEFAULTS.kv_cache_bytes,
        help="KV pool size in bytes, when --num-kv-blocks is not given",
    )
    p.add_argument(
        "--memory-budget-bytes",
        type=int,
        default=None,
        help="weights + KV must fit: the KV pool gets what the weights leave",
    )
    p.add_argument("--max-num-seqs", type=int, default=_DEFAULTS.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=_DEFAULTS.max_num_batched_tokens)
    p.add_argument(
        "--max-prefill-tokens-while-decoding",
        type=int,
        default=_DEFAULTS.max_prefill_tokens_while_decoding,
        metavar="N",
        help="a step that decodes computes at most N prompt tokens, so a prompt this worker "
        "prefills delays its decodes a little each step (0: the step's budget alone)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    p.add_argument(
        "--load-layers",
        dest="load_layers",
        type=int,
        default=None,
        metavar="N",
        help="load decoder layers [0, N) only: a migration helper that gets the others' weights "
        "from its donor and serves no request of its own",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="never reuse cached blocks of an equal prefix",
    )
    p.add_argument(
        "--defer-shared-prefix-tokens",
        type=int,
        default=_DEFAULTS.defer_shared_prefix_tokens,
        metavar="N",
        help="a waiting prompt waits a step for N or more of its prefix tokens that a running "
        "sequence is computing, then takes them from the cache; 0: never (docs/engine.md)",
    )
    p.add_argument(
        "--no-pipelined-steps",
        dest="pipelined_steps",
        action="store_false",
        help="under a layer split, keep both micro-batches inside one step instead of two "
        "overlapping step streams (docs/migration.md)",
    )
    p.add_argument(
        "--located-micro-batches",
        type=int,
        default=_DEFAULTS.located_micro_batches,
        metavar="N",
        help="micro-batches of a step with sequences attended on a helper (attention "
        "migration): one part's round trips overlap the others' layers; 1 (default): none",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The flags of ``add_engine_args`` as a validated config (ConfigError if inconsistent)."""
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_bytes=args.kv_cache_bytes,
        memory_budget_bytes=args.memory_budget_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.prefix_caching,
        defer_shared_prefix_tokens=args.defer_shared_prefix_tokens,
        num_threads=args.threads,
        num_loaded_layers=args.load_layers,
        pipelined_steps=args.pipelined_steps,
        located_micro_batches=args.located_micro_batches,
    )


def add_kv_transport_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-transport",
        choices=KV_TRANSPORTS,
        default=DEFAULT_KV_TRANSPORT,
        help="the data plane KV moves on from prefill to decode (none: the TransferKV stream)",
    )
