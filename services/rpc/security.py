"""Who may call what: mutual TLS between services, a bearer token on the client API.

Lifecycle in a service process (docs/security.md):
  1. ``add_security_args(parser)`` adds ``--tls-dir`` and ``--api-token-file``;
     ``security_config(args, Role.X)`` turns them into a ``SecurityConfig`` (None when both are
     off, the default of a local ``banaserve up``), which travels in ``RpcConfig.security``;
  2. ``start_server`` serves on ``server_credentials`` (a client certificate signed by the
     cluster CA is required at the handshake) and installs ``AuthInterceptor``, which checks
     every call against ``RULES``: the caller's role comes from its certificate's URI SAN
     ``spiffe://banaserve/<role>`` (written by ``banaserve certs``, services/rpc/certs.py), the
     client API also wants ``authorization: Bearer <token>`` metadata;
  3. ``open_channel`` connects with ``channel_credentials`` (the process's own role certificate).

Refusals: no valid token where one is required → UNAUTHENTICATED; a role not allowed to call
the method → PERMISSION_DENIED. A peer without a CA-signed certificate never gets a call through:
the TLS handshake fails (UNAVAILABLE on its side).
"""

from __future__ import annotations

import argparse
import enum
import functools
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.errors import ConfigError
from services.rpc.dataplane import peer_auth
from services.rpc.handlers import HANDLER_KINDS, preceded

log = logging.getLogger(__name__)

SPIFFE_PREFIX = "spiffe://banaserve/"
# Every service certificate names this DNS SAN; channels verify the server against it instead
# of against the address they dial (a worker's address is an IP, or a name the CA never saw).
CLUSTER_NAME = "banaserve.internal"
AUTHORIZATION = "authorization"
BEARER = "bearer "
DATAPLANE_SECRET_FILE = "dataplane.secret"
# The password of the cluster's Redis (kvstore metadata, the coordinator's records): Redis speaks
# no TLS here, so without it anyone who reaches its port could rewrite the store's index or take
# the coordinator's claim (probe, session 43).
REDIS_SECRET_FILE = "redis.secret"


class Role(enum.Enum):
    ROUTER = "router"
    PREFILL = "prefill"
    DECODE = "decode"
    # A colocated worker (``--role mixed``): may do what a prefill and a decode worker may.
    MIXED = "mixed"
    KVSTORE = "kvstore"
    COORDINATOR = "coordinator"
    CLIENT = "client"


ROLES = tuple(Role)
INTERNAL = frozenset(ROLES) - {Role.CLIENT}
_WORKERS_THAT_PREFILL = frozenset({Role.PREFILL, Role.MIXED})
_WORKERS = frozenset({Role.PREFILL, Role.DECODE, Role.MIXED})
_OBSERVERS = frozenset({Role.ROUTER, Role.COORDINATOR, Role.CLIENT})


@dataclass(frozen=True)
class Rule:
    """Who may call a method; ``token``: a caller with the client role must also show a token."""

    roles: frozenset[Role]
    token: bool = False


_CLIENT_API = Rule(frozenset({Role.CLIENT}), token=True)
# Full service name -> method name -> rule ("*": every method not named). A service absent from
# the table (one added later) is open to every internal role and closed to clients.
RULES: Mapping[str, Mapping[str, Rule]] = {
    "banaserve.v1.RouterService": {
        "Generate": _CLIENT_API,
        "Abort": _CLIENT_API,
        "ListWorkers": Rule(INTERNAL | {Role.CLIENT}),
        # The attack it stops: a fake decode worker registering and receiving every prompt.
        "ReportLoad": Rule(_WORKERS),
    },
    "banaserve.v1.PrefillService": {
        # Only the router names KV targets (docs/security.md, "KV targets").
        "Prefill": Rule(frozenset({Role.ROUTER})),
        "Stats": Rule(_OBSERVERS),
    },
    "banaserve.v1.DecodeService": {
        # ReserveKV, RenewLease, StreamTokens, Release: the router's, for the requests it routes.
        "*": Rule(frozenset({Role.ROUTER})),
        "TransferKV": Rule(frozenset({Role.ROUTER}) | _WORKERS_THAT_PREFILL),
        "Stats": Rule(_OBSERVERS),
    },
    "banaserve.v1.KVStoreService": {
        # Writes (Reserve/Commit/Abort) only from the workers that compute KV: store poisoning.
        "*": Rule(_WORKERS_THAT_PREFILL),
        "Lookup": Rule(_WORKERS | {Role.ROUTER, Role.COORDINATOR}),
        "Pin": Rule(_WORKERS),
        "Unpin": Rule(_WORKERS),
        "Stats": Rule(_OBSERVERS | {Role.KVSTORE}),
    },
    # The gRPC data plane: KV into decode workers and in and out of the store.
    "banaserve.v1.DataPlaneService": {"*": Rule(_WORKERS)},
    "banaserve.v1.MigrationWorkerService": {"*": Rule(frozenset({Role.COORDINATOR}))},
    # Operators (`banaserve migrate`) hold the client certificate and a token.
    "banaserve.v1.CoordinatorService": {"*": Rule(INTERNAL | {Role.CLIENT}, token=True)},
    "grpc.health.v1.Health": {"*": Rule(frozenset(ROLES))},
    "grpc.reflection.v1alpha.ServerReflection": {"*": Rule(frozenset(ROLES))},
    "grpc.reflection.v1.ServerReflection": {"*": Rule(frozenset(ROLES))},
}
_DEFAULT_RULE = Rule(INTERNAL)


