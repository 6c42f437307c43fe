"""One try at a request on one worker pair: steps 2-4 of the driver's lifecycle
(services/router/driver.py) — reserve on D, prefill on P into that reservation (or prefill on a
colocated D), relay the tokens; whatever it reserved is released however it ends. A resumed try
(its request's worker was lost after the first token) reserves on D alone with the tokens the
caller has, and relays what D generates after them."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from services.common.errors import ErrorCode
from services.router.core import Assignment
from services.router.driver_types import (
    DecodeResult,
    Delta,
    Finished,
    GenerateInput,
    KVTarget,
    PrefillResult,
    ReleaseReason,
    Reservation,
    Started,
    Timings,
    WorkerCallError,
)

if TYPE_CHECKING:
    from services.router.driver import RequestDriver, _Job

log = logging.getLogger(__name__)


class FullOnReserve(Exception):
    def __init__(self, worker_id: str) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id


class WorkerLoss(Exception):
    """A try ended because of its worker: gone (``gone``), or the engine step computing the
    request failed there (INTERNAL: the worker freed it and serves on; e.g. a layer
    migration's helper lost with the layers)."""

    def __init__(self, worker_id: str, error: WorkerCallError, gone: bool = True) -> None:
        super().__init__(worker_id)
        self.worker_id = worker_id
        self.error = error
        self.gone = gone


class LostBeforeFirstToken(WorkerLoss):
    """Before the caller had a token of this try: the driver routes the request again."""


class LostAfterFirstToken(WorkerLoss):
    """After the caller had tokens: the driver may resume the request from them."""


class Attempt:
    """One try at a request on one worker pair (steps 2-4 of the lifecycle above)."""

    def __init__(
        self,
        driver: RequestDriver,
        job: _Job,
        request: GenerateInput,
        assignment: Assignment,
        arrival: float,
    ) -> None:
        self._driver, self._job, self._request = driver, job, request
        self._assignment, self._arrival = assignment, arrival
        self._decode = driver.clients().decode(assignment.decode)
        self._prefill = driver.clients().prefill(assignment.prefill)
        self._local = False  # D prefills the prompt (conditional disaggregation)

    async def run(self) -> Finished:
        try:
            lease = min(self._driver.config.lease_s, self._driver.remaining(self._job))
            # A colocated pair prefills on its worker (a mixed worker; a resumed request's
            # decode worker); a decode worker given both because no prefill worker was healthy
            # (Assignment.prefill_on_decode) prefills as under the router's queue rule.
            a = self._assignment
            colocated = a.colocated and not a.prefill_on_decode
            reservation = await self._decode.reserve(
                self._request,
                lease,
                self._driver.remaining(self._job),
                prefill_locally=colocated,
                local_prefill_max_tokens=0 if colocated else self._local_prefill_max_tokens(),
            )
        except asyncio.CancelledError:
            # Cancelled while D was reserving: the call may have reserved already, and
            # cancelling it does not undo that (the lease would hold the blocks for 30 s).
            await self._release(self._job.release_reason)
            raise
        except WorkerCallError as exc:
            if exc.lost:
                raise LostBeforeFirstToken(self._assignment.decode.worker_id, exc) from None
            if exc.code is ErrorCode.RESOURCE_EXHAUSTED:
                raise FullOnReserve(self._assignment.decode.worker_id) from None
            raise
        self._local = reservation.prefilling_locally and not self._assignment.colocated
        if self._local:  # P never sees it: D's report counts the prompt (D admitted it)
            self._driver.router.settle(self._request.request_id, self._assignment.prefill.worker_id)
        try:
            if self._assignment.colocated or self._local:
                return await self._colocated()
            return await self._prefill_then_decode(reservation)
        except asyncio.CancelledError:
            await self._release(self._job.release_reason)
            raise
        except WorkerLoss:
            raise  # released already: to find out who was lost, or before giving D up
        except BaseException:
            # A call that failed at the request's deadline did not lose its peer.
            late = self._driver.now() >= self._job.deadline
            await self._release(
                ReleaseReason.DEADLINE_EXCEEDED if late else ReleaseReason.PEER_LOST
            )
            raise

    async def _prefill_then_decode(self, reservation: Reservation) -> Finished:
        decode = self._assignment.decode
        target = KVTarget(
            decode.worker_id,
            decode.address,
            reservation.reservation_id,
            reservation.data_address,
            reservation.data_transport,
            reservation.num_cached_blocks,
        )
        self._mark_routed()
        renewing = asyncio.create_task(self._renew_lease(reservation))
        try:
            result = self._job.prefill = await self._run_prefill(target)
        finally:
            renewing.cancel()
        if result.finish_reason is not None:
            await self._release(ReleaseReason.FINISHED_ON_PREFILL)
            return self._finished(DecodeResult(result.finish_reason, 1))
        outcome: DecodeResult | None = None
        stream = self._decode.stream_tokens(self._request.request_id, self._remaining())
        try:
            async for frame in stream:
                if isinstance(frame, Delta):
                    self._emit(frame)
                else:
                    outcome = frame
        except WorkerCallError as exc:
            if exc.worker_failed:
                await self._release(ReleaseReason.PEER_LOST)
                raise LostAfterFirstToken(decode.worker_id, exc, exc.lost) from None
            raise
        if outcome is None:
            raise self._protocol_error(decode.worker_id, "StreamTokens ended without finished")
        return self._finished(outcome)

    async def _colocated(self) -> Finished:
        """P is D: D prefills in its own batch; its stream's first delta is the first token
        (of a resumed try: the first after those the caller has)."""
        self._mark_routed()
        outcome: DecodeResult | None = None
        first = not self._job.started
        try:
            async for frame in self._decode.stream_tokens(
                self._request.request_id, self._remaining()
            ):
                if isinstance(frame, Delta) and first:
                    first = False
                    self._emit_first(frame)
                elif isinstance(frame, Delta):
                    self._emit(frame)
                else:
                    outcome = frame
        except WorkerCallError as exc:
            if not exc.worker_failed:
                raise
            if not (exc.lost and first):  # (a worker gone before any token holds nothing)
                await self._release(ReleaseReason.PEER_LOST)
            loss = LostBeforeFirstToken if first else LostAfterFirstToken
            raise loss(self._assignment.decode.worker_id, exc, exc.lost) from None
        if outcome is None:
            raise self._protocol_error(self._assignment.decode.worker_id, "no finished frame")
        return self._finished(outcome)

    async def _renew_lease(self, reservation: Reservation) -> None:
        """Renews D's lease on the reservation every third of it while P has the prompt (queued
        behind others, computing, sending its KV), so a prompt may take longer than a lease; a
        lost router stops renewing, and D frees the blocks within one lease. Ends when D says
        the sequence runs, when the reservation is gone (the prefill call fails then, and says
        why) or when D does not know the call (an older worker: the lease alone, as before).
        A try that fails on the way (UNAVAILABLE, its timeout) leaves the next one a third of a
        lease."""
        config, request_id = self._driver.config, self._request.request_id
        lease = reservation.lease_s or config.lease_s
        while True:
            await asyncio.sleep(lease / 3)
            ask = min(config.lease_s, self._driver.remaining(self._job))
            if ask <= 0:
                return  # the request's deadline ends it on both workers
            try:
                granted = await self._decode.renew(
                    request_id, reservation.reservation_id, ask, lease / 3
                )
            except WorkerCallError as exc:
                if exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED):
                    continue
                log.info("request %s: lease not renewed: %s", request_id, exc)
                return
            if granted <= 0:
                return
            lease = granted

    async def _run_prefill(self, target: KVTarget) -> PrefillResult:
        first, result, bad = False, None, False
        try:
            stream = self._prefill.prefill(self._request, target, self._remaining())
            async for frame in stream:
                if isinstance(frame, Delta) and not first:
                    first = True
                    self._emit_first(frame)
                elif isinstance(frame, PrefillResult) and first:
                    result = frame
                else:
                    bad = True
                    break
        except WorkerCallError as exc:
            raise await self._prefill_failed(exc, first) from None
        if bad or result is None:
            what = "bad frame" if bad else "no done frame"
            raise self._protocol_error(self._assignment.prefill.worker_id, what)
        return result

    async def _prefill_failed(self, exc: WorkerCallError, first: bool) -> BaseException:
        """A failed Prefill: P gone (or D, which P could not reach), or P's step failed
        (INTERNAL: P freed the request and serves on) is a loss, which the driver routes again
        or resumes from; anything else fails the request as it came."""
        loss = LostAfterFirstToken if first else LostBeforeFirstToken
        if exc.lost:
            return loss(await self._who_is_lost(), exc)
        if exc.worker_failed:  # its step
            await self._release(ReleaseReason.PEER_LOST)
            return loss(self._assignment.prefill.worker_id, exc, gone=False)
        return exc

    def _local_prefill_max_tokens(self) -> int:
        a = self._assignment
        limit = self._driver.config.local_prefill_limit
        local = limit(a.prefill.num_queued_tokens, a.decode.num_queued_tokens)
        # D prefills the whole prompt when no prefill worker was healthy, or when the prefill
        # worker's context cannot take it past its first token (a smaller pool: --prefill-args
        # "--num-kv-blocks N") but D's can: P would refuse it OUT_OF_RANGE or end it LENGTH
        # at its own context (probe, session 42).
        num_prompt = len(self._request.prompt_token_ids)
        p_context, d_context = a.prefill.capacity.max_model_len, a.decode.capacity.max_model_len
        past_p = (
            p_context and num_prompt + 1 >= p_context and (not d_context or d_context > p_context)
        )
        return max(local, num_prompt) if a.prefill_on_decode or past_p else local

    def _emit_first(self, delta: Delta) -> None:
        a = self._assignment
        started = Started(
            self._request.request_id,
            len(self._request.prompt_token_ids),
            a.decode.worker_id if self._local else a.prefill.worker_id,
            a.decode.worker_id,
        )
        self._job.events.put_nowait(started)
        self._job.started = True
        self._emit(delta)
        self._job.ttft_s = self._driver.now() - self._arrival

    def _emit(self, delta: Delta) -> None:
        """Hands a delta to the caller; its tokens are what a resumed try goes on from."""
        self._job.output_token_ids.extend(delta.token_ids)
        self._job.events.put_nowait(delta)

    def _mark_routed(self) -> None:
        if not self._job.started:  # a resumed try keeps the request's first routing time
            self._job.routing_s = self._driver.now() - self._arrival

    async def _who_is_lost(self) -> str:
        """P answered UNAVAILABLE: P is gone, or P could not reach D. Releasing the reservation
        (needed anyway) tells which: it fails too only if D is gone."""
        released = await self._release(ReleaseReason.PEER_LOST)
        return self._assignment.prefill.worker_id if released else self._assignment.decode.worker_id

    async def _release(self, reason: ReleaseReason) -> bool:
        """Best effort and bounded; False: D could not be reached."""
        timeout = self._driver.config.release_timeout_s
        try:
            await asyncio.wait_for(
                self._decode.release(self._request.request_id, reason, timeout), timeout
            )
        except (WorkerCallError, TimeoutError):
            return False
        return True

    def _remaining(self) -> float:
        return self._driver.remaining(self._job)

    def _protocol_error(self, worker_id: str, what: str) -> WorkerCallError:
        return WorkerCallError(
            worker_id, "stream", ErrorCode.INTERNAL, f"protocol violation: {what}"
        )

    def _finished(self, decode: DecodeResult) -> Finished:
        return request_finished(
            self._job,
            len(self._request.prompt_token_ids),
            decode,
            self._driver.now() - self._arrival,
            self._assignment.decode.worker_id,
        )


