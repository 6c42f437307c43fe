"""One simulated worker: the engine's real ``Scheduler`` and ``BlockManager``, modelled steps.

A step here is the engine's step (services/engine/step.py) with the model replaced by the
profile's time model:

1. **plan** — ``Scheduler.schedule()`` (the real one) picks the batch and allocates its blocks;
2. **execute** — nothing runs: the step lasts the time model's prediction for that batch
   (stretched by a layer migration this worker takes part in, ``Offload``);
3. **commit** — at the step's end, exactly as ``Stepper.commit``: every scheduled sequence
   advances by its tokens, ``commit_full_blocks`` hashes what became full, every sequence
   whose tokens are all computed samples one token; a finished one leaves the scheduler.

A prefill worker's sequence ends at its first token (``on_prefilled`` hands it off, its blocks
stay in the prefix cache); a decode worker's sequences arrive through ``reserve`` (blocks for
the prompt's KV, as ``begin_prompt_import``) and ``join`` (the KV arrived: the first token is
appended and the sequence runs, as ``finish_prompt_import``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.hashing import block_hashes
from services.common.load import Admissions, LoadMeter, LoadReport
from services.common.types import SamplingParams
from services.engine.block_manager import BlockManager
from services.engine.scheduler import ScheduledBatch, Scheduler
from services.engine.sequence import Sequence, SequenceStatus
from services.prefill.write_backs import WritePolicy, blocks_to_write
from services.router.registry import WorkerRole
from services.sim.events import EventLoop
from services.sim.profile import Profile
from services.sim.store import SimStore

LOAD_WINDOW_S = 1.0  # as the workers' (services/prefill/core.py LOAD_WINDOW_S)
FINGERPRINT = "sim"


@dataclass
class Offload:
    """This worker runs layers ``[k, L)`` on ``helper``: a share of each step moves there.

    With micro-batches inside one step (a prefill donor's, or ``pipelined=False``) the step is
    cut as the engine cuts it (``ScheduledBatch.split``: runs of whole sequences, so one long
    prompt is one part; a step with a pending prefix fetch is kept whole), and the two workers
    are a two-stage flow shop over the parts in order: the donor runs each part's ``[0, k)``
    one after the other, the helper a part's ``[k, L)`` once the donor sent it and it finished
    the part before, a hop each way. With equal parts a step of ``t`` becomes about
    ``max(local + remote / m, local / m + remote)``; with one dominant part, nearly ``t``.
    With two step streams (a decode donor's, services/engine/pipeline.py) each half is a step
    of its own, ``(t + fixed) / 2`` long (the step's fixed cost is paid by both halves), and the
    two workers work on different halves at once: every sequence gets its token after two
    halves of the slower worker's part, ``(t + fixed) * max(1 - share, share)``, plus the hops.
    The helper's core is one: while it still has its own work (``SimWorker.busy_ahead_s``)
    the two share it, so the donor's step and the helper's next one each grow by the time
    they overlap, ``min(remote, busy ahead)``; an idle helper runs the remote part at once.
    """

    helper: SimWorker
    share: float  # of the step, the moved layers'
    hop_s: float  # one activation transfer
    num_micro_batches: int = 2
    pipelined: bool = False  # two step streams (a decode donor's two micro-batches)

    def stretch(self, t: float, fixed: float = 0.0, parts: tuple[float, ...] = (1.0, 1.0)) -> float:
        """The step of ``t`` (``fixed`` of it paid once, on the donor, whatever the batch)
        with the share moved. ``parts``: the step's micro-batches in order, each its weight
        (the modelled cost of its sequences); two step streams use only how many there are."""
        remote = t * self.share
        # one core runs the helper's own steps and the hosted part: while both have work they
        # share it, each slowed by the time they overlap
        shared = min(remote, self.helper.busy_ahead_s())
        self.helper.hosted_debt_s += shared
        if self.pipelined and len(parts) > 1:
            streams = (t + fixed) * max(1 - self.share, self.share) + 2 * self.hop_s * len(parts)
            return streams + shared
        # one part (whatever the kind) is the flow shop's degenerate case: t plus two hops
        local = max(0.0, t - fixed - remote)
        total = sum(parts) or 1.0
        donor = helper = 0.0
        for w in parts:
            donor += local * w / total
            helper = max(helper, donor + self.hop_s) + remote * w / total + self.hop_s
        return fixed + max(donor, helper) + shared


@dataclass
class StepStats:
    num_steps: int = 0
    busy_s: float = 0.0
    num_preempted: int = 0
    step_times: list[float] = field(default_factory=list)


class SimWorker:
    def __init__(
        self,
        worker_id: str,
        role: WorkerRole,
        profile: Profile,
        loop: EventLoop,
        max_model_len: int,
        num_kv_blocks: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_prefill_tokens_while_decoding: int = 0,
    ) -> None:
        """``max_num_batched_tokens``: the worker's ``--max-num-batched-tokens`` (None: the
        profile's, the engine's default); ``max_prefill_tokens_while_decoding``: its
        ``--max-prefill-tokens-while-decoding`` (0: none)."""
        self.worker_id, self.role, self.profile, self.loop = worker_id, role, profile, loop
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(
            num_kv_blocks or profile.num_kv_blocks, profile.block_size, FINGERPRINT
        )
        self.scheduler = Scheduler(
            self.block_manager,
            profile.max_num_seqs,
            max_num_batched_tokens or profile.max_num_batched_tokens,
            on_preempt=self._preempted,
            max_prefill_tokens_while_decoding=max_prefill_tokens_while_decoding,
        )
        # this kind of worker's serving costs (fixed: the profile is frozen)
        self.costs = profile.serving.costs(mixed=role is WorkerRole.MIXED)
        self.meter = LoadMeter(LOAD_WINDOW_S, loop.clock)
        self.busy = False
        self.offload: Offload | None = None
        self._between_steps: list[Callable[[], None]] = []
        self._step_s = self._step_end_s = 0.0  # the step in flight: its length and end
        self.hosted_debt_s = 0.0
        self.num_hosted_layers = 0
        self.stats = StepStats()
        # Set by the cluster: (seq) -> None.
        self.on_token: Callable[[Sequence], None] = lambda seq: None
        self.on_prefilled: Callable[[Sequence], None] = lambda seq: None
        self.on_finished: Callable[[Sequence], None] = lambda seq: None
        # (batch) -> what to call when that step ends: a prefill worker's steps mark the decode
        # workers its prompts hand off to as receiving while they run (set by the cluster).
        self.on_step: Callable[[ScheduledBatch], Callable[[], None]] = lambda batch: _nothing
        # Prefill steps in flight whose prompts' KV streams to this worker: its decode steps
        # meanwhile cost ``costs.receiving_scale`` more (profile.py).
        self.receiving = 0
        self.imported: dict[str, Sequence] = {}  # reserved, KV not arrived yet
        # banaserve's prefill workers (set by the cluster): the global KV store, the transport
        # its prefixes are fetched over, each admitted prefix's fetch time (paid by its first
        # step), and how many prompt tokens came from it.
        self.store: SimStore | None = None
        self.store_transport = profile.transport()
        self._fetch_s: dict[str, float] = {}
        self.num_store_hit_tokens = 0
        self.write_policy = WritePolicy.REUSED  # which blocks are written back (write_backs.py)
        self._reused_blocks: dict[str, int] = {}  # by request: held or asked for at its lookup
        # A decode or mixed worker reports its engine loop's snapshot, published after each
        # step and each batch of commands (services/engine/loop.py): while a step runs, the
        # state from before it (a prompt it computes still queued, one sent since not yet
        # there). None: read it live.
        self._published: tuple[int, int, int, int] | None = None
        # Requests the next report is the first to count (``LoadReport.admitted``); those a
        # decode or mixed worker admitted while a step runs wait for the snapshot after it.
        self.admissions = Admissions()
        self._unpublished: list[str] = []

    # -- requests in ---------------------------------------------------------------------

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> Sequence:
        seq = Sequence(request_id, list(prompt), _params(max_tokens), self.profile.block_size)
        if self.store is None or not self._add_with_stored_prefix(seq):
            self.scheduler.add(seq)
        self._admitted(request_id)
        self.kick()
        return seq

    def _add_with_stored_prefix(self, seq: Sequence) -> bool:
        """As a banaserve prefill worker (services/prefill/store_prefix.py): the prompt's
        blocks past its own cached prefix looked up in the store; a run held there joins the
        batch with those tokens computed (``Engine.add_request_with_prefix``), its first step
        paying the fetch. False: nothing held past the own prefix, or no room now (computed)."""
        bs, bm, store = self.profile.block_size, self.block_manager, self.store
        assert store is not None
        hashes = block_hashes(seq.token_ids[: (seq.num_tokens - 1) // bs * bs], bs, FINGERPRINT)
        own = bm.num_cached_hashes(hashes)
        held = store.lookup(hashes[own:])
        num_blocks = own + held
        self._reused_blocks[seq.request_id] = own + store.mark_asked(hashes[own:], held)
        if num_blocks == own:
            return False
        hits = bm.find_cached_prefix(seq)[:num_blocks]
        num_fetched = (num_blocks - len(hits)) * bs
        if len(self.scheduler.running) >= self.scheduler.max_num_seqs or not bm.can_admit(
            seq, hits, num_fetched
        ):
            return False
        bm.admit_with_prefix(seq, hits, num_blocks * bs)
        self.scheduler.join_running(seq)
        self._fetch_s[seq.request_id] = self.store_transport.time(
            self.profile.kv_bytes(num_fetched)
        )
        self.num_store_hit_tokens += num_fetched
        return True

    def reserve(
        self, request_id: str, prompt: list[int], max_tokens: int, reuse: bool = True
    ) -> bool:
        """Blocks for a prompt's KV, before it is computed elsewhere; False: no room now. As a
        decode worker's reservation (``KVTransfer.begin_import``), the prompt's leading blocks
        in the prefix cache are reused (all but the last token's block): its handoff carries
        the rest (``handoff_tokens``)."""
        seq = Sequence(request_id, list(prompt), _params(max_tokens), self.profile.block_size)
        bm = self.block_manager
        if len(self.scheduler.running) + len(self.imported) >= self.scheduler.max_num_seqs:
            return False
        hits = bm.find_cached_prefix(seq) if reuse else []  # leaves the last token's block
        if not bm.can_admit(seq, hits, seq.num_tokens - len(hits) * bm.block_size):
            return False
        bm.admit(seq, hits)
        bm.append(seq, seq.num_tokens - seq.num_computed_tokens)
        self.imported[request_id] = seq
        self._admitted(request_id)
        self._publish()
        return True

    def num_uncached_tokens(self, prompt: list[int]) -> int:
        """A prompt's tokens outside this worker's prefix cache (``Engine.num_cached_prompt_tokens``)."""
        bm = self.block_manager
        return len(prompt) - len(bm.cached_blocks(prompt)) * bm.block_size

    def handoff_tokens(self, request_id: str) -> int:
        """The prompt tokens whose KV a reservation still waits for (0: none reserved)."""
        seq = self.imported.get(request_id)
        return 0 if seq is None else seq.num_prompt_tokens - seq.num_cached_tokens

    def join_all(self, arrived: list[tuple[str, int]]) -> list[Sequence | None]:
        """Prompts' KV arrived (one batch of the engine's commands): each sequence runs with its
        first token, all joining before the next step starts (None: a request cancelled
        meanwhile)."""
        seqs = [self._join(request_id, token) for request_id, token in arrived]
        self._publish()
        self.kick()
        return seqs

    def _join(self, request_id: str, first_token: int) -> Sequence | None:
        seq = self.imported.pop(request_id, None)
        if seq is None:
            return None
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.commit_full_blocks(seq)
        seq.token_ids.append(first_token)
        if self._done(seq):
            self.scheduler.finish(seq)
            self.on_finished(seq)
        else:
            self.scheduler.join_running(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Drop the request's sequence, if this worker holds it (its blocks freed, as the
        engine's abort); a step in flight leaves it out at its commit."""
        self._fetch_s.pop(request_id, None)
        self._reused_blocks.pop(request_id, None)
        seq = self.imported.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)
        else:
            s = self.scheduler
            for q in (*s.running, *s.waiting):
                if q.request_id == request_id:
                    s.finish(q)
                    break
        self._publish()

    # -- steps ---------------------------------------------------------------------------

    def kick(self) -> None:
        """Start a step if idle and there is work, publishing first what the last step or
        command left (the real loop's order)."""
        if self.busy:
            return
        self._publish()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return
        t, fixed = self.step_time(batch)
        fetch = max((self._fetch_s.pop(q.request_id, 0.0) for q in batch.seqs), default=0.0)
        if fetch:  # layer l computes once its prefix layer arrived: the longer one, overlapped
            t = max(t, fetch) + min(t, fetch) / self.profile.num_layers
        if self.offload is not None:
            t = self.offload.stretch(t, fixed, self._parts(batch, whole=fetch > 0))
        t += self.hosted_debt_s
        self.hosted_debt_s = 0.0
        self.busy = True
        self._step_s, self._step_end_s = t, self.loop.now + t
        start = self.loop.now
        self.meter.begin(start)  # busy while it runs, as the real loop's meter counts it
        ended = self.on_step(batch)

        def commit() -> None:
            ended()
            self._commit(batch, start)

        self.loop.after(t, commit)

    def _parts(self, batch: ScheduledBatch, whole: bool) -> tuple[float, ...]:
        """The micro-batches an offloaded step runs, each its modelled cost: the engine's own
        cut (step.py plans a step with a pending prefix fetch whole); a decode donor's step
        streams split the batch in halves of sequences."""
        assert self.offload is not None
        micro = self.offload.num_micro_batches
        if self.offload.pipelined:
            return (1.0,) * max(1, min(micro, len(batch.seqs)))
        runs = [batch] if whole else batch.split(micro)
        return tuple(self.step_time(run)[0] for run in runs)

    @property
    def last_step_s(self) -> float:
        """The length of the step in flight (or the last one)."""
        return self._step_s

    def busy_ahead_s(self) -> float:
        """How long this worker's core stays busy with its own work at the present pace: the
        step in flight and, for a worker that decodes, a step per token its longest running
        sequence has still to make (what a hosted layer part shares the core with)."""
        if not self.busy:
            return 0.0
        ahead = max(0.0, self._step_end_s - self.loop.now)
        if self.role is not WorkerRole.PREFILL:
            left = max(
                (q.params.max_tokens - q.num_output_tokens for q in self.scheduler.running),
                default=0,
            )
            ahead += max(0, left - 1) * self._step_s
        return ahead

    def between_steps(self, command: Callable[[], None]) -> None:
        """Runs ``command`` now if no step runs, else once the running one committed, before
        the next starts: where the real engine runs a command (a migration's switch waits for
        the donor's step in flight, seconds for a prefill step of 2,048 tokens)."""
        if self.busy:
            self._between_steps.append(command)
        else:
            command()

    def step_time(self, batch: ScheduledBatch) -> tuple[float, float]:
        """The time model's prediction for ``batch`` (profile.py), and the part of it paid
        whatever the batch: the scaled fixed cost of the step's kind."""
        p, d = self.profile.prefill, self.profile.decode
        tokens = attention = decodes = context = completing = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            done = seq.num_computed_tokens  # schedule() allocates; commit advances this
            if n == 1 and done >= seq.num_prompt_tokens:
                decodes += 1
                context += done + 1
            else:
                tokens += n
                attention += n * (done + n)
                completing += done + n >= seq.num_prompt_tokens
        costs = self.costs
        if not decodes:
            # A prefill worker's layer hook hands each layer's KV of every prompt that
            # completes in the step to its sender, one prompt at a time
            # (services/prefill/engine_side.py): the fitted per-step cost is a prompt's.
            hand_offs = max(1, completing) if self.role is WorkerRole.PREFILL else 1
            fixed = costs.prefill_step_s * hand_offs
            t = p.time(tokens, attention) * costs.prefill_scale + fixed
            return t, p.a * costs.prefill_scale + fixed
        scale = costs.decode_scale * (costs.receiving_scale if self.receiving else 1.0)
        t = d.time(decodes, context) * scale
        if tokens:
            # A mixed step pays the decode step's fixed cost and its prompts the rest of the
            # prefill model (what ``sim serving`` fits a colocated worker's scales on).
            t += (p.time(tokens, attention) - p.a) * costs.prefill_scale
        return t, d.a * scale

    def _commit(self, batch: ScheduledBatch, start: float) -> None:
        now = self.loop.now
        self.meter.end()
        self.meter.record(start, now)
        self.stats.num_steps += 1
        self.stats.busy_s += now - start
        bm = self.block_manager
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += n
            bm.commit_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                self._sample(seq)
        self.busy = False
        commands, self._between_steps = self._between_steps, []
        for command in commands:
            command()
        self.kick()

    def _sample(self, seq: Sequence) -> None:
        seq.token_ids.append(_token(seq))
        self.on_token(seq)
        if self.role is WorkerRole.PREFILL:
            if self.store is not None:  # the write-back (at once here: store.py)
                hashes = seq.block_hashes
                reused = self._reused_blocks.pop(seq.request_id, 0)
                written = blocks_to_write(self.write_policy, 0, reused, len(hashes))
                self.store.write(hashes[: written.stop])
            self.scheduler.finish(seq)
            self.on_prefilled(seq)
        elif self._done(seq):
            self.scheduler.finish(seq)
            self.on_finished(seq)

    def _done(self, seq: Sequence) -> bool:
        return (
            seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len
        )

    def _preempted(self, seq: Sequence) -> None:
        self.stats.num_preempted += 1

    # -- load ----------------------------------------------------------------------------

    def load(self) -> LoadReport:
        """What the real worker reports (services/prefill/core.py, services/decode/core.py)."""
        s, bm = self.scheduler, self.block_manager
        if self.role is WorkerRole.PREFILL:
            queued = sum(q.num_prompt_tokens for q in s.waiting) + sum(
                q.num_prompt_tokens for q in s.running
            )
            running, waiting, free = len(s.running), len(s.waiting), bm.num_free_blocks
        else:
            queued, running, waiting, free = self._published or self._state()
        step_time, busy = self.meter.snapshot()
        return LoadReport(
            queued,
            running,
            waiting,
            bm.num_blocks - free,
            free,
            step_time,
            busy,
            LOAD_WINDOW_S,
            num_hosted_layers=self.num_hosted_layers,
            admitted=self.admissions.take(),
        )

    def _state(self) -> tuple[int, int, int, int]:
        """(queued prompt tokens, running, waiting, free blocks) as the engine loop's
        snapshot holds them: the waiting sequences' tokens still to compute."""
        s = self.scheduler
        queued = sum(q.num_tokens - q.num_computed_tokens for q in s.waiting)
        return queued, len(s.running), len(s.waiting), self.block_manager.num_free_blocks

    def _publish(self) -> None:
        """After a step, or a command while none runs: the real loop runs commands (adds,
        reservations, joins, aborts) between steps, so one sent during a step shows in the
        reports only once that step ended."""
        if self.role is not WorkerRole.PREFILL and not self.busy:
            self._published = self._state()
            for request_id in self._unpublished:
                self.admissions.add(request_id)
            self._unpublished.clear()

    def _admitted(self, request_id: str) -> None:
        """A prefill worker's reports read its queue live; the others' the published state."""
        if self.role is WorkerRole.PREFILL:
            self.admissions.add(request_id)
        else:
            self._unpublished.append(request_id)

    @property
    def idle(self) -> bool:
        return not self.busy and not self.scheduler.num_unfinished and not self.imported


def _nothing() -> None:
    pass


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def _token(seq: Sequence) -> int:
    """A generated token: any id serves (no stop tokens); this one depends on the position."""
    return 1000 + (seq.num_tokens * 7919) % 29000
