"""The decode worker (DESIGN.md §2): receives a prompt's KV from a prefill worker into reserved
blocks, decodes it in a continuous batch, streams the tokens. ``core`` is the logic
(``transfer``: KV frames and layer assembly; ``load``: the load window), ``servicer`` the
DecodeService translation, ``clients`` the load reports to the router."""

from services.common.grpc_env import quiet_grpc_core

quiet_grpc_core()  # before anything imports grpc (services/common/grpc_env.py)
