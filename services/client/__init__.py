"""A small Python client for the BanaServe router (``RouterService``).

    with BanaServeClient("127.0.0.1:50051") as client:
        stream = client.generate("Hello", max_tokens=32, temperature=0.0, timeout_s=30)
        for delta in stream:
            print(delta.text, end="", flush=True)
        print(stream.result.ttft_s, stream.result.tokens_per_s)

``AsyncBanaServeClient`` is the same over grpc.aio (``async for``). Every failure is a
``BanaServeClientError`` carrying the gRPC status code and the server's message.
"""

from services.client.client import (
    AsyncBanaServeClient,
    AsyncGeneration,
    BanaServeClient,
    BanaServeClientError,
    Delta,
    Generation,
    GenerationResult,
    WorkerStatus,
)

__all__ = [
    "AsyncBanaServeClient",
    "AsyncGeneration",
    "BanaServeClient",
    "BanaServeClientError",
    "Delta",
    "Generation",
    "GenerationResult",
    "WorkerStatus",
]