# What a colocated attempt knows of its prefill: it ran inside D's batch, not timed apart.
_LOCAL_PREFILL = PrefillResult(None, 0, 0, 0.0, 0.0, 0.0, 0)


def request_finished(
    job: _Job,
    num_prompt_tokens: int,
    decode: DecodeResult,
    total_s: float,
    decode_worker_id: str = "",
) -> Finished:
    """How a request ended: ``decode``'s outcome, and its prefill as the prefill worker that
    ran it measured it (``job.prefill``, kept across a resume), or none (D prefilled it)."""
    prefill = job.prefill or _LOCAL_PREFILL
    # The prefill worker's cached count, 0 included; else D's, which a resumed try's local
    # prefill may have found for the resumed tokens too: at most the prompt.
    cached = prefill.num_cached_tokens if job.prefill else decode.num_cached_tokens
    timings = Timings(
        routing_s=job.routing_s,
        ttft_s=job.ttft_s,
        total_s=total_s,
        prefill_s=prefill.prefill_s,
        kv_transfer_s=prefill.kv_transfer_s,
        kv_transfer_exposed_s=prefill.kv_transfer_exposed_s,
        kv_bytes=prefill.kv_bytes,
    )
    return Finished(
        decode.finish_reason,
        num_prompt_tokens,
        decode.num_completion_tokens,
        min(cached, num_prompt_tokens),
        timings,
        decode_worker_id,
    )
