"""``banaserve demo``: a local cluster on the real model answering a few questions.

Starts the cluster (``services.launcher``), streams each answer to stdout as it arrives with
its TTFT and tokens/s, then stops the cluster. Service logs go to a file, not the terminal.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from services.client.client import BanaServeClient, BanaServeClientError
from services.launcher import ClusterSpec, LocalCluster

QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="prepared model name or directory")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("prompts", nargs="*", help=f"questions (default: {len(QUESTIONS)} built in)")


def _ask(client: BanaServeClient, question: str, max_tokens: int) -> None:
    print(f"\n> {question}\n", flush=True)
    stream = client.generate(
        question, chat=True, temperature=0.0, max_tokens=max_tokens, timeout_s=120
    )
    for delta in stream:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    r = stream.result
    print(
        f"\n  [{len(r.token_ids)} tokens, TTFT {r.ttft_s * 1000:.0f} ms, "
        f"{r.tokens_per_s:.1f} tok/s, prefill {r.prefill_worker_id} → decode "
        f"{r.decode_worker_id}]",
        flush=True,
    )


def run_demo(args: argparse.Namespace) -> int:
    with tempfile.NamedTemporaryFile(
        "w", prefix="banaserve-demo-", suffix=".log", delete=False
    ) as log:
        print(
            f"starting router + 1 prefill + 1 decode worker on {args.model} (logs: {log.name}) ...",
            file=sys.stderr,
            flush=True,
        )
        cluster = LocalCluster(ClusterSpec(model=args.model), log)
        try:
            cluster.start()
            for child in cluster.children:
                print(f"{child.name} {child.address}", file=sys.stderr)
            with BanaServeClient(cluster.router.address) as client:
                for question in args.prompts or QUESTIONS:
                    _ask(client, question, args.max_tokens)
        except (RuntimeError, BanaServeClientError) as exc:
            print(f"banaserve: error: {exc} (see {log.name})", file=sys.stderr)
            return 1
        finally:
            cluster.stop()
    return 0
