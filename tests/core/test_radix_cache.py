import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from plait.core.memory import TokenSlotAllocator
from plait.core.radix_cache import RadixCache


def make(num_slots=64, page_size=1):
    alloc = TokenSlotAllocator(num_slots, page_size)
    return alloc, RadixCache(alloc, page_size)


def cache_seq(cache, alloc, key):
    """Caches ``key`` the way a scheduler does; returns the slots the tree now holds for it."""
    prefix, _ = cache.match_prefix(key)
    new = alloc.alloc(len(key) - len(prefix))
    value = torch.cat([prefix, new])
    present = cache.insert(key, value)
    alloc.free(value[len(prefix) : present])
    return value


def path_key(cache, node):
    key = []
    while node is not cache.root_node:
        key = node.key + key
        node = node.parent
    return key


# ----- match / insert / split -----


def test_match_on_empty_tree_returns_empty_and_root():
    _, cache = make()
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.shape == (0,) and slots.dtype == torch.int64
    assert node is cache.root_node


def test_insert_then_match_returns_the_inserted_slots():
    alloc, cache = make()
    value = alloc.alloc(4)
    assert cache.insert([1, 2, 3, 4], value) == 0
    slots, node = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert slots.tolist() == value.tolist()
    assert path_key(cache, node) == [1, 2, 3, 4]
    assert cache.total_size() == cache.evictable_size() == 4


def test_insert_returns_length_already_present():
    alloc, cache = make()
    cache.insert([1, 2, 3], alloc.alloc(3))
    dup = alloc.alloc(5)
    assert cache.insert([1, 2, 3, 4, 5], dup) == 3
    alloc.free(dup[:3])  # the caller's copies of the tree-owned prefix
    assert cache.total_size() == 5
    assert alloc.available_size() + cache.total_size() == 64
    again = alloc.alloc(2)
    assert cache.insert([1, 2], again) == 2  # fully present: nothing new is owned by the tree
    alloc.free(again)


def test_match_ending_inside_a_node_splits_it():
    alloc, cache = make()
    value = alloc.alloc(6)
    cache.insert([1, 2, 3, 4, 5, 6], value)
    slots, node = cache.match_prefix([1, 2, 3, 9])
    assert slots.tolist() == value[:3].tolist()
    assert node.key == [1, 2, 3] and node.value.tolist() == value[:3].tolist()
    (child,) = node.children.values()
    assert child.key == [4, 5, 6] and child.value.tolist() == value[3:].tolist()
    assert cache.total_size() == 6
    # The full sequence still matches across the split.
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0].tolist() == value.tolist()


def test_insert_diverging_in_the_middle_creates_a_branch():
    alloc, cache = make()
    a = cache_seq(cache, alloc, [1, 2, 3, 4])
    b = cache_seq(cache, alloc, [1, 2, 7, 8])
    assert cache.total_size() == 6
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == a.tolist()
    assert cache.match_prefix([1, 2, 7, 8])[0].tolist() == a[:2].tolist() + b[2:].tolist()
    _, node = cache.match_prefix([1, 2])
    assert sorted(node.children) == [3, 7]


def test_insert_rejects_value_of_wrong_length():
    alloc, cache = make()
    with pytest.raises(ValueError, match="value"):
        cache.insert([1, 2, 3], alloc.alloc(2))


def test_page_size_16_matches_and_inserts_whole_pages_only():
    ps = 16
    alloc, cache = make(8 * ps, ps)
    key = list(range(40))  # 2 full pages + 8 tokens
    value = alloc.alloc(40)
    assert cache.insert(key, value) == 0
    alloc.free(value[32:])  # the partial page stays with the request
    assert cache.total_size() == 32

    slots, node = cache.match_prefix(key[:31])  # less than 2 pages: 1 page matches
    assert slots.tolist() == value[:16].tolist()
    assert path_key(cache, node) == key[:16]  # split at the page boundary

    other = key[:20] + [999] * 20  # diverges inside page 2: only page 1 is shared
    slots, node = cache.match_prefix(other)
    assert len(slots) == 16
    new = alloc.alloc(len(other) - 16, last_slot=int(slots[-1]))
    assert cache.insert(other, torch.cat([slots, new])) == 16
    alloc.free(new[16:])
    assert cache.total_size() == 48
    assert alloc.available_size() + cache.total_size() == 8 * ps


