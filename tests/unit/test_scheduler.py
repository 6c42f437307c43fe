from services.engine.sequence import SequenceStatus
from tests.unit.factories import assert_no_leaks, make_scheduler, make_seq


def run_step(sched):
    """Schedule, then do what the engine does after the model ran; returns the batch."""
    batch = sched.schedule()
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += n
        sched.block_manager.commit_full_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sched.finish(seq)
    return batch


def plan(batch):
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)]


def drain(sched, max_steps=200):
    for _ in range(max_steps):
        if not sched.num_unfinished:
            return
        run_step(sched)
    raise AssertionError("scheduler did not finish")


def test_chunked_prefill_under_token_budget():
    sched = make_scheduler(num_blocks=16, budget=16)
    a, b, c = make_seq(10), make_seq(10), make_seq(10)
    for s in (a, b, c):
        sched.add(s)
    assert plan(run_step(sched)) == [(a.request_id, 10), (b.request_id, 6)]
    assert c.status is SequenceStatus.WAITING
    # a decodes (1), b finishes its prompt (4), c fits in the remaining 11.
    assert plan(run_step(sched)) == [(a.request_id, 1), (b.request_id, 4), (c.request_id, 10)]
    assert plan(run_step(sched)) == [(a.request_id, 1), (b.request_id, 1), (c.request_id, 1)]
    drain(sched)
    assert_no_leaks(sched.block_manager)


def test_budget_exhausted_by_running_admits_nothing():
    sched = make_scheduler(num_blocks=16, budget=4)
    a, b = make_seq(9), make_seq(3)
    sched.add(a)
    sched.add(b)
    assert plan(run_step(sched)) == [(a.request_id, 4)]
    assert plan(run_step(sched)) == [(a.request_id, 4)]
    assert plan(run_step(sched)) == [(a.request_id, 1), (b.request_id, 3)]
    drain(sched)
    assert_no_leaks(sched.block_manager)


