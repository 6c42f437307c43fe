"""``banaserve generate --router HOST:PORT``: the in-process command's stdout contract, over
the router (text streamed to stdout, then a newline; one summary line on stderr)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.client.client import BanaServeClient, BanaServeClientError
from services.rpc.security import read_tokens


def run_remote_generate(args: argparse.Namespace) -> int:
    token = read_tokens(Path(args.api_token_file))[0] if args.api_token_file else ""
    with BanaServeClient(args.router, tls_dir=args.tls_dir or "", token=token) as client:
        try:
            stream = client.generate(
                args.prompt,
                chat=args.chat,
                timeout_s=args.timeout,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                ignore_eos=args.ignore_eos,
            )  # refused before sending when a value cannot be encoded (a seed of -1)
            for delta in stream:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except BanaServeClientError as exc:
            sys.stdout.write("\n")
            print(f"banaserve: error: {exc}", file=sys.stderr)
            return 2
    sys.stdout.write("\n")
    r = stream.result
    print(
        f"[banaserve] {len(r.token_ids)} tokens, finish={r.finish_reason}, ttft={r.ttft_s:.3f}s, "
        f"{r.tokens_per_s:.1f} tok/s (prefill {r.prefill_worker_id}, decode {r.decode_worker_id})",
        file=sys.stderr,
    )
    return 0