def test_page_size_16_children_are_keyed_by_first_page():
    ps = 16
    alloc, cache = make(8 * ps, ps)
    cache_seq(cache, alloc, [0] * 32)
    cache_seq(cache, alloc, [0] * 15 + [1] + [0] * 16)  # same first 15 tokens, other page
    assert len(cache.root_node.children) == 2
    assert cache.match_prefix([0] * 15 + [1])[0].numel() == 16


def test_match_updates_access_time_along_the_path():
    alloc, cache = make()
    cache_seq(cache, alloc, [1, 2, 3])
    cache_seq(cache, alloc, [1, 2, 4])
    _, node = cache.match_prefix([1, 2, 3])
    sibling = node.parent.children[4]
    assert node.last_access_time == node.parent.last_access_time > sibling.last_access_time


# ----- locking and eviction -----


def test_lock_moves_tokens_from_evictable_to_protected_along_the_path():
    alloc, cache = make()
    cache_seq(cache, alloc, [1, 2, 3, 4])
    cache_seq(cache, alloc, [1, 2, 5])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 4 and cache.evictable_size() == 1
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 4
    cache.dec_lock_ref(node)
    cache.dec_lock_ref(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 5
    with pytest.raises(ValueError, match="not locked"):
        cache.dec_lock_ref(node)


def test_locked_nodes_are_not_evicted():
    alloc, cache = make()
    cache_seq(cache, alloc, [1, 2, 3])
    cache_seq(cache, alloc, [4, 5])
    _, node = cache.match_prefix([1, 2, 3])
    cache.inc_lock_ref(node)
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3])[0].numel() == 3
    assert cache.match_prefix([4, 5])[0].numel() == 0
    assert cache.evictable_size() == 0 and cache.protected_size() == 3
    cache.dec_lock_ref(node)
    assert cache.evict(100) == 3
    assert alloc.available_size() == 64


def test_split_of_a_locked_node_keeps_both_halves_locked():
    alloc, cache = make()
    cache_seq(cache, alloc, [1, 2, 3, 4])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(node)
    _, upper = cache.match_prefix([1, 2])  # splits the locked node
    assert upper.lock_ref == node.lock_ref == 1
    assert cache.evict(100) == 0
    cache.dec_lock_ref(node)
    assert upper.lock_ref == 0 and cache.evictable_size() == 4


def test_eviction_takes_least_recently_used_leaves_first():
    alloc, cache = make()
    cache_seq(cache, alloc, [1, 1])
    cache_seq(cache, alloc, [2, 2])
    cache_seq(cache, alloc, [3, 3])
    cache.match_prefix([1, 1])  # [2, 2] is now the oldest
    assert cache.evict(1) == 2
    assert cache.match_prefix([2, 2])[0].numel() == 0
    assert cache.match_prefix([1, 1])[0].numel() == 2  # this match makes [3, 3] the oldest
    assert cache.evict(1) == 2
    assert cache.match_prefix([3, 3])[0].numel() == 0
    assert cache.match_prefix([1, 1])[0].numel() == 2


def test_eviction_climbs_to_a_parent_left_without_children():
    alloc, cache = make()
    cache_seq(cache, alloc, [1, 2, 3])
    cache_seq(cache, alloc, [1, 2, 4])  # [1, 2] -> {[3], [4]}
    cache_seq(cache, alloc, [9])
    cache.match_prefix([9])
    assert cache.evict(4) == 4  # both leaves, then their parent [1, 2]
    assert cache.total_size() == 1
    assert cache.match_prefix([9])[0].numel() == 1


