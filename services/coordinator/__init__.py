"""The coordinator: runs module migrations between live workers as traced state machines."""

from services.common.grpc_env import quiet_grpc_core

quiet_grpc_core()  # before anything imports grpc (services/common/grpc_env.py)