def rule_for(method: str) -> Rule:
    """``method``: grpc's full name, "/package.Service/Method"."""
    service, _, name = method.lstrip("/").partition("/")
    rules = RULES.get(service)
    if rules is None:
        return _DEFAULT_RULE
    return rules.get(name) or rules.get("*") or _DEFAULT_RULE


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the cluster CA, and this process's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path, role: Role) -> TlsFiles:
        """The layout ``banaserve certs DIR`` writes: ca.crt, <role>.crt, <role>.key."""
        d = Path(directory)
        return cls(d / "ca.crt", d / f"{role.value}.crt", d / f"{role.value}.key")

    def __post_init__(self) -> None:
        for path in (self.ca, self.cert, self.key):
            if not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist (create them: banaserve certs)")
        _check_pem(self)


def _check_pem(files: TlsFiles) -> None:
    """The CA and the certificate are PEM X.509 certificates and the key is the certificate's
    PEM private key. grpc takes any bytes and then fails to bind a server ("Failed to bind to
    address", a traceback) or every handshake; a damaged or mismatched file is named here."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def read(path: Path, what: str, load: Callable[[bytes], Any]) -> Any:
        try:
            return load(Path(path).read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"TLS file {path} is not a PEM {what}: {exc}") from None

    read(files.ca, "certificate", x509.load_pem_x509_certificates)
    cert = read(files.cert, "certificate", x509.load_pem_x509_certificate)
    key = read(files.key, "private key", lambda b: serialization.load_pem_private_key(b, None))
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.PEM
    if cert.public_key().public_bytes(encoding, public) != key.public_key().public_bytes(
        encoding, public
    ):
        raise ConfigError(f"TLS key {files.key} is not the key of certificate {files.cert}")


@dataclass(frozen=True)
class SecurityConfig:
    """What one process enforces and presents. ``tls`` None: plaintext, no roles checked;
    ``api_tokens`` empty: the client API wants no token."""

    role: Role
    tls: TlsFiles | None = None
    api_tokens: tuple[str, ...] = ()
    # Shared by the data planes to authenticate each other (services/rpc/dataplane/peer_auth.py).
    dataplane_secret: bytes = b""
    # Redis's password (REDIS_SECRET_FILE); "": none.
    redis_password: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise ConfigError(f"role must be a Role, got {self.role!r}")
        for token in self.api_tokens:
            if problem := token_problem(token):
                raise ConfigError(f"an API token {problem}")
        if self.dataplane_secret and len(self.dataplane_secret) < 16:
            raise ConfigError("the data-plane secret must be at least 16 bytes")


def token_problem(token: str) -> str:
    """What is wrong with ``token`` as an API token ("": nothing). A token travels in gRPC
    metadata and HTTP headers, which carry printable ASCII only: a non-ASCII one passed a
    printable check and failed every call INTERNAL "Invalid metadata" (probe, session 43)."""
    if len(token) < 16:
        return f"must be at least 16 characters, got {len(token)}"
    bad = next((c for c in token if not ("!" <= c <= "~")), None)
    if bad is not None:
        return f"must be printable ASCII without spaces, got the character {bad!r}"
    return ""


def read_tokens(path: Path) -> tuple[str, ...]:
    """One token per line; blank lines and lines starting with '#' are skipped. A bad token
    is refused naming the file and its line (a comment after a token is one)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API token file {path}: {exc}") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if problem := token_problem(token):
            raise ConfigError(f"{path}, line {number}: an API token {problem}")
        tokens.append(token)
    if not tokens:
        raise ConfigError(f"the API token file {path} holds no token")
    return tuple(tokens)


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-dir",
        default="",
        help="mutual TLS with the certificates `banaserve certs DIR` wrote (default: plaintext)",
    )
    p.add_argument(
        "--api-token-file",
        default="",
        help="bearer tokens the client API accepts, one per line (default: none required)",
    )


