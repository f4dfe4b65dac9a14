"""RadixAttention's prefix cache: a radix tree over token ids whose nodes own KV slots.

Each edge (a :class:`TreeNode`) holds a run of token ids ``key`` and the KV slots ``value`` of
those tokens, in order. The slots of a node belong to the tree: the tree frees them when it
evicts the node. Running requests lock the node where their cached prefix ends, which keeps that
node and its ancestors out of eviction.

Invariants:
- ``len(node.key) == len(node.value)``, and with ``page_size > 1`` both are page multiples, so
  every node covers whole pages.
- ``node.lock_ref`` is the number of locks on the node or any of its descendants.
- ``evictable_size()`` counts tokens in nodes with ``lock_ref == 0``; ``protected_size()`` the
  rest. Both are counters kept up to date on every change, not recomputed.
- Namespaces: each ``namespace`` (a LoRA adapter's uid; None is the base model) has its own
  root, so a prefix computed under one is never matched under another. Eviction and the
  counters span all of them; a root (``parent is None``) is never evicted.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import torch

from plait.core.memory import TokenSlotAllocator


class TreeNode:
    __slots__ = ("parent", "children", "key", "value", "lock_ref", "last_access_time", "id")

    _ids = itertools.count()

    def __init__(
        self,
        parent: TreeNode | None,
        key: list[int],
        value: torch.Tensor,
        last_access_time: int = 0,
    ):
        self.parent = parent
        self.children: dict = {}
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.last_access_time = last_access_time
        self.id = next(TreeNode._ids)  # breaks ties in the eviction heap

    @property
    def up(self) -> TreeNode:
        """The parent of a node that is not the root (every other node has one)."""
        assert self.parent is not None, "the root has no parent"
        return self.parent

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref})"


class RadixCache:
    """The prefix cache. Keys are token-id lists; values are int64 tensors of KV slots."""

    def __init__(self, allocator: TokenSlotAllocator, page_size: int = 1):
        if page_size != allocator.page_size:
            raise ValueError(
                f"page_size={page_size} differs from the allocator's {allocator.page_size}"
            )
        self.allocator = allocator
        self.page_size = page_size
        self.device = allocator.device
        self._new_tree()

    # ----- lookup and insertion -----

    def match_prefix(self, key: list[int], namespace: Any = None) -> tuple[torch.Tensor, TreeNode]:
        """Slots of the longest cached prefix of ``key`` (a page multiple) in ``namespace`` and
        the node where the match ends. A match ending inside a node splits it, so the returned
        node covers exactly the matched prefix. No match: an empty tensor and the root."""
        key = self._page_aligned(key)
        now = self._tick()
        node = self._root(namespace)
        values = []
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access_time = now
            n = self._match_len(child.key, key)
            if n < len(child.key):
                node = self._split(child, n)
                values.append(node.value)
                break
            values.append(child.value)
            node = child
            key = key[n:]
        if not values:
            return self._empty(), node
        return torch.cat(values), node

    def insert(self, key: list[int], value: torch.Tensor, namespace: Any = None) -> int:
        """Caches ``key`` (truncated to a page multiple) with its slots ``value``, in
        ``namespace``.

        Returns how many leading tokens were already in the tree. The tree keeps its own slots
        for those, so the caller frees ``value[own_cached_len:returned]``; the slots of the new
        suffix now belong to the tree.
        """
        if len(value) != len(key):
            raise ValueError(f"value has {len(value)} slots for a key of {len(key)} tokens")
        key = self._page_aligned(key)
        value = value[: len(key)]
        now = self._tick()
        node = self._root(namespace)
        present = 0
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access_time = now
            n = self._match_len(child.key, key)
            node = self._split(child, n) if n < len(child.key) else child
            present += n
            key = key[n:]
            value = value[n:]
        if key:
            # clone: the caller's tensor is often a view of a table it keeps writing to.
            leaf = TreeNode(node, list(key), value.clone(), now)
            node.children[self._child_key(key)] = leaf
            self._evictable += len(key)
        return present

    # ----- locking and eviction -----

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Locks ``node`` and its ancestors: a running request reads their slots."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.up

    def dec_lock_ref(self, node: TreeNode) -> None:
        if node.parent is not None and node.lock_ref <= 0:
            raise ValueError(f"node {node.id} is not locked")
        while node.parent is not None:
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            node = node.up

    def evict(self, num_tokens: int) -> int:
        """Frees least-recently-used unlocked leaves until ``num_tokens`` tokens are freed or
        nothing is evictable; a parent left childless becomes a candidate. Returns tokens freed."""
        heap: list[tuple[int, int, TreeNode]] = [
            (n.last_access_time, n.id, n) for n in self._unlocked_leaves()
        ]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self.allocator.free(node.value)
            parent = node.up
            del parent.children[self._child_key(node.key)]
            self._evictable -= len(node.key)
            freed += len(node.key)
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        return freed

    # ----- sizes and maintenance -----

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def reset(self) -> None:
        """Drops the whole tree, freeing every slot it held. Existing locks become void."""
        values = [n.value for n in self._nodes() if n.parent is not None]
        if values:
            self.allocator.free(torch.cat(values))
        self._new_tree()

    def pretty_print(self) -> str:
        lines = [
            f"RadixCache(total={self.total_size()}, evictable={self._evictable}, "
            f"protected={self._protected})"
        ]
        stack = [(c, 1) for r in self._roots.values() for c in reversed(list(r.children.values()))]
        while stack:
            node, depth = stack.pop()
            head = " ".join(map(str, node.key[:8])) + (" ..." if len(node.key) > 8 else "")
            lines.append(
                f"{'  ' * depth}[{head}] len={len(node.key)} lock={node.lock_ref} "
                f"t={node.last_access_time}"
            )
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        return "\n".join(lines)

    # ----- internals -----

    @property
    def root_node(self) -> TreeNode:
        """The base model's root."""
        return self._roots[None]

    def _root(self, namespace: Any) -> TreeNode:
        root = self._roots.get(namespace)
        if root is None:
            root = self._roots[namespace] = TreeNode(None, [], self._empty())
            root.lock_ref = 1  # never evicted, never counted
        return root

    def _new_tree(self) -> None:
        self._roots: dict[Any, TreeNode] = {}
        self._root(None)
        self._clock = 0
        self._evictable = 0
        self._protected = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _page_aligned(self, key: list[int]) -> list[int]:
        # A list copy: node keys are lists, and a tuple page never equals a list page.
        return list(key[: len(key) // self.page_size * self.page_size])

    def _child_key(self, key: list[int]):
        return key[0] if self.page_size == 1 else tuple(key[: self.page_size])

    def _match_len(self, a: list[int], b: list[int]) -> int:
        """Length of the common prefix of a and b, in whole pages."""
        ps, n = self.page_size, min(len(a), len(b))
        n -= n % ps
        if a[:n] == b[:n]:  # the usual case (a node matched whole): one C comparison
            return n
        i = 0
        if ps == 1:
            while i < n and a[i] == b[i]:
                i += 1
        else:
            while i < n and a[i : i + ps] == b[i : i + ps]:
                i += ps
        return i

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cuts ``child`` after ``n`` tokens; returns the new upper node. ``child`` keeps its
        identity as the lower part, so locks held on it stay valid."""
        parent = child.up
        upper = TreeNode(parent, child.key[:n], child.value[:n], child.last_access_time)
        upper.lock_ref = child.lock_ref  # same locks pass through both halves
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        parent.children[self._child_key(upper.key)] = upper
        return upper

    def _nodes(self):
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _unlocked_leaves(self) -> list[TreeNode]:
        return [
            n for n in self._nodes() if not n.children and n.lock_ref == 0 and n.parent is not None
        ]
