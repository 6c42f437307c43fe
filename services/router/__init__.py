"""The router service: picks a prefill and a decode worker per request by load.

``core.Router`` is the whole logic (no grpc); ``registry`` owns worker state and ``policies``
the choice. See docs in each module for lifecycles and invariants.
"""

from services.common.grpc_env import quiet_grpc_core

quiet_grpc_core()  # before anything imports grpc (services/common/grpc_env.py)
