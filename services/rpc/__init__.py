"""The only shared code that imports grpc (DESIGN.md §6).

``codegen`` builds ``gen/`` from ``protos/``; ``server`` starts a service's gRPC server (health,
reflection, drain); ``channels`` opens channels to peers; ``status`` maps domain errors to status
codes; ``tracing`` sets up OpenTelemetry. Services import their generated modules as
``services.rpc.gen.banaserve.v1.<name>_pb2``.
"""