def test_max_num_seqs_caps_the_running_batch():
    sched = make_scheduler(num_blocks=32, max_num_seqs=2, budget=64)
    seqs = [make_seq(3) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    assert plan(run_step(sched)) == [(seqs[0].request_id, 3), (seqs[1].request_id, 3)]
    assert seqs[2].status is SequenceStatus.WAITING
    drain(sched)
    assert_no_leaks(sched.block_manager)


def test_preemption_by_recompute_frees_the_newest_and_requeues_it_first():
    sched = make_scheduler(num_blocks=4, budget=64)  # 16 token slots
    a, b = make_seq(7, max_tokens=6), make_seq(7, max_tokens=6)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefilled: 2 blocks each, pool full; each now has 8 tokens
    assert sched.block_manager.num_free_blocks == 0
    assert run_step(sched).preempted == []  # position 7 still fits in block 2
    batch = run_step(sched)  # a needs a third block for position 8: b is preempted
    assert batch.preempted == [b]
    assert plan(batch) == [(a.request_id, 1)]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and sched.running == [a]
    assert b.num_tokens == 9  # its generated tokens are kept and recomputed
    drain(sched)
    assert a.output_token_ids == [7] * 6 and b.output_token_ids == [7] * 6
    assert_no_leaks(sched.block_manager)


def test_running_sequence_preempts_itself_when_it_is_the_newest():
    sched = make_scheduler(num_blocks=3, budget=64)
    a, b = make_seq(4, max_tokens=3), make_seq(7, max_tokens=3)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 1 block (4 tokens), b: 2 blocks
    batch = run_step(sched)  # a needs block 2 for its 5th token, none free: b (newest) goes
    assert batch.preempted == [b]
    drain(sched)
    assert_no_leaks(sched.block_manager)


def test_fcfs_head_of_queue_blocks_smaller_requests():
    sched = make_scheduler(num_blocks=4, budget=64)
    a = make_seq(9, max_tokens=3)  # 3 blocks
    big, small = make_seq(9), make_seq(2)
    for s in (a, big, small):
        sched.add(s)
    assert plan(run_step(sched)) == [(a.request_id, 9)]  # big does not fit; small waits behind it
    assert list(sched.waiting) == [big, small]
    drain(sched)
    assert_no_leaks(sched.block_manager)


def test_readmission_after_preemption_hits_its_own_cached_blocks():
    sched = make_scheduler(num_blocks=5, budget=64)
    a, b = make_seq(11, max_tokens=2), make_seq(8, max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 3 blocks, 12 tokens; b: 2 blocks, 9 tokens; pool full
    batch = run_step(sched)  # b needs a block for position 8: b, the newest, preempts itself
    assert batch.preempted == [b] and plan(batch) == [(a.request_id, 1)]
    assert a.status is SequenceStatus.FINISHED
    batch = run_step(sched)
    assert plan(batch) == [(b.request_id, 1)]  # its two full blocks came back from the cache
    assert b.num_cached_tokens == 8
    drain(sched)
    assert_no_leaks(sched.block_manager)


def test_finish_of_waiting_sequence_removes_it():
    sched = make_scheduler()
    a = make_seq(3)
    sched.add(a)
    sched.finish(a)
    assert a.status is SequenceStatus.FINISHED and not sched.waiting
    assert_no_leaks(sched.block_manager)


def test_a_step_in_flight_is_neither_scheduled_nor_preempted():
    sched = make_scheduler(num_blocks=5, budget=64)  # block size 4
    a, b, c = make_seq(8, max_tokens=6), make_seq(3, max_tokens=6), make_seq(8, max_tokens=6)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)  # a 2 full blocks, b 1, c 2 full: the pool is full
    # c's step is in flight: a needs a third block and the newest sequence not in flight goes
    batch = sched.schedule(exclude=(c.request_id,))
    assert plan(batch) == [(a.request_id, 1)] and batch.preempted == [b]
    # a's step is in flight: c needs a block, none is free, and c is the only one to give
    batch = sched.schedule(exclude=(a.request_id,))
    assert plan(batch) == [] and batch.preempted == [c]
    assert a.status is SequenceStatus.RUNNING and list(sched.waiting) == [c, b]


def test_max_running_caps_the_running_sequences_scheduled():
    sched = make_scheduler(num_blocks=16, budget=64)
    seqs = [make_seq(3) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    ids = [s.request_id for s in seqs]
    assert plan(sched.schedule(max_running=2)) == [(ids[0], 1), (ids[1], 1)]
    assert plan(sched.schedule(exclude=ids[:1], max_running=1)) == [(ids[1], 1)]
    assert plan(sched.schedule(exclude=ids[:2])) == [(ids[2], 1)]


def _sharing(defer: int, budget: int = 64):
    from services.engine.scheduler import Scheduler
    from tests.unit.factories import make_block_manager

    return Scheduler(make_block_manager(16), 4, budget, defer_shared_prefix_tokens=defer)


def test_a_prompt_waits_a_step_for_a_shared_prefix_a_running_one_computes():
    prefix = list(range(500, 512))  # three blocks of 4
    sched = _sharing(defer=8)
    a, b, c = make_seq(prefix + [1, 2, 3]), make_seq(prefix + [4, 5, 6, 7, 8]), make_seq(5)
    for s in (a, b, c):
        sched.add(s)
    # b would compute a's 12 uncomputed prefix tokens again: it is stepped over, and c, behind
    # it, is not held up
    assert plan(run_step(sched)) == [(a.request_id, 15), (c.request_id, 5)]
    assert list(sched.waiting) == [b]
    # a's step committed its three full blocks: b computes only its own 5 tokens
    assert plan(run_step(sched)) == [(a.request_id, 1), (c.request_id, 1), (b.request_id, 5)]
    assert b.num_cached_tokens == 12
    drain(sched)
    assert_no_leaks(sched.block_manager)


def test_off_or_under_the_threshold_both_compute_the_prefix_in_one_step():
    prefix = list(range(500, 512))
    for defer, shared in ((0, prefix), (16, prefix), (8, prefix[:4])):
        sched = _sharing(defer)
        a, b = make_seq(shared + [1, 2, 3]), make_seq(shared + [4, 5, 6, 7, 8])
        sched.add(a)
        sched.add(b)
        batch = run_step(sched)
        assert plan(batch) == [(a.request_id, len(shared) + 3), (b.request_id, len(shared) + 5)]
        drain(sched)
        assert_no_leaks(sched.block_manager)


def test_a_prompt_waits_for_a_chunked_prefix_and_not_for_a_finished_leader():
    prefix = list(range(500, 524))  # six blocks
    sched = _sharing(defer=8, budget=12)
    a, b = make_seq(prefix + [1]), make_seq(prefix + [2, 3])
    sched.add(a)
    sched.add(b)
    assert plan(run_step(sched)) == [(a.request_id, 12)]  # a's first chunk: b waits
    assert plan(run_step(sched)) == [(a.request_id, 12)]  # a's second: still 12 shared to come
    # a computed the whole prefix (its last token still to come): b takes the cache, 2 tokens
    assert plan(run_step(sched)) == [(a.request_id, 1), (b.request_id, 2)]
    assert b.num_cached_tokens == 24
    drain(sched)
    # the leader gone before computing anything: the waiting one is admitted at once
    c, d = make_seq(list(range(700, 724)) + [1]), make_seq(list(range(700, 724)) + [2])
    sched.add(c)
    sched.add(d)
    assert plan(sched.schedule()) == [(c.request_id, 12)]
    sched.finish(c)
    assert plan(sched.schedule()) == [(d.request_id, 12)]
    sched.finish(d)
    assert_no_leaks(sched.block_manager)


def _imported(prompt_len: int, sched):
    """A sequence whose prompt's KV arrived whole (a handoff) and whose first token the
    prefill worker sampled: it joins ``running`` directly, one token to decode."""
    seq = make_seq(prompt_len)
    sched.block_manager.admit(seq, [])
    sched.block_manager.append(seq, prompt_len)
    seq.num_computed_tokens = prompt_len
    seq.token_ids.append(7)
    sched.join_running(seq)
    return seq


def test_a_decoding_sequence_takes_its_token_before_an_older_prompts_chunk():
    sched = make_scheduler(num_blocks=16, budget=4)
    a = make_seq(12, max_tokens=2)
    sched.add(a)
    assert plan(run_step(sched)) == [(a.request_id, 4)]
    b = _imported(3, sched)  # joined after a's prompt started
    # b decodes every step while a's prompt goes on in what is left of the budget
    assert plan(run_step(sched)) == [(b.request_id, 1), (a.request_id, 3)]
    assert plan(run_step(sched)) == [(b.request_id, 1), (a.request_id, 3)]
    assert plan(run_step(sched)) == [(b.request_id, 1), (a.request_id, 2)]
    drain(sched)
    assert_no_leaks(sched.block_manager)


def test_a_prompts_chunk_never_preempts_a_sequence_already_in_the_step():
    sched = make_scheduler(num_blocks=3, budget=4)
    a = make_seq(12, max_tokens=2)
    sched.add(a)
    run_step(sched)  # a: 1 block, 4 of its 12 tokens
    b = _imported(7, sched)  # the newest: 2 blocks, its next token fits in its second
    batch = sched.schedule()
    # b took its token; a's next chunk needs a block, none is free, and the newest sequence
    # not in the step is a itself: it goes back to the queue (its full block stays cached)
    assert plan(batch) == [(b.request_id, 1)] and batch.preempted == [a]
    assert list(sched.waiting) == [a] and sched.running == [b]


def test_a_step_that_decodes_computes_at_most_the_cap_of_prompt_tokens():
    from services.engine.scheduler import Scheduler
    from tests.unit.factories import make_block_manager

    sched = Scheduler(make_block_manager(32), 4, 64, max_prefill_tokens_while_decoding=8)
    a = make_seq(20, max_tokens=3)
    sched.add(a)
    assert plan(run_step(sched)) == [(a.request_id, 20)]  # nothing decodes: the whole budget
    b, c = make_seq(12), make_seq(6)
    sched.add(b)
    sched.add(c)
    # a decodes: b's prompt and then c's admission share the 8 prompt tokens of each step
    assert plan(run_step(sched)) == [(a.request_id, 1), (b.request_id, 8)]
    assert plan(run_step(sched)) == [(a.request_id, 1), (b.request_id, 4), (c.request_id, 4)]
    # a has finished; b decodes, c's last 2 prompt tokens
    assert plan(run_step(sched)) == [(b.request_id, 1), (c.request_id, 2)]
    drain(sched)
    assert_no_leaks(sched.block_manager)
