"""The global KV cache store: host-memory block pool, disk tier, metadata and data plane."""

from services.common.grpc_env import quiet_grpc_core

quiet_grpc_core()  # before anything imports grpc (services/common/grpc_env.py)
