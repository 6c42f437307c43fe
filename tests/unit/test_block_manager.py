from services.common.hashing import block_hashes
from tests.unit.factories import assert_no_leaks, make_block_manager, make_seq


def compute(bm, seq, n):
    """What a step does for ``seq``: allocate, 'compute' n tokens, cache full blocks."""
    bm.append(seq, n)
    seq.num_computed_tokens += n
    bm.commit_full_blocks(seq)


def test_allocation_takes_lowest_free_blocks_and_caches_full_ones():
    bm = make_block_manager(8)
    seq = make_seq(10)
    compute(bm, seq, 10)
    assert seq.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert seq.block_hashes == block_hashes(seq.token_ids, 4, "test-model")
    assert bm.num_cached_blocks == 2  # the partial third block has no hash
    assert [bm.blocks[i].ref_count for i in range(3)] == [1, 1, 1]
    bm.free(seq)
    assert_no_leaks(bm)
    assert bm.num_cached_blocks == 2  # freed blocks stay reusable


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = make_block_manager(8)
    a = make_seq(list(range(10)))
    compute(bm, a, 10)
    b = make_seq(list(range(8)) + [50, 51, 52])
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    assert bm.can_admit(b, hits, 3)
    bm.admit(b, hits)
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in (0, 1)] == [2, 2]
    compute(bm, b, 3)
    assert b.block_table == [0, 1, 3]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in (0, 1, 2)] == [1, 1, 0]
    bm.free(b)
    assert_no_leaks(bm)


def test_hit_on_free_cached_block_takes_it_out_of_the_free_list():
    bm = make_block_manager(4)
    a = make_seq(list(range(9)))
    compute(bm, a, 9)
    bm.free(a)
    b = make_seq(list(range(9)))
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    bm.admit(b, hits)
    assert bm.num_free_blocks == 2
    compute(bm, b, 1)
    assert b.block_table == [0, 1, 3]  # 2 was freed before 3, but 3 was never used: LRU order
    bm.free(b)
    assert_no_leaks(bm)


def test_at_least_one_token_is_left_to_compute():
    bm = make_block_manager(8)
    a = make_seq(list(range(8)))
    compute(bm, a, 8)
    same = make_seq(list(range(8)))
    assert bm.find_cached_prefix(same) == [0]  # not both blocks: the last token must run
    bm.free(a)
    assert_no_leaks(bm)


def test_token_equality_check_rejects_a_colliding_hash():
    bm = make_block_manager(8)
    a = make_seq(list(range(9)))
    compute(bm, a, 9)
    bm.blocks[0].token_ids = (9, 9, 9, 9)  # as if another content had the same hash
    assert bm.find_cached_prefix(make_seq(list(range(9)))) == []
    bm.free(a)
    assert_no_leaks(bm)


def test_eviction_is_lru_and_tail_blocks_go_first():
    bm = make_block_manager(6)
    a = make_seq(list(range(12)))
    compute(bm, a, 12)  # blocks 0,1,2 all full and cached
    bm.free(a)  # freed tail first: free order is now 3,4,5,2,1,0
    assert list(bm._free) == [3, 4, 5, 2, 1, 0]
    filler = make_seq(list(range(500, 516)))
    compute(bm, filler, 16)  # takes 3,4,5 and evicts 2 (a's tail block)
    assert filler.block_table == [3, 4, 5, 2]
    again = make_seq(list(range(12)) + [7])
    assert bm.find_cached_prefix(again) == [0, 1]  # head of a's prefix survived
    bm.free(filler)
    assert_no_leaks(bm)


def test_duplicate_content_keeps_first_block_cached():
    bm = make_block_manager(8)
    a, b = make_seq(list(range(5))), make_seq(list(range(5)))
    compute(bm, a, 5)  # blocks 0, 1
    compute(bm, b, 5)  # blocks 2, 3: computed concurrently, before any hit was possible
    assert bm._cached[a.block_hashes[0]] == 0
    bm.free(b)
    bm.free(a)
    assert list(bm._free) == [4, 5, 6, 7, 3, 2, 1, 0]
    filler = make_seq(list(range(500, 524)))
    bm.append(filler, 24)  # evicts b's copy (block 2) but not a's block 0
    assert filler.block_table == [4, 5, 6, 7, 3, 2]
    assert bm.find_cached_prefix(make_seq(list(range(5)))) == [0]
    bm.free(filler)
    assert_no_leaks(bm)


def test_prefix_caching_disabled_never_hits():
    bm = make_block_manager(8, prefix_caching=False)
    a = make_seq(list(range(9)))
    compute(bm, a, 9)
    assert bm.find_cached_prefix(make_seq(list(range(9)))) == []
    assert bm.num_cached_blocks == 0
    bm.free(a)
    assert_no_leaks(bm)