def security_config(args: argparse.Namespace, role: Role) -> SecurityConfig | None:
    """None: both off (a local ``banaserve up`` on 127.0.0.1 by default)."""
    if not args.tls_dir and not args.api_token_file:
        return None
    tls = TlsFiles.in_dir(Path(args.tls_dir), role) if args.tls_dir else None
    tokens = read_tokens(Path(args.api_token_file)) if args.api_token_file else ()
    secret = _read_secret(Path(args.tls_dir) / DATAPLANE_SECRET_FILE) if args.tls_dir else b""
    return SecurityConfig(role, tls, tokens, secret, redis_password(args.tls_dir))


def flags_hint(tls_dir: str, token: str, status: str, message: str = "") -> str:
    """What a failed first call of a client tool likely means about its ``--tls-dir`` and
    ``--api-token-file`` (``status``: the gRPC code's name): " (...)", or "" (the load tests
    and ``banaserve migrate``/``migrations``: a plaintext call to a TLS service failed
    "UNAVAILABLE: Socket closed" with no word of TLS; probe, session 44)."""
    if status == "UNAVAILABLE" and "connection refused" not in message.lower():
        if tls_dir:
            return (" (if the service is up, it may run without --tls-dir or with certificates "
                    "of another CA: the TLS handshake then fails)")  # fmt: skip
        return (" (if the service runs with --tls-dir, pass --tls-dir DIR, the directory "
                "`banaserve certs` wrote: a plaintext connection fails its TLS handshake)")  # fmt: skip
    if status == "UNAUTHENTICATED":
        if token:
            return " (the service does not accept the first token of --api-token-file)"
        return " (the service wants an API token: pass --api-token-file FILE)"
    return ""


def redis_password(tls_dir: str) -> str:
    """The cluster Redis's password, from ``tls_dir``'s REDIS_SECRET_FILE; "" without TLS, or
    from a certificates directory older than the file (Redis then takes no password, as
    before: a warning says so)."""
    if not tls_dir:
        return ""
    path = Path(tls_dir) / REDIS_SECRET_FILE
    if not path.exists():
        log.warning("%s is missing: Redis without a password (`banaserve certs` writes it)", path)
        return ""
    return read_redis_password(path)


def read_redis_password(path: Path) -> str:
    """The password in ``path``, as ``banaserve certs`` writes it (one line of printable ASCII,
    at least 16 characters); ConfigError naming the file otherwise."""
    try:
        password = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the Redis password {path}: {exc}") from None
    if len(password) < 16 or not all("!" <= c <= "~" for c in password):
        raise ConfigError(f"the Redis password in {path} must be >= 16 printable ASCII characters")
    return password


def _read_secret(path: Path) -> bytes:
    # With TLS on, a data plane that authenticates nobody would be the open door left.
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the data-plane secret {path}: {exc}") from None


def security_argv(tls_dir: str, api_token_file: str) -> list[str]:
    """The flags that hand the same settings to a child service (services/launcher.py)."""
    argv = ["--tls-dir", tls_dir] if tls_dir else []
    return argv + (["--api-token-file", api_token_file] if api_token_file else [])


# -- credentials -------------------------------------------------------------------------------


