"""The OpenAI HTTP API behind the client API's bearer token: 401 in OpenAI's shape without a
valid ``Authorization: Bearer`` header, served with one; the health probes stay open."""

from __future__ import annotations

import asyncio
import ssl

import httpx2
import pytest

from services.common.https_port import REFUSAL_BODY
from services.router.__main__ import parse_args
from services.router.openai_api import OpenAIApi
from services.router.openai_server import HttpServer
from services.rpc.security import Role, TlsFiles, require_bearer
from tests.router.grpc_fakes import cluster
from tests.router.test_openai_api import LIMITS, MODEL, completion
from tests.security.helpers import TOKEN_A, TOKEN_B

UNAUTHORIZED = {
    "error": {
        "message": "a valid bearer token is required (Authorization: Bearer ...)",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


def test_http_api_needs_a_valid_bearer_token():
    async def main():
        async with cluster() as c:
            api = OpenAIApi(c.driver, MODEL, LIMITS)
            app = require_bearer(api.app, (TOKEN_A, TOKEN_B))
            http = HttpServer(app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close)
            await http.start()
            try:
                async with httpx2.AsyncClient(base_url=f"http://{http.address}") as client:
                    for headers in (
                        {},
                        {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": TOKEN_A},  # no scheme
                    ):
                        r = await client.post("/v1/completions", json=completion(), headers=headers)
                        assert (r.status_code, r.json()) == (401, UNAUTHORIZED)
                        assert r.headers["www-authenticate"] == "Bearer"
                        assert (await client.get("/v1/models", headers=headers)).status_code == 401
                    assert c.log.calls == []
                    assert (await client.get("/health")).status_code == 200
                    ok = {"Authorization": f"bearer {TOKEN_B}"}
                    r = await client.post("/v1/completions", json=completion(), headers=ok)
                    assert r.status_code == 200
                    assert r.json()["choices"][0]["text"] == "<7><8><9><10>"
            finally:
                await http.stop()
            assert c.driver.num_running == 0

    asyncio.run(main())


def test_the_http_api_over_tls_with_the_routers_certificate(certs):
    """Probe, session 43: under ``--tls-dir`` the HTTP API stayed plain HTTP, the token in
    clear. ``--http-tls`` serves it over TLS with the router's certificate: a client that
    verifies against the cluster CA is served (the token still checked), plain HTTP gets a
    400 that says to use https, and a client that trusts another CA fails the handshake."""
    tls = TlsFiles.in_dir(certs, Role.ROUTER)

    async def main():
        async with cluster() as c:
            api = OpenAIApi(c.driver, MODEL, LIMITS)
            app = require_bearer(api.app, (TOKEN_A,))
            http = HttpServer(app, "127.0.0.1", 0, grace_s=0.1, on_stop=api.close, tls=tls)
            await http.start()
            try:
                url = f"https://{http.address}"
                trusted = ssl.create_default_context(cafile=str(certs / "ca.crt"))
                async with httpx2.AsyncClient(base_url=url, verify=trusted) as client:
                    assert (await client.get("/health")).status_code == 200
                    assert (await client.get("/v1/models")).status_code == 401
                    ok = {"Authorization": f"Bearer {TOKEN_A}"}
                    r = await client.post("/v1/completions", json=completion(), headers=ok)
                    assert r.json()["choices"][0]["text"] == "<7><8><9><10>"
                async with httpx2.AsyncClient(base_url=f"http://{http.address}") as plain:
                    r = await plain.get("/health")  # before session 48: closed, no reply
                    assert (r.status_code, r.content) == (400, REFUSAL_BODY)
                    r = await plain.post("/v1/completions", json=completion(), headers=ok)
                    assert r.status_code == 400  # the token was not read, nor served
                async with httpx2.AsyncClient(base_url=url) as stranger:  # the system's CAs
                    with pytest.raises(httpx2.ConnectError):
                        await stranger.get("/health")
            finally:
                await http.stop()

    asyncio.run(main())


def test_http_tls_needs_the_certificates(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--http-tls"])
    assert info.value.code == 2
    assert (
        "--http-tls serves the router's certificate: it needs --tls-dir" in capsys.readouterr().err
    )
