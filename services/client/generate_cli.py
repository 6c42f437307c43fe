"""``banaserve generate --router HOST:PORT``: the in-process command's stdout contract, over
the router (text streamed to stdout, then a newline; one summary line on stderr)."""

from __future__ import annotations

import argparse
import sys

from services.client.client import BanaServeClient, BanaServeClientError


def run_remote_generate(args: argparse.Namespace) -> int:
    with BanaServeClient(args.router) as client:
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
        )
        try:
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