def _pem(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    return files.ca.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    ca, cert, key = _pem(files)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = _pem(files)
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def channel_options() -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", CLUSTER_NAME)]


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()


# -- checks ------------------------------------------------------------------------------------


def token_from_header(value: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` value; "" if there is none."""
    if not value or value[: len(BEARER)].lower() != BEARER:
        return ""
    return value[len(BEARER) :].strip()


def token_valid(token: str, accepted: Sequence[str]) -> bool:
    """Constant time in the token's content: every accepted token is compared, always."""
    given = token.encode()
    ok = False
    for candidate in accepted:
        ok |= hmac.compare_digest(given, candidate.encode())
    return ok and bool(token)


def caller_of_token(token: str) -> str:
    """A client's identity: which token it showed (a digest, never the token)."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16] if token else ""


@functools.lru_cache(maxsize=256)
def _role_of_pem(pem: bytes) -> Role | None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    roles = {
        uri[len(SPIFFE_PREFIX) :]
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(SPIFFE_PREFIX)
    }
    if len(roles) != 1:
        return None
    return Role._value2member_map_.get(roles.pop())  # type: ignore[return-value]


def peer_role(context: grpc.aio.ServicerContext) -> Role | None:
    """The role in the peer's verified certificate; None without TLS or without a role."""
    pems = context.auth_context().get("x509_pem_cert")
    return _role_of_pem(pems[0]) if pems else None


def _metadata_token(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION:
            return token_from_header(value if isinstance(value, str) else value.decode())
    return ""


def caller_identity(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for scoping client-visible operations (abort) and per-client limits:
    the token it showed, else its certificate's role, else "" (anonymous: everyone alike)."""
    token = _metadata_token(context)
    if token:
        return caller_of_token(token)
    role = peer_role(context)
    return f"role:{role.value}" if role else ""


def refusal(
    security: SecurityConfig, method: str, context: grpc.aio.ServicerContext
) -> tuple[grpc.StatusCode, str] | None:
    """Why ``context``'s caller may not call ``method``; None if it may."""
    rule = rule_for(method)
    role: Role | None = Role.CLIENT
    if security.tls is not None:
        role = peer_role(context)
        if role is None or role not in rule.roles:
            who = role.value if role else "a certificate without a role"
            return grpc.StatusCode.PERMISSION_DENIED, f"{who} may not call {method}"
    needs_token = rule.token and role is Role.CLIENT and bool(security.api_tokens)
    if needs_token and not token_valid(_metadata_token(context), security.api_tokens):
        return grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required"
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call with ``refusal`` before its handler runs (module docstring)."""

    def __init__(self, security: SecurityConfig) -> None:
        self._security = security

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        kind = (handler.request_streaming, handler.response_streaming)
        attr, make = HANDLER_KINDS[kind]
        checked = _checked(getattr(handler, attr), self._security, details.method)
        return make(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _checked(behavior: Callable[..., Any], security: SecurityConfig, method: str) -> Any:
    async def check(context: grpc.aio.ServicerContext) -> None:
        refused = refusal(security, method, context)
        if refused is not None:
            await context.abort(*refused)

    return preceded(behavior, check)


# -- the OpenAI HTTP API -------------------------------------------------------------------------

ASGIApp = Callable[[dict[str, Any], Callable[..., Any], Callable[..., Any]], Awaitable[None]]
_OPEN_PATHS = frozenset({"/health", "/ready"})  # probes carry no token
_UNAUTHORIZED = (
    b'{"error": {"message": "a valid bearer token is required (Authorization: Bearer ...)", '
    b'"type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}'
)


def require_bearer(app: ASGIApp, tokens: Sequence[str]) -> ASGIApp:
    """``app`` behind the HTTP form of the client API's token: every path but the health
    probes answers 401 (OpenAI's shape) without ``Authorization: Bearer <one of tokens>``."""
    accepted = tuple(tokens)

    async def guarded(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]):
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await app(scope, receive, send)
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        if token_valid(token_from_header(header.decode("latin-1")), accepted):
            return await app(scope, receive, send)
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                    (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})

    return guarded


# -- the data planes ---------------------------------------------------------------------------

_data_plane_security: SecurityConfig | None = None


def secure_data_planes(security: SecurityConfig | None) -> None:
    """Process-wide, once in a service's ``__main__`` before its data planes start: the TCP
    plane authenticates peers with ``security.dataplane_secret`` (dataplane/peer_auth.py) and
    the gRPC plane uses ``security`` like every other server and channel. A worker belongs to one
    cluster, and its data-plane clients are opened deep inside transports that carry no config."""
    global _data_plane_security
    _data_plane_security = security
    peer_auth.use_secret(security.dataplane_secret if security is not None else b"")


def data_plane_security() -> SecurityConfig | None:
    return _data_plane_security
