import pytest

from shardserve.engine.block_manager import BlockManager


def test_allocate_grow_and_free_returns_every_block():
    bm = BlockManager(8, 4)
    assert bm.allocate("a", 6) == [0, 1] and bm.num_free == 6
    assert bm.allocate("a", 9) == [2]  # grows by what it lacks
    assert bm.allocate("a", 9) == []
    bm.free_seq("a")
    assert bm.num_free == 8


def test_can_allocate_counts_free_blocks():
    bm = BlockManager(3, 4)
    bm.allocate("a", 8)
    assert bm.can_allocate("b", 4) and not bm.can_allocate("b", 5)
    assert not bm.can_allocate("a", 13) and bm.can_allocate("a", 12)


def test_prefix_hits_need_committed_full_blocks_and_leave_the_last_token():
    bm = BlockManager(16, 4)
    tokens = list(range(10))
    bm.allocate("a", 10)
    assert bm.match_prefix(tokens) == []  # nothing computed yet
    bm.commit("a", tokens, 10)  # two full blocks are computed
    hits = bm.match_prefix(tokens + [99, 98])
    assert hits == bm.block_ids("a")[:2]
    assert bm.match_prefix(list(range(8))) == bm.block_ids("a")[:1]  # keep one to compute
    assert bm.match_prefix([0, 1, 2, 7, 4, 5, 6, 7]) == []  # first block differs
    other = [5, 5, 5, 5] + tokens[4:8] + [1]
    assert bm.match_prefix(other) == []  # same second block after another first: no hit


def test_shared_blocks_are_ref_counted_and_cached_blocks_survive_until_reused():
    bm = BlockManager(4, 2)
    tokens = [1, 2, 3, 4, 5]
    bm.allocate("a", 5)
    bm.commit("a", tokens, 5)
    hits = bm.match_prefix(tokens)
    assert len(hits) == 2
    assert bm.can_allocate("b", 5, hits)
    bm.allocate("b", 5, hits)
    assert bm.blocks[hits[0]].ref_count == 2 and bm.hits == 4
    bm.free_seq("a")
    bm.free_seq("b")
    assert bm.num_free == 4
    assert bm.match_prefix(tokens) == hits  # freed but still cached
    bm.allocate("c", 8)  # needs every block: the cached ones are evicted for reuse
    assert bm.match_prefix(tokens) == []
    bm.free_seq("c")
    assert bm.num_free == 4 and not bm.cached


def test_uncached_blocks_are_reused_before_cached_ones():
    bm = BlockManager(4, 2)
    bm.allocate("a", 4)
    bm.commit("a", [1, 2, 3, 4], 4)
    bm.allocate("x", 1)
    bm.free_seq("a")
    bm.free_seq("x")
    bm.allocate("y", 2)  # one block: must not evict a's cached blocks
    assert len(bm.match_prefix([1, 2, 3, 4, 5])) == 2


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)


def test_prefix_cache_keys_are_salted_per_tenant():
    bm = BlockManager(16, 4)
    tokens = list(range(9))
    bm.allocate("a", 9, salt="acme")
    bm.commit("a", tokens, 9)
    assert len(bm.match_prefix(tokens, "acme")) == 2
    assert bm.match_prefix(tokens, "globex") == [] and bm.match_prefix(tokens) == []
    key = bm.blocks[bm.block_ids("a")[0]].key
    assert isinstance(key, bytes) and len(key) == 32  # SHA-256, not a 64-bit hash()
