"""Data-plane peer authentication: a mutual HMAC challenge over a secret the cluster shares.

The data planes move raw bytes outside gRPC, so gRPC's mutual TLS does not cover them. When a
secret is set (``use_secret``: ``dataplane.secret`` written by ``banaserve certs``, read by
``services.rpc.security.security_config``), every new connection starts with this exchange,
before any frame, and a side that fails it closes the connection:

  1. server → client: MAGIC, server nonce Ns (32 bytes);
  2. client → server: client nonce Nc, HMAC-SHA256(secret, "client" | Ns | Nc);
  3. server → client: HMAC-SHA256(secret, "server" | Nc | Ns).

Each side proves it holds the secret without sending it, and fresh nonces make a recorded
exchange useless. What it does not give: confidentiality or integrity of the frames that follow
(docs/security.md says where that matters). Both sides bound the exchange by ``HANDSHAKE_S``,
so a peer that connects and says nothing holds no server task for long.

The secret is process-wide: a worker has one cluster, and every data-plane server and client
it opens (decode receivers, kvstore nodes, prefill senders) must use it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable

MAGIC = b"BSDP-AUTH1"
NONCE_BYTES = 32
MAC_BYTES = 32
HANDSHAKE_S = 5.0

Read = Callable[[int], Awaitable[bytes]]
Write = Callable[[bytes], Awaitable[None]]

_secret = b""


class PeerAuthError(Exception):
    """The peer did not prove it holds the cluster's data-plane secret."""


def use_secret(secret: bytes) -> None:
    """Sets the process's data-plane secret (b"": no authentication, the default)."""
    global _secret
    if secret and len(secret) < 16:
        raise ValueError("the data-plane secret must be at least 16 bytes")
    _secret = bytes(secret)


def secret() -> bytes:
    return _secret


def _mac(key: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, label + first + second, hashlib.sha256).digest()


async def prove_server(key: bytes, read: Read, write: Write) -> None:
    """The server's side; raises PeerAuthError (or EOFError/OSError) if the client fails."""
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    await write(MAGIC + server_nonce)
    reply = await read(NONCE_BYTES + MAC_BYTES)
    client_nonce, mac = reply[:NONCE_BYTES], reply[NONCE_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, b"client", server_nonce, client_nonce)):
        raise PeerAuthError("data-plane client failed the challenge")
    await write(_mac(key, b"server", client_nonce, server_nonce))


async def prove_client(key: bytes, read: Read, write: Write) -> None:
    """The client's side; raises PeerAuthError if the server fails (or speaks no auth)."""
    hello = await read(len(MAGIC) + NONCE_BYTES)
    if hello[: len(MAGIC)] != MAGIC:
        raise PeerAuthError("data-plane server does not authenticate peers")
    server_nonce = hello[len(MAGIC) :]
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    await write(client_nonce + _mac(key, b"client", server_nonce, client_nonce))
    mac = await read(MAC_BYTES)
    if not hmac.compare_digest(mac, _mac(key, b"server", client_nonce, server_nonce)):
        raise PeerAuthError("data-plane server failed the challenge")
