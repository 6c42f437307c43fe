"""The OpenAI HTTP API behind the client API's bearer token: 401 in OpenAI's shape without a
valid ``Authorization: Bearer`` header, served with one; the health probes stay open."""

from __future__ import annotations

import asyncio

import httpx2

from services.router.openai_api import OpenAIApi
from services.router.openai_server import HttpServer
from services.rpc.security import require_bearer
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
