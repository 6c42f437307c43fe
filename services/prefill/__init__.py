"""The prefill worker (DESIGN.md §2): computes prompts and hands their KV to decode workers."""

from services.common.grpc_env import quiet_grpc_core

quiet_grpc_core()  # before anything imports grpc (services/common/grpc_env.py)
