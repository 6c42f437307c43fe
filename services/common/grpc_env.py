"""gRPC core's log level in BanaServe's service processes.

gRPC core writes its INFO and WARNING lines as raw text on stderr, past the service's own log
format (``--log-format json`` included): ``I1207 15:03:43.896402 24476 chttp2_transport.cc:1403]
ipv4:127.0.0.1:35421: Got goaway [2] ... Cancelling all calls`` on every worker each time the
router stops. It reads ``GRPC_VERBOSITY`` when it is loaded, so each service's package (the
one ``python -m services.<role>`` imports first) calls ``quiet_grpc_core`` before anything
imports grpc. Its errors still come; a ``GRPC_VERBOSITY`` set by the user wins.
"""

from __future__ import annotations

import os

GRPC_CORE_VERBOSITY = "ERROR"


def quiet_grpc_core() -> None:
    os.environ.setdefault("GRPC_VERBOSITY", GRPC_CORE_VERBOSITY)
