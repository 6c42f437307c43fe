"""What a load test presents to a service started with ``--tls-dir`` and ``--api-token-file``
(docs/security.md): the certificate of each role it plays, the data-plane secret, the token.

A load test plays its service's callers, and a role's certificate allows only that role's calls
(``services.rpc.security.RULES``), so each test presents the roles of the callers it plays:

| load test | presents | why |
|---|---|---|
| router | ``client`` + token | ``Generate`` is the client API (``ListWorkers``: every role) |
| router ``--stub-workers`` | and ``prefill``, ``decode`` | each stub serves with, and registers (``ReportLoad``) with, the certificate of the worker it plays |
| prefill | ``router``; the sink ``decode`` | ``Prefill`` and ``Stats`` are the router's; the sink is a decode worker's receiving side (the worker calls ``TransferKV`` on it) and its TCP data plane authenticates with the data-plane secret |
| decode | ``router`` and ``prefill`` | ``ReserveKV``, ``StreamTokens``, ``Release``, ``Stats`` are the router's; the KV goes as a prefill worker sends it (the gRPC data plane admits workers only) |
| kvstore | ``prefill``, and ``client`` for ``Stats`` | the store's writes, pins and data plane are the prefill worker's; ``Stats`` (the leak check) is an observer's, which a worker is not |
| coordinator | ``client`` + token | what ``banaserve migrate`` and ``migrations`` present |

Every file a run needs is checked when its scenario is built, before anything connects: a
missing or damaged one is refused naming it (``TlsFiles``, ``security_config``). The data-plane
secret is process-wide (``secure_data_planes``): a scenario sets it in ``setup`` for the data
planes it opens and clears it in ``close``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from services.common.config import RpcConfig
from services.rpc import security as security_module
from services.rpc.security import (
    Role,
    SecurityConfig,
    bearer_metadata,
    flags_hint,
    read_tokens,
    security_config,
)


@dataclass(frozen=True)
class Credentials:
    """``tls_dir``: what ``banaserve certs DIR`` wrote ("": plaintext); ``token``: the bearer
    token sent where the client API wants one ("": none)."""

    tls_dir: str = ""
    token: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Credentials:
        """``--tls-dir`` and ``--api-token-file`` (its first token, as ``banaserve generate``)."""
        token_file = getattr(args, "api_token_file", "") or ""
        token = read_tokens(Path(token_file))[0] if token_file else ""
        return cls(getattr(args, "tls_dir", "") or "", token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """``authorization: Bearer <token>``, or nothing without a token."""
        return bearer_metadata(self.token)

    def security(self, role: Role) -> SecurityConfig | None:
        """``role``'s certificate and the data-plane secret; None without TLS. A missing or
        damaged file is refused here, naming it."""
        if not self.tls_dir:
            return None
        args = argparse.Namespace(tls_dir=self.tls_dir, api_token_file="")
        with _without_redis_warning():  # a load test talks to no Redis: its password is moot
            return security_config(args, role)

    def rpc(self, role: Role, base: RpcConfig | None = None) -> RpcConfig:
        """``base`` presenting ``role``'s certificate (``base`` itself without TLS)."""
        base = base or RpcConfig()
        if not self.tls_dir:
            return base
        return replace(base, security=self.security(role))


NONE = Credentials()


class _NotRedis(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Redis" not in record.getMessage()


@contextlib.contextmanager
def _without_redis_warning() -> Iterator[None]:
    """``security_config`` warns when the directory has no Redis password (one written before
    ``banaserve certs`` made it): true of a service, beside the point for a load test."""
    logger, quiet = logging.getLogger(security_module.__name__), _NotRedis()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def hint(credentials: Credentials, status: str, message: str = "") -> str:
    """What a refused or failed first call likely means about the flags: " (...)" or ""."""
    return flags_hint(credentials.tls_dir, credentials.token, status, message)