def test_reset_frees_every_slot():
    alloc, cache = make()
    cache_seq(cache, alloc, [1, 2, 3])
    cache_seq(cache, alloc, [1, 5, 6, 7])
    cache.inc_lock_ref(cache.match_prefix([1, 2, 3])[1])
    cache.reset()
    assert alloc.available_size() == 64
    assert cache.total_size() == cache.evictable_size() == cache.protected_size() == 0
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0


def test_pretty_print_shows_each_node():
    alloc, cache = make()
    cache_seq(cache, alloc, [1, 2, 3])
    cache_seq(cache, alloc, [1, 2, 4])
    text = cache.pretty_print()
    assert "total=4" in text
    assert "[1 2] len=2" in text and "[3] len=1" in text and "[4] len=1" in text


# ----- property-based: a scheduler's use of the cache, checked against a model -----


class CacheMachine(RuleBasedStateMachine):
    """Random batches of requests (match, lock, allocate, insert, free duplicates), lookups,
    held locks and evictions. ``model`` maps each cached token, named by ``token_id``, to the
    slot the tree must hold for it."""

    page_size = 1
    capacity = 40
    seqs = st.lists(st.integers(0, 2), max_size=12)

    @initialize()
    def setup(self):
        self.alloc, self.cache = make(self.capacity, self.page_size)
        self.model: dict[tuple, int] = {}
        self.locks = []  # (node, key) held by "running requests"
        self.in_flight = []  # matched prefixes of the batch being served

    # -- helpers --

    def aligned(self, key):
        return len(key) // self.page_size * self.page_size

    def token_id(self, key, i):
        """Token i of key as the tree sees it: its whole page and everything before it."""
        return tuple(key[: (i // self.page_size + 1) * self.page_size]), i

    def expected_match(self, key):
        n, ps = 0, self.page_size
        while n + ps <= len(key) and self.token_id(key, n) in self.model:
            n += ps
        return [self.model[self.token_id(key, i)] for i in range(n)]

    def tree_contents(self):
        out = {}
        stack = [([], self.cache.root_node)]
        while stack:
            prefix, node = stack.pop()
            full = prefix + node.key
            for i, slot in enumerate(node.value.tolist(), start=len(prefix)):
                out[self.token_id(full, i)] = slot
            stack.extend((full, c) for c in node.children.values())
        return out

    def alloc_or_evict(self, n, last_slot):
        slots = self.alloc.alloc(n, last_slot)
        if slots is None:
            self.cache.evict(n)
            self.sync_model_after_evict()
            slots = self.alloc.alloc(n, last_slot)
        return slots

    def sync_model_after_evict(self):
        now = self.tree_contents()
        assert now.items() <= self.model.items()  # eviction only removes
        for key in [k for _, k in self.locks] + self.in_flight:
            assert not key or self.token_id(key, len(key) - 1) in now  # locked prefixes survive
        self.model = now

    # -- rules --

    @rule(size=st.integers(1, 3), data=st.data())
    def serve_batch(self, size, data):
        """Like one prefill batch: every request matches before any inserts."""
        reqs = []
        for _ in range(size):
            key = data.draw(self.seqs)
            prefix, node = self.cache.match_prefix(key)
            assert prefix.tolist() == self.expected_match(key)
            self.cache.inc_lock_ref(node)  # protect the prefix while we may evict
            reqs.append((key, prefix, node))
            self.in_flight.append(key[: len(prefix)])
        done = []
        for key, prefix, node in reqs:
            need = len(key) - len(prefix)
            first = data.draw(st.integers(0, need))  # prefill, then the rest "decoded"
            last = int(prefix[-1]) if len(prefix) else -1
            a = self.alloc_or_evict(first, last)
            b = None
            if a is not None:
                last = int(a[-1]) if len(a) else last
                b = self.alloc_or_evict(need - first, last)
                if b is None:
                    self.alloc.free(a)
            if b is None:  # does not fit: this request waits, its prefix unlocked
                self.cache.dec_lock_ref(node)
                self.in_flight.remove(key[: len(prefix)])
                continue
            done.append((key, prefix, node, torch.cat([prefix, a, b])))
        for key, prefix, node, value in done:
            present = self.cache.insert(key, value)
            n = self.aligned(key)
            for i in range(n):
                assert (self.token_id(key, i) in self.model) == (i < present)
                self.model.setdefault(self.token_id(key, i), int(value[i]))
            self.alloc.free(value[len(prefix) : present])  # duplicates of tree-owned slots
            self.alloc.free(value[n:])  # the unaligned tail page stays with the request
            self.cache.dec_lock_ref(node)
        self.in_flight.clear()

    @rule(data=st.data())
    def match(self, data):
        key = data.draw(self.seqs)
        slots, node = self.cache.match_prefix(key)
        assert slots.tolist() == self.expected_match(key)
        assert path_key(self.cache, node) == key[: len(slots)]

    @rule(data=st.data())
    def lock(self, data):
        key = data.draw(self.seqs)
        slots, node = self.cache.match_prefix(key)
        self.cache.inc_lock_ref(node)
        self.locks.append((node, key[: len(slots)]))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 10))
    def unlock(self, i):
        node, _ = self.locks.pop(i % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(n=st.integers(0, 60))
    def evict(self, n):
        before = self.cache.total_size()
        freed = self.cache.evict(n)
        assert self.cache.total_size() == before - freed
        assert freed >= n or self.cache.evictable_size() == 0
        self.sync_model_after_evict()

    @rule()
    def reset(self):
        self.cache.reset()
        self.locks.clear()
        self.model.clear()
        assert self.alloc.available_size() == self.capacity

    # -- invariants --

    @invariant()
    def tree_holds_exactly_the_model(self):
        assert self.tree_contents() == self.model

    @invariant()
    def no_leak_and_sizes_match_the_tree(self):
        cache, ps = self.cache, self.page_size
        assert self.alloc.available_size() + cache.total_size() == self.capacity
        evictable = protected = 0
        slots = []
        for node in cache._nodes():
            if node is cache.root_node:
                continue
            assert len(node.key) == len(node.value) > 0
            assert len(node.key) % ps == 0
            v = node.value
            # every node covers whole pages with token i at offset i % page_size
            assert (v % ps == torch.arange(len(v)) % ps).all()
            if node.lock_ref == 0:
                evictable += len(node.key)
            else:
                protected += len(node.key)
            slots += v.tolist()
        assert cache.evictable_size() == evictable
        assert cache.protected_size() == protected
        assert len(slots) == len(set(slots))  # each slot held by one node
        assert not self.alloc._is_free[torch.tensor(slots, dtype=torch.int64) // ps].any()

    @invariant()
    def lock_ref_counts_locks_in_subtree(self):
        held = {}
        for node, _ in self.locks:
            while node is not self.cache.root_node:
                held[node.id] = held.get(node.id, 0) + 1
                node = node.parent
        for node in self.cache._nodes():
            if node is not self.cache.root_node:
                assert node.lock_ref == held.get(node.id, 0)


class PagedCacheMachine(CacheMachine):
    page_size = 16
    capacity = 8 * 16
    # Whole pages from a small set (two of them share 15 tokens) plus a partial tail.
    pages = [[0] * 16, [0] * 15 + [1], [1] * 16]
    seqs = st.builds(
        lambda ps, tail: sum(ps, []) + tail,
        st.lists(st.sampled_from(pages), max_size=4),
        st.lists(st.integers(0, 1), max_size=15),
    )


_settings = settings(max_examples=100, stateful_step_count=20, deadline=None)
TestRadixCacheStateMachine = CacheMachine.TestCase
TestRadixCacheStateMachine.settings = _settings
TestPagedRadixCacheStateMachine = PagedCacheMachine.TestCase
TestPagedRadixCacheStateMachine.settings = _settings
