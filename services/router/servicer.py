"""RouterService: protos ↔ the router core (``core.Router``, ``driver.RequestDriver``), nothing else.

Every client-controlled size is checked before any work, with the shared bounds of
services/common/limits.py: ids, model name and stop conditions (INVALID_ARGUMENT), the prompt
(OUT_OF_RANGE; text is tokenized off the event loop, services/router/prompts.py). So bad input
fails before the first frame, and no request can stall the calls, streams and load reports that
share this event loop.

Statuses the core's exceptions do not get from the shared table (services/rpc/status.py) are
chosen here: a lost worker or no worker of a needed role → UNAVAILABLE, a duplicate request id
or worker id → ALREADY_EXISTS, a worker's own failure → the worker's status, passed on. A
client's resend of a request it still runs here (GenerateRequest.resume) takes it over
(``RequestDriver.take_over``): the old call fails ABORTED.

ReportLoad lifecycle per call: first frame ``worker`` → ``Router.register``; each ``load`` frame →
``Router.report`` (a worker removed meanwhile, e.g. after missing reports, is registered again:
its call is still alive, so it has recovered); half-close, a broken call or a bad frame →
``Router.remove``. Only the call that registered a worker id removes it.

One call per worker id and per address: a second is refused (ALREADY_EXISTS) while the first is
open — unless it is the same worker (the same id *and* address) and the first has been silent
for longer than the report timeout. Then the new call replaces it (the old one ends ABORTED): a
worker whose connection died without closing reconnects on a new one within its own keepalive
(seconds), while this server's keepalive finds the old one dead only after 10 s + 5 s, and
meanwhile refused the worker it had already dropped from routing (session 28: "strand workers →
router" recovered in 15 s instead of 4). Another id at the address, or the id at another
address, never replaces a call: a misconfigured worker (``--advertise`` or ``--worker-id`` of
another) would otherwise take a paused worker's place for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass

import grpc

from services.common.errors import InvalidRequestError, ModelNotFoundError, RequestNotFoundError
from services.common.limits import check_address, check_id, check_name, check_stop, required_id
from services.router import core
from services.router import driver as drv
from services.router.prompts import Encoder, PromptEncoder
from services.router.registry import (
    WorkerCapacity,
    WorkerInfo,
    WorkerRole,
    WorkerStatus,
)
from services.rpc.convert import FINISH_TO_PROTO, duration, sampling_from_proto
from services.rpc.deadlines import time_left
from services.rpc.gen.banaserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.rpc.load_reports import load_from_proto, load_to_proto
from services.rpc.security import caller_identity
from services.rpc.server import Service
from services.rpc.status import ROUTER_UNAVAILABLE, clip_message, grpc_code

log = logging.getLogger(__name__)

ROLE_FROM_PROTO = {
    common_pb2.WORKER_ROLE_PREFILL: WorkerRole.PREFILL,
    common_pb2.WORKER_ROLE_DECODE: WorkerRole.DECODE,
    common_pb2.WORKER_ROLE_MIXED: WorkerRole.MIXED,
}


@dataclass
class _ReportCall:
    """A worker's ReportLoad call: what it registered, the task serving it, its last frame."""

    info: router_pb2.WorkerInfo
    task: asyncio.Task | None
    heard_at: float  # time.monotonic() of its last frame
    replaced: bool = False  # by a new call of the worker (its task is cancelled)


def _event_to_proto(event: drv.Event) -> router_pb2.GenerateResponse:
    if isinstance(event, drv.Started):
        return router_pb2.GenerateResponse(
            started=router_pb2.GenerateStarted(
                request_id=event.request_id,
                num_prompt_tokens=event.num_prompt_tokens,
                prefill_worker_id=event.prefill_worker_id,
                decode_worker_id=event.decode_worker_id,
            )
        )
    if isinstance(event, drv.Delta):
        delta = common_pb2.TokenDelta(token_ids=event.token_ids, text=event.text)
        return router_pb2.GenerateResponse(delta=delta)
    t = event.timings
    return router_pb2.GenerateResponse(
        finished=router_pb2.GenerateFinished(
            finish_reason=FINISH_TO_PROTO[event.finish_reason],
            decode_worker_id=event.decode_worker_id,
            usage=router_pb2.Usage(
                num_prompt_tokens=event.num_prompt_tokens,
                num_completion_tokens=event.num_completion_tokens,
                num_cached_tokens=event.num_cached_tokens,
            ),
            timings=router_pb2.Timings(
                routing=duration(t.routing_s),
                ttft=duration(t.ttft_s),
                total=duration(t.total_s),
                prefill=duration(t.prefill_s),
                kv_transfer=duration(t.kv_transfer_s),
                kv_transfer_exposed=duration(t.kv_transfer_exposed_s),
                kv_bytes=t.kv_bytes,
            ),
        )
    )


