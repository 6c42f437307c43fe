"""One greedy request through the router, inside a trace the caller names, for the compose
smoke test: ``python client.py ROUTER PROMPT MAX_TOKENS TRACE_ID`` prints the completion's text.

The W3C ``traceparent`` header makes the router's spans (and the workers' under them) children
of a trace whose id the test knows, so it can find them in the collector's output.
``BANASERVE_TLS_DIR`` / ``BANASERVE_API_TOKEN_FILE``: mutual TLS and the bearer token, when the
cluster requires them.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import grpc

from services.rpc import security
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc


def channel(target: str) -> grpc.Channel:
    tls_dir = os.environ.get("BANASERVE_TLS_DIR", "")
    if not tls_dir:
        return grpc.insecure_channel(target)
    files = security.TlsFiles.in_dir(Path(tls_dir), security.Role.CLIENT)
    credentials = security.channel_credentials(files)
    return grpc.secure_channel(target, credentials, options=security.channel_options())


def main(target: str, prompt: str, max_tokens: str, trace_id: str) -> int:
    metadata = [("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")]
    if token_file := os.environ.get("BANASERVE_API_TOKEN_FILE", ""):
        metadata += security.bearer_metadata(Path(token_file).read_text().strip())
    request = router_pb2.GenerateRequest(
        text=prompt, sampling=common_pb2.SamplingParams(max_tokens=int(max_tokens), temperature=0)
    )
    with channel(target) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        frames = stub.Generate(request, timeout=120, metadata=metadata)
        text = "".join(f.delta.text for f in frames if f.WhichOneof("frame") == "delta")
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
