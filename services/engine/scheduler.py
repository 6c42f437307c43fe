"""Continuous batching with chunked prefill, FCFS admission and preemption by recompute.

Each step the scheduler fills a token budget:

1. running sequences first: every decoding sequence takes its 1 token, oldest first,
   then every sequence still prefilling takes the next chunk of its prompt, oldest
   first. A chunk never holds back a decoding sequence that joined after its prompt
   (an imported sequence, or a short prompt admitted a step later): each of its steps
   would otherwise leave that sequence without a token. In a step that decodes, prompt
   tokens (chunks and admissions) take at most ``max_prefill_tokens_while_decoding`` of
   the budget (0: all of it): a prompt then costs each decoding sequence a little of
   every step instead of a long one;
2. then waiting sequences, oldest first, each starting from its cached prefix,
   until the budget, ``max_num_seqs`` or the free blocks run out. The head of
   the queue blocks the rest (strict FCFS), with one exception: a sequence whose
   next ``defer_shared_prefix_tokens`` or more prompt tokens (whole blocks) a running
   sequence is still to compute waits for them, stepped over (``_shares_uncomputed``):
   once that sequence's step commits they are cached, and it computes only the rest,
   first in the queue still. Admitted together, both would compute the prefix (in
   ``bench compare``'s hotspot two first sights of one 384-token prefix shared a
   1.6 s step).

When a running sequence needs a block and none is free, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of
the queue to be recomputed later (its freed blocks stay in the prefix cache, so
the recompute is usually a cache hit). No waiting sequence is admitted in a step
that preempted. ``on_preempt(seq)`` runs before the blocks are freed, so whatever
still writes into them (a prefix fetch) can be stopped first.

While a pipelined step is in flight (pipeline.py) the next step is scheduled from the
running sequences it does not compute (``exclude``), at most ``max_running`` of them; a sequence in
flight is never preempted.

A sequence whose KV starts elsewhere (an import, a fetched prefix) skips the queue:
it already holds its blocks and joins ``running`` directly (``join_running``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from services.common.config import DEFER_SHARED_PREFIX_TOKENS
from services.engine.block_manager import BlockManager
from services.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)

    def split(self, parts: int = 2) -> list[ScheduledBatch]:
        """Up to ``parts`` contiguous runs of whole sequences of about equal tokens (fewer with
        fewer sequences; one if the batch has a single sequence): a donor's micro-batches
        (step.py), and what the cluster simulator pipelines (services/sim/worker.py)."""
        n = len(self.seqs)
        parts = min(parts, n)
        if parts < 2:
            return [self]
        total, acc, cuts = self.num_tokens, 0, [0]
        for i, tokens in enumerate(self.num_new_tokens[:-1]):
            acc += tokens
            # cut after sequence i once the next share of the tokens is reached, or when only
            # one sequence is left for each part still to come
            left, wanted = n - (i + 1), parts - len(cuts)
            if wanted and (acc * parts >= total * len(cuts) or left == wanted) and left >= wanted:
                cuts.append(i + 1)
        cuts.append(n)
        return [
            ScheduledBatch(self.seqs[a:b], self.num_new_tokens[a:b])
            for a, b in zip(cuts, cuts[1:], strict=False)
            if a < b
        ]


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        on_preempt: Callable[[Sequence], None] | None = None,
        defer_shared_prefix_tokens: int = DEFER_SHARED_PREFIX_TOKENS,
        max_prefill_tokens_while_decoding: int = 0,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.on_preempt = on_preempt
        self.defer_shared_prefix_tokens = defer_shared_prefix_tokens  # 0: never wait
        self.max_prefill_tokens_while_decoding = max_prefill_tokens_while_decoding  # 0: no cap
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # sequences preempted so far (each time counts)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def join_running(self, seq: Sequence) -> None:
        """Add a sequence that already holds its blocks to the running batch."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and put it first in the queue, to be recomputed."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(
        self, exclude: Collection[str] = (), max_running: int | None = None
    ) -> ScheduledBatch:
        """The next step's batch. ``exclude``: request ids of running sequences a step in
        flight computes (pipeline.py): they are neither scheduled nor preempted. At most
        ``max_running`` running sequences are scheduled (waiting ones are admitted as usual)."""
        batch = ScheduledBatch()
        budget = self._schedule_running(
            batch, self.max_num_batched_tokens, exclude, max_running or len(self.running)
        )
        if not batch.preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)

    def _schedule_running(
        self, batch: ScheduledBatch, budget: int, exclude: Collection[str], max_running: int
    ) -> int:
        """Decoding sequences, then prefilling ones; what is left of the budget for admissions."""
        decoding: list[Sequence] = []
        prefilling: list[Sequence] = []
        for s in self.running:
            if s.request_id not in exclude:
                (decoding if s.num_tokens - s.num_computed_tokens <= 1 else prefilling).append(s)
        budget = self._schedule_group(batch, decoding, budget, exclude, max_running)
        if self.max_prefill_tokens_while_decoding and batch.seqs:
            # prompt tokens from here on, chunks and then admissions
            budget = min(budget, self.max_prefill_tokens_while_decoding)
        return self._schedule_group(batch, prefilling, budget, exclude, max_running)

    def _schedule_group(
        self,
        batch: ScheduledBatch,
        group: list[Sequence],
        budget: int,
        exclude: Collection[str],
        max_running: int,
    ) -> int:
        bm = self.block_manager
        in_step = {s.request_id for s in batch.seqs}
        for seq in group:
            if budget <= 0 or len(batch.seqs) >= max_running:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted for another sequence's block in this step
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_append(seq, n):
                # the newest sequence neither in flight nor in this step (``seq`` at worst)
                victim = next(
                    s
                    for s in reversed(self.running)
                    if s.request_id not in exclude and s.request_id not in in_step
                )
                self._preempt(victim, batch)
                if victim is seq:
                    break
            else:
                bm.append(seq, n)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                in_step.add(seq.request_id)
                budget -= n
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        bm = self.block_manager
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            hits = bm.find_cached_prefix(seq)
            if self._shares_uncomputed(seq, len(hits) * bm.block_size):
                i += 1  # stepped over: first in the queue again next step
                continue
            n = min(seq.num_tokens - len(hits) * bm.block_size, budget)
            if not bm.can_admit(seq, hits, n):
                break
            bm.admit(seq, hits)
            bm.append(seq, n)
            del self.waiting[i]
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n

    def _shares_uncomputed(self, seq: Sequence, cached: int) -> bool:
        """Whether a running sequence is still to compute ``defer_shared_prefix_tokens`` or
        more of ``seq``'s prompt after its ``cached`` tokens (whole blocks of an equal prefix,
        not ``seq``'s last token, which it computes itself)."""
        want = self.defer_shared_prefix_tokens
        bs = self.block_manager.block_size
        last = (seq.num_tokens - 1) // bs * bs  # the cache can serve up to here
        if want <= 0 or last - cached < want:
            return False
        for other in self.running:
            if other.num_computed_tokens > cached:
                continue  # had it computed past ``cached``, those blocks would be cached
            end = min(last, other.num_prompt_tokens // bs * bs)
            if end - cached < want or seq.token_ids[:cached] != other.token_ids[:cached]:
                continue
            shared = cached
            while shared < end and (
                seq.token_ids[shared : shared + bs] == other.token_ids[shared : shared + bs]
            ):
                shared += bs
            if shared - cached >= want:
                return True
        return False

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.num_preemptions += 1
        if self.on_preempt is not None:
            self.on_preempt(seq)
        self.requeue(seq)
        batch.preempted.append(seq)
