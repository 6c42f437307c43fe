"""A stand-in OpenTelemetry collector for the compose smoke test: OTLP/gRPC in, one JSON line
per span on stdout (``service``, ``name``, ``trace_id``, ``span_id``, ``parent_span_id``).

No registry is reachable where the smoke test runs, so the collector image of
docker-compose.observability.yml cannot be pulled; this receiver speaks the same protocol on the
same port (4317), so the services are configured exactly as with the real collector.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):  # noqa: N802 (the protocol's name)
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    line = {
                        "service": service,
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                    }
                    print(json.dumps(line), flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=4317)
    args = p.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceSink(), server)
    server.add_insecure_port(f"0.0.0.0:{args.port}")
    server.start()
    print(f"otlp sink listening on :{args.port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1))
    server.wait_for_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
