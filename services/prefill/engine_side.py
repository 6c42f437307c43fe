"""What the prefill worker runs on its engine thread (services/engine/loop.py): adding a job to
the engine (with its store prefix, if any), the layer hook that hands each finished layer's KV
to the job's sender while later layers compute, and, after each step, dropping every request
after its first token. Reads the worker's job table (a dict the event loop changes: single
reads only).

While this worker is a layer migration's donor, the layers ``[k, L)`` of each step run on the
helper and the hook sees only ``[0, k)``. After the step that completes a prompt, ``after_step``
asks for the rest (``Engine.export_kv_async``: the helper's copy, read through the stage port)
before dropping the request; the job's coroutine hands them to the sender once they arrive
(core.py), and the helper frees its copy only after those reads (``StagePort.release``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from services.common.errors import BanaServeError, RequestNotFoundError
from services.common.types import RequestOutput
from services.engine.engine import Engine, StepContext
from services.engine.loop import EngineLoop
from services.prefill.jobs import Job, JobStatus
from services.prefill.store_prefix import StorePrefixes

log = logging.getLogger(__name__)

Spawn = Callable[[Job, Callable[[], Coroutine[Any, Any, None]]], None]


class EngineSide:
    def __init__(self, jobs: dict[str, Job], store: StorePrefixes | None, spawn: Spawn) -> None:
        self._jobs = jobs
        self._store = store
        self._spawn = spawn  # starts a coroutine on the job's event loop
        self.loop: EngineLoop | None = None  # set once the loop exists (it takes the hook)
        self.num_store_hit_tokens = 0

    def add(self, job: Job, engine: Engine) -> None:
        """A command: ``job`` joins the engine's batch, with its store prefix if there is room."""
        request, prefix, store = job.request, job.prefix, self._store
        job.prefix = None  # the fetch (or a release) owns it from here
        if prefix is not None and store is not None:
            block_size = engine.config.block_size
            try:
                fetch = engine.add_request_with_prefix(
                    job.engine_id,
                    request.prompt_token_ids,
                    request.params,
                    prefix.num_blocks * block_size,
                )
            except BanaServeError as exc:  # no room for the prefix now: compute it instead
                self._spawn(job, lambda: store.release(prefix))
                log.info("request %s: store prefix not used: %s", job.request_id, exc)
            else:
                self.num_store_hit_tokens += (prefix.num_blocks - prefix.first_block) * block_size
                # The write-back skips the blocks the store is known to hold: all of the prefix
                # when it was asked from the first block, else none (the own cache's blocks
                # may be missing there; the node's Reserve skips what it has).
                job.num_store_blocks = prefix.num_blocks if prefix.first_block == 0 else 0
                if job.prefetched is None:
                    self._spawn(job, lambda: store.fetch(fetch, prefix))
                else:
                    store.write_prefetched(fetch, prefix, job.prefetched)
                    self._spawn(job, lambda: store.release(prefix))
                _computing(job)
                return
        engine.add_request(job.engine_id, request.prompt_token_ids, request.params)
        _computing(job)

    def on_layer(self, layer: int, ctx: StepContext) -> None:
        """The layer hook: hand the layer's KV of every prompt that completes in this step to
        its sender."""
        assert self.loop is not None
        engine = self.loop.engine
        if layer == 0:
            for engine_id in ctx.num_tokens:
                job = self._jobs.get(engine_id)
                if job is not None and job.scheduled_at is None:
                    job.scheduled_at = self.loop.step_started_at
        for engine_id in ctx.sampling:
            job = self._jobs.get(engine_id)
            if job is not None and job.sender is not None and job.status is JobStatus.COMPUTING:
                if layer < job.num_layers_sent:
                    continue  # sent by an earlier try of this step (same KV)
                data, layout = engine.export_kv(engine_id, layer, job.first_token)
                job.sender.send_layer(data, layout)
                job.num_layers_sent += 1

    def after_step(self, engine: Engine, outputs: list[RequestOutput]) -> None:
        """After each step: ask for the layers the hook did not see (they ran on a helper) of
        every prompt that got its first token, then drop those requests."""
        num_layers = engine.spec.num_layers
        for output in outputs:
            job = self._jobs.get(output.request_id)
            if output.finished or job is None or job.sender is None:
                continue
            if job.status is JobStatus.COMPUTING and job.num_layers_sent < num_layers:
                job.remote_layers = [
                    engine.export_kv_async(output.request_id, layer, job.first_token)
                    for layer in range(job.num_layers_sent, num_layers)
                ]
                job.num_layers_sent = num_layers
        drop_unfinished(engine, outputs)


def _computing(job: Job) -> None:
    if job.status is JobStatus.QUEUED:  # not ended meanwhile
        job.status = JobStatus.COMPUTING


def drop_unfinished(engine: Engine, outputs: list[RequestOutput]) -> None:
    """After each step: a prompt leaves the engine with its first token (the decode worker
    continues it); its full blocks stay in the prefix cache."""
    for output in outputs:
        if not output.finished:
            with contextlib.suppress(RequestNotFoundError):
                engine.abort(output.request_id)


def dropper(engine_id: str) -> Callable[[Engine], None]:
    def drop(engine: Engine) -> None:
        with contextlib.suppress(RequestNotFoundError):
            engine.abort(engine_id)  # frees its blocks; full ones stay cached

    return drop