def _time_left(context: grpc.aio.ServicerContext) -> float | None:
    """What is left of the call's deadline; None: it has none. grpc-aio answers 0 for a
    deadline already past, which the driver would take for "no deadline" (and its default of
    minutes): such a request is refused here, before it reserves anything."""
    left = time_left(context)  # at most a day (services/rpc/deadlines.py)
    if left is not None and left <= 0:
        raise TimeoutError("the request's deadline passed before it was routed")
    return left


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        driver: drv.RequestDriver,
        model: str = "",
        encode: Encoder | None = None,
        prompts: PromptEncoder | None = None,
    ) -> None:
        """``prompts`` checks and encodes prompts; without it, one with default limits over
        ``encode`` (None: token ids only)."""
        self._driver = driver
        self._router = driver.router
        self._model = model  # "": the model of the first worker to register
        self._prompts = prompts or PromptEncoder(encode)
        self._connected: dict[str, _ReportCall] = {}
        self._generate_calls = 0  # open Generate calls (until grpc has sent their status)

    async def Generate(self, request, context):
        self._generate_calls += 1
        context.add_done_callback(self._generate_call_done)
        try:
            generate_input = await self._generate_input(request, caller_identity(context))
        except Exception as exc:  # a bad request: counted as refused (RequestMetrics)
            self._driver.refused(exc)
            raise
        request_id = generate_input.request_id
        if generate_input.resend:
            self._driver.take_over(request_id, generate_input.owner)
        try:
            await self._driver.wait_for_id(request_id, _time_left(context))
            # No await from this check to the job's creation: the callback is this call's.
            self._driver.check_new(request_id)
            events = self._driver.generate(generate_input, _time_left(context))
            context.add_done_callback(
                lambda _: context.cancelled() and self._driver.cancel(request_id, events)
            )
            async with contextlib.aclosing(events):
                async for event in events:
                    yield _event_to_proto(event)
        except (drv.WorkerLostError, core.NoWorkerError) as exc:
            context.set_trailing_metadata((ROUTER_UNAVAILABLE,))  # not a router gone
            await context.abort(grpc.StatusCode.UNAVAILABLE, clip_message(str(exc)))
        except drv.DuplicateRequestError as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, clip_message(str(exc)))
        except drv.WorkerCallError as exc:
            await context.abort(grpc_code(exc.code), clip_message(str(exc)))

    async def _generate_input(
        self, request: router_pb2.GenerateRequest, owner: str
    ) -> drv.GenerateInput:
        check_id(request.request_id, "request_id")
        check_name(request.model, "model")
        if request.model and self._model and request.model != self._model:
            raise ModelNotFoundError(
                f"model {request.model!r} is not served; this router serves {self._model!r}"
            )
        check_stop(request.sampling.stop, request.sampling.stop_token_ids)
        sampling = sampling_from_proto(request.sampling)
        tokens = await self._prompt(request)
        resume = tuple(request.resume_output_token_ids)
        if resume:
            context = self._context()
            self._prompts.check_resume(len(tokens), resume, sampling.max_tokens, context)
            await self._prompts.check_resume_stops(tokens, resume, sampling, context)
        request_id = request.request_id or drv.new_request_id()
        resend = request.resume or bool(resume)
        return drv.GenerateInput(request_id, tokens, sampling, owner, resume, resend)

    def _context(self) -> int | None:
        # The largest context of a worker connected now: a longer prompt fits none of them.
        return max((c.info.max_model_len for c in self._connected.values()), default=0) or None

    async def _prompt(self, request: router_pb2.GenerateRequest) -> tuple[int, ...]:
        context = self._context()
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            if request.chat:  # the template renders text (router.proto): nothing to apply it to
                raise InvalidRequestError("chat applies the chat template to text; send text")
            ids = tuple(request.token_ids.ids)
            self._prompts.check_token_ids(ids, context)
            return ids
        if kind == "text" and request.text:
            return await self._prompts.encode(request.text, request.chat, context)
        raise InvalidRequestError("prompt is empty: set text or token_ids")

    async def Abort(self, request, context):
        required_id(request.request_id, "request_id")
        self._driver.abort(request.request_id, caller_identity(context))
        return router_pb2.AbortResponse()

    async def ListWorkers(self, request, context):
        workers = [self._worker_to_proto(w) for w in self._router.workers()]
        return router_pb2.ListWorkersResponse(workers=[w for w in workers if w is not None])

    def _worker_to_proto(self, worker: WorkerInfo) -> router_pb2.Worker | None:
        call = self._connected.get(worker.worker_id)
        if call is None:  # its call has ended: it is gone, not stale
            return None
        info = call.info
        state = (
            router_pb2.WORKER_STATE_ACTIVE
            if worker.status is WorkerStatus.HEALTHY
            else router_pb2.WORKER_STATE_STALE
        )
        message = router_pb2.Worker(
            info=info,
            state=state,
            since_last_load=duration(worker.seconds_since_seen),
            num_waiting_for_room=self._router.waiting_for_room(worker.worker_id),
        )
        if worker.last_report is not None:
            message.last_load.CopyFrom(load_to_proto(worker.last_report))
        return message

    def _generate_call_done(self, _context: object) -> None:
        self._generate_calls -= 1

    async def generate_calls_done(self, timeout_s: float, poll_s: float = 0.01) -> bool:
        """Waits, at most ``timeout_s``, until no Generate call is open (each has sent its
        last message); whether none is."""
        deadline = time.monotonic() + timeout_s
        while self._generate_calls and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return not self._generate_calls

    async def ReportLoad(self, request_iterator, context):
        frames = aiter(request_iterator)
        call = await self._register(await anext(frames, None), context)
        worker = call.info
        reason = "report stream broke"
        try:
            for sequence in itertools.count(1):
                try:
                    frame = await anext(frames, None)
                except asyncio.CancelledError:
                    if not call.replaced:
                        raise
                    await context.abort(
                        grpc.StatusCode.ABORTED,
                        f"worker {worker.worker_id!r}: this ReportLoad call sent nothing for "
                        "longer than the report timeout and was replaced by the worker's new call",
                    )
                if frame is None:
                    # grpc.aio ends the request stream the same way for a half-close and for a
                    # cancelled (broken) call, and marks the context cancelled a moment later:
                    # wait that moment, so the log says which it was. Removal is the same.
                    await asyncio.sleep(0.05)
                    if not context.cancelled():
                        reason = "deregistered (report stream closed)"
                    break
                call.heard_at = time.monotonic()
                self._report(worker, frame, sequence)
        finally:
            if self._connected.get(worker.worker_id) is call:  # not replaced by a new call
                del self._connected[worker.worker_id]
                with contextlib.suppress(RequestNotFoundError):
                    self._router.remove(worker.worker_id, reason)
        return router_pb2.ReportLoadResponse()

    async def _register(self, frame, context) -> router_pb2.WorkerInfo:
        if frame is None or not frame.HasField("worker"):
            raise InvalidRequestError("the first ReportLoad frame must be `worker`")
        info = frame.worker
        check_id(info.worker_id, "worker_id")
        check_address(info.address, "address")
        for field in ("model", "fingerprint"):
            check_name(getattr(info, field), field)
        self._replace_silent(info)
        if info.worker_id in self._connected:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"worker {info.worker_id!r} is already connected on another ReportLoad call",
            )
        holder = next(
            (c.info for c in self._connected.values() if c.info.address == info.address), None
        )
        if holder is not None:  # the router would send one worker's calls to the other
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"address {info.address!r} is registered by worker {holder.worker_id!r}, "
                f"connected: worker {info.worker_id!r} needs its own (--advertise)",
            )
        if self._model and info.model != self._model:
            raise InvalidRequestError(
                f"worker {info.worker_id!r} serves model {info.model!r}; "
                f"this router serves {self._model!r}"
            )
        self._register_info(info)
        self._model = self._model or info.model
        call = _ReportCall(info, asyncio.current_task(), time.monotonic())
        self._connected[info.worker_id] = call
        return call

    def _replace_silent(self, info: router_pb2.WorkerInfo) -> None:
        """Ends the call of ``info``'s worker — its id at its address — if it has sent nothing
        for longer than the report timeout (module docstring): the router has dropped it."""
        call = self._connected.get(info.worker_id)
        if call is None or call.info.address != info.address:
            return
        silent = time.monotonic() - call.heard_at
        if silent <= self._router.config.report_timeout_s:
            return
        log.info(
            "worker %r: a new ReportLoad call replaces the one silent for %.1f s",
            info.worker_id,
            silent,
        )
        del self._connected[info.worker_id]
        with contextlib.suppress(RequestNotFoundError):
            self._router.remove(info.worker_id, "its report stream was replaced")
        call.replaced = True
        if call.task is not None:
            call.task.cancel()  # wakes its read: it ends the call ABORTED

    def _register_info(self, info: router_pb2.WorkerInfo) -> None:
        role = ROLE_FROM_PROTO.get(info.role)
        if role is None:
            raise InvalidRequestError(f"worker {info.worker_id!r} has no role")
        capacity = WorkerCapacity(
            info.num_kv_blocks,
            info.block_size,
            info.fingerprint,
            info.max_model_len,
            hosts_only=info.hosts_only,
            max_num_seqs=info.max_num_seqs,
        )
        self._router.register(info.worker_id, info.address, role, capacity)
        self._driver.clients().refresh(info.address)

    def _report(self, info: router_pb2.WorkerInfo, frame, sequence: int) -> None:
        if not frame.HasField("load"):
            raise InvalidRequestError("every ReportLoad frame after the first must be `load`")
        load = load_from_proto(frame.load)
        # Frames of one call arrive in order: their number orders this worker's reports.
        try:
            self._router.report(info.worker_id, load, sequence)
        except RequestNotFoundError:  # removed (missed reports, a failed call) but still here
            self._register_info(info)
            self._router.report(info.worker_id, load, sequence)


def router_service(servicer: router_pb2_grpc.RouterServiceServicer) -> Service:
    """``servicer`` (a ``RouterServicer``, or a test's fake) as a service ``start_server`` takes."""
    return Service.bind(
        servicer,
        router_pb2_grpc.add_RouterServiceServicer_to_server,
        router_pb2.DESCRIPTOR.services_by_name["RouterService"],
    )
