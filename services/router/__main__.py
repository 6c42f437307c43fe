"""``python -m services.router``: config → wiring → serve.

Prints ``LISTENING HOST:PORT`` on stdout (flushed) once the server accepts calls, for launchers
to parse; before it, ``HTTP HOST:PORT SCHEME`` once the OpenAI-compatible HTTP API accepts requests
(``--http-port``; off with ``--no-http``, or without ``--model``). Logs go to stderr.
SIGTERM/SIGINT drain (``--drain-timeout``): new requests are refused at once on both APIs
(UNAVAILABLE; HTTP 503 with Retry-After, ``/ready`` 503 "draining": both listeners stay open),
the running ones get the drain's time to finish on the workers, and those still running then
fail UNAVAILABLE ("shutting down", which the client library resumes elsewhere); then the
workers' report streams end, the HTTP API stops and the channels close.
A second signal fails the requests left at once ("stopped at once (a second signal)").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from services.common.admission import AdmissionController
from services.common.arg_types import int_range, port_number, positive
from services.common.config import RpcConfig
from services.common.limits import PromptLimits
from services.common.logs import add_logging_args
from services.common.metrics import RequestMetrics, RouterCollector
from services.common.metrics_endpoint import add_metrics_args, start_metrics
from services.common.model_files import read_json_object
from services.common.network import add_host_args, resolve_host
from services.router.clients import GrpcWorkerClients
from services.router.core import POLICIES, Router, RouterConfig
from services.router.driver import DriverConfig, RequestDriver, expire_periodically
from services.router.openai_api import BODY_TIMEOUT_S, OpenAIApi, load_served_model
from services.router.openai_server import HttpServer
from services.router.prompts import (
    Encoder,
    PromptEncoder,
    ResumeCheck,
    model_vocab,
    prompt_limits,
)
from services.router.servicer import RouterServicer, router_service
from services.rpc.admission import (
    ROUTER_CAPACITY,
    AdmissionInterceptor,
    add_admission_args,
    admission_config,
    follow_capacity,
)
from services.rpc.security import Role, add_security_args, require_bearer, security_config
from services.rpc.server import add_drain_args, run_service, start_server
from services.rpc.tracing import add_tracing_args, setup_tracing, tracing_config

log = logging.getLogger("services.router")
# What a request past the drain gets to send its end (module docstring): on the HTTP API
# (uvicorn's own grace past the drain), and on gRPC (its call's status).
HTTP_FINISH_S = 2.0
CALL_FINISH_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.router", description=__doc__)
    p.add_argument("--port", type=port_number, default=0, help="0: the OS picks one")
    p.add_argument("--policy", choices=POLICIES, default="load")
    p.add_argument(
        "--model",
        default="",
        help="prepared model name or directory: its tokenizer encodes text prompts and only "
        "workers of that model may register (default: token ids only, first worker's model)",
    )
    p.add_argument(
        "--http-port",
        type=port_number,
        default=0,
        help="the OpenAI-compatible HTTP API (0: the OS picks)",
    )
    p.add_argument("--no-http", action="store_true", help="serve no HTTP API")
    p.add_argument(
        "--http-tls",
        action="store_true",
        help="serve the HTTP API over TLS with the router's certificate (needs --tls-dir; "
        "clients verify it with DIR/ca.crt)",
    )
    p.add_argument(
        "--http-body-timeout-s",
        type=positive(float),
        default=BODY_TIMEOUT_S,
        help="an HTTP request's body must arrive within this many seconds, before it holds "
        "any slot (else 408; default %(default)s)",
    )
    # Prompt limits (docs/services.md, "Limits"): default from the model's context (--model).
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-text-bytes", type=int, default=None, help="default: 32 per token")
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="gRPC receive limit of the client API (default: 2x the largest valid request, "
        "at least 4 MiB); larger messages are refused unread with RESOURCE_EXHAUSTED",
    )
    p.add_argument("--report-timeout-s", type=float, default=1.0)
    p.add_argument("--expire-interval-s", type=positive(float), default=0.25)
    p.add_argument(
        "--lease-s",
        type=float,
        default=DriverConfig.lease_s,
        help="the lease on a decode worker's reservation, renewed every third of it while the "
        "prefill worker has the prompt: how long a lost router's reservation may hold KV blocks",
    )
    p.add_argument("--default-timeout-s", type=float, default=600.0)
    p.add_argument(
        "--no-worker-wait-s",
        type=float,
        default=DriverConfig.no_worker_wait_s,
        help="how long a request waits for a worker that can serve it to (re-)register before "
        "failing UNAVAILABLE (capped by its deadline; 0: at once)",
    )
    p.add_argument(
        "--id-reuse-wait-s",
        type=float,
        default=DriverConfig.id_reuse_wait_s,
        help="how long a request whose id a running request holds waits for that one to end "
        "(a client reusing the id of a call it gave up on) before ALREADY_EXISTS (0: at once)",
    )
    p.add_argument(
        "--max-resumes",
        type=int_range(0, 1000),
        default=DriverConfig.max_resumes,
        metavar="N",
        help="a request whose worker is lost after its first token goes on on another worker "
        "from the tokens it has, at most N times (0: it fails UNAVAILABLE; docs/services.md)",
    )
    p.add_argument(
        "--retry-window-s",
        type=float,
        default=DriverConfig.retry_window_s,
        metavar="S",
        help="a request whose worker is lost before it produced a token (a cut link, a "
        "restarting worker) is tried again, with a growing wait, for at most S seconds of "
        "such losses in a row (0: one retry; docs/services.md)",
    )
    p.add_argument(
        "--local-prefill-max-tokens",
        type=int,
        default=DriverConfig.local_prefill_max_tokens,
        metavar="N",
        help="conditional disaggregation: a decode worker prefills a prompt itself when its "
        "prefix cache holds all but at most N tokens (0: never; docs/services.md)",
    )
    p.add_argument(
        "--local-prefill-queue-tokens",
        type=int,
        default=DriverConfig.local_prefill_queue_tokens,
        metavar="Q",
        help="... and any prompt while the prefill worker has at least Q prompt tokens queued "
        "and the decode worker fewer (0: never; docs/services.md)",
    )
    add_tracing_args(p)
    add_logging_args(p)
    add_security_args(p)
    add_admission_args(p)
    add_host_args(p)
    add_drain_args(p)
    add_metrics_args(p)
    args = p.parse_args(argv)
    if args.http_tls and not args.tls_dir:
        p.error("--http-tls serves the router's certificate: it needs --tls-dir")
    return args


def load_tokenizer(model_dir: Path) -> tuple[Encoder, ResumeCheck]:
    """The served model's tokenizer: prompts to ids, and a resend's tokens checked as a worker
    would resume them (services/engine/outputs.py ``check_resumable``)."""
    from services.engine.outputs import check_resumable
    from services.engine.tokenizer import Tokenizer, config_eos_token_ids, end_of_sequence_ids

    tokenizer = Tokenizer(model_dir)
    config = read_json_object(model_dir / "config.json")
    eos = end_of_sequence_ids(config_eos_token_ids(config.get("eos_token_id")), tokenizer)

    def encode(text: str, chat: bool) -> list[int]:
        return tokenizer.encode_chat(text) if chat else tokenizer.encode(text)

    def check(prompt, outputs, params, max_model_len: int) -> None:
        check_resumable(tokenizer, eos, prompt, outputs, params, max_model_len)

    return encode, check


def load_prompts(args: argparse.Namespace) -> PromptEncoder:
    model_dir = None
    if args.model:
        from services.engine.models.prepare import resolve_model

        model_dir = resolve_model(args.model)
    limits = prompt_limits(model_dir, args.max_prompt_tokens, args.max_text_bytes)
    if model_dir is None:
        return PromptEncoder(None, limits)
    encode, resumable = load_tokenizer(model_dir)
    return PromptEncoder(encode, limits, vocab_size=model_vocab(model_dir), resumable=resumable)


async def start_http(
    args: argparse.Namespace,
    driver: RequestDriver,
    rpc: RpcConfig,
    limits: PromptLimits,
    admission: AdmissionController | None = None,
) -> HttpServer | None:
    if args.no_http:
        return None
    if not args.model:
        log.warning("no OpenAI HTTP API: it needs --model (the name it serves, its tokenizer)")
        return None
    api = OpenAIApi(driver, load_served_model(args.model), limits, admission=admission,
                    body_timeout_s=args.http_body_timeout_s)  # fmt: skip
    tokens = rpc.security.api_tokens if rpc.security is not None else ()
    app = require_bearer(api.app, tokens) if tokens else api.app
    # The HTTP API's own grace outlasts the drain: a request the drain fails still sends its
    # error (a stream's last event) before its connection closes.
    grace = rpc.grace_s + HTTP_FINISH_S
    tls = rpc.security.tls if args.http_tls and rpc.security is not None else None
    http = HttpServer(app, rpc.host, args.http_port, grace, on_stop=api.close, tls=tls)
    await http.start()
    return http


async def serve(args: argparse.Namespace) -> None:
    prompts = load_prompts(args)
    receive = args.max_request_bytes or prompts.limits.receive_bytes
    security = security_config(args, Role.ROUTER)
    rpc = RpcConfig(
        host=resolve_host(args.host),
        port=args.port,
        max_receive_message_bytes=receive,
        security=security,
        grace_s=args.drain_timeout,
    )
    tracing = setup_tracing(tracing_config(args, "router"))
    router = Router(RouterConfig(policy=args.policy, report_timeout_s=args.report_timeout_s))
    clients = GrpcWorkerClients(rpc, tracing)
    driver = RequestDriver(
        router,
        clients,
        DriverConfig(
            lease_s=args.lease_s,
            default_timeout_s=args.default_timeout_s,
            no_worker_wait_s=args.no_worker_wait_s,
            id_reuse_wait_s=args.id_reuse_wait_s,
            local_prefill_max_tokens=args.local_prefill_max_tokens,
            local_prefill_queue_tokens=args.local_prefill_queue_tokens,
            max_resumes=args.max_resumes,
            retry_window_s=args.retry_window_s,
        ),
    )
    driver.observer = requests = RequestMetrics()
    servicer = RouterServicer(driver, model=args.model, prompts=prompts)
    service = router_service(servicer)
    admission = AdmissionInterceptor(AdmissionController(admission_config(args, ROUTER_CAPACITY)))
    server = await start_server([service], rpc, tracing=tracing, interceptors=[admission])
    sweeper = asyncio.create_task(
        expire_periodically(
            router, args.expire_interval_s, lambda ids: log.warning("workers expired: %s", ids)
        )
    )
    follower = asyncio.create_task(
        follow_capacity(
            router.sequence_capacity,
            admission.controller,
            args,
            ROUTER_CAPACITY,
            args.expire_interval_s,
        )
    )
    http = await start_http(args, driver, rpc, prompts.limits, admission.controller)
    if http is not None:
        print(f"HTTP {http.address} {http.scheme}", flush=True)
    await start_metrics(
        args, rpc.host, RouterCollector(router), requests.registry, security=rpc.security
    )
    print(f"LISTENING {server.address}", flush=True)

    async def drain(grace_s: float) -> None:  # then the calls left (report streams) end at once
        # The HTTP listener stays open while the requests run: a new request gets 503 with
        # Retry-After and /ready 503 "draining" (a closed listener refused connections, and the
        # documented 503 was never seen: session 45's probe); it closes once they have ended.
        driver.begin_drain()
        if failed := await driver.drain(grace_s):
            log.warning("drain: %d requests still running after %gs failed UNAVAILABLE", failed,
                        grace_s)  # fmt: skip
        # The calls it ended send their status before the server cancels what is left (the
        # workers' report streams); an HTTP stream its last event.
        await servicer.generate_calls_done(CALL_FINISH_S)
        if http is not None:
            await http.stop(grace_s=HTTP_FINISH_S)

    def force() -> None:  # a second signal: what is left fails now, HTTP waits no more
        driver.cut_drain()
        if http is not None:
            http.force()

    try:
        await server.serve_until_signal(drain=drain, on_force=force)
    finally:
        if http is not None:
            await http.stop()
        for task in (sweeper, follower):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await clients.close()
        prompts.close()


def main(argv: list[str] | None = None) -> int:
    return run_service(parse_args, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
