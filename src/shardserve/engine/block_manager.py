"""Paged KV-cache bookkeeping: which blocks each sequence owns, and which full blocks can be
reused by a later sequence with the same prefix.

Note on the algorithm: the cache is ``num_blocks`` blocks of ``block_size`` tokens on every
rank; a sequence's block table lists its blocks in order. A block that is full gets a key
chained from its predecessor's: SHA-256 of (previous key, the block's token ids), and the
first block's "previous key" is a digest of the sequence's salt (its tenant). Equal keys mean
equal prefixes under the same salt: a collision would need a SHA-256 collision (Python's
``hash()`` is 64 bits and can be collided on purpose: vLLM's CVE-2025-25183), and one tenant
never hits another's blocks, so time to first token reveals nothing across tenants.
Freed blocks go to the back of an LRU free list but keep their key, so a later prompt with the
same prefix takes them back (a hit) until they are evicted for reuse from the front.
Reference counts let several sequences (``n`` > 1, shared system prompts) hold one block.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

BlockKey = bytes  # a SHA-256 digest


def _root(salt: str | None) -> BlockKey:
    return hashlib.sha256(b"shardserve-prefix\0" + (salt or "").encode()).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once the block is full and computed


@dataclass
class BlockTable:
    block_ids: list[int] = field(default_factory=list)
    num_keyed: int = 0  # leading blocks whose keys are registered
    salt: str | None = None  # whose prefix-cache namespace its blocks are keyed in


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[BlockKey, int] = {}  # key -> block id
        self.tables: dict[str, BlockTable] = {}
        self.hits = 0  # prompt tokens served from the prefix cache, since start

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ----------------------------------------------------------------------
    def _keys(self, tokens: list[int], count: int, prev: BlockKey, start: int = 0
              ) -> list[BlockKey]:
        keys, bs = [], self.block_size
        for i in range(start, start + count):
            prev = hashlib.sha256(prev + array("q", tokens[i * bs:(i + 1) * bs]).tobytes()
                                  ).digest()
            keys.append(prev)
        return keys

    def match_prefix(self, tokens: list[int], salt: str | None = None) -> list[int]:
        """Cached blocks holding the longest prefix of ``tokens`` under ``salt`` (leaving at
        least the last token to compute, so there are logits to sample from)."""
        if not self.prefix_caching:
            return []
        out = []
        for key in self._keys(tokens, (len(tokens) - 1) // self.block_size, _root(salt)):
            block_id = self.cached.get(key)
            if block_id is None:
                break
            out.append(block_id)
        return out

    # -- allocation ------------------------------------------------------------------------
    def can_allocate(self, seq_id: str, num_tokens: int, hits: list[int] = ()) -> bool:
        """Whether ``seq_id`` can hold ``num_tokens`` tokens (taking ``hits`` for a new one)."""
        have = len(self.tables[seq_id].block_ids) if seq_id in self.tables else len(hits)
        reclaim = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_needed(num_tokens) - have <= self.num_free - reclaim

    def allocate(self, seq_id: str, num_tokens: int, hits: list[int] = (),
                 salt: str | None = None) -> list[int]:
        """Grow ``seq_id``'s table to hold ``num_tokens``; returns the blocks added. A new
        sequence's blocks are keyed under ``salt``."""
        table = self.tables.get(seq_id)
        added = []
        if table is None:
            table = self.tables[seq_id] = BlockTable(num_keyed=len(hits), salt=salt)
            for b in hits:
                self._take(b)
                added.append(b)
            self.hits += len(hits) * self.block_size
        for _ in range(self.blocks_needed(num_tokens) - len(table.block_ids) - len(added)):
            block_id = next(iter(self.free))
            self._evict(block_id)
            self._take(block_id)
            added.append(block_id)
        table.block_ids.extend(added)
        return added

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        key = self.blocks[block_id].key
        if key is not None and self.cached.get(key) == block_id:
            del self.cached[key]
        self.blocks[block_id].key = None

    def has_new_full_blocks(self, seq_id: str, num_computed: int) -> bool:
        """Whether ``commit`` would register anything (cheap: no token list needed)."""
        table = self.tables[seq_id]
        full = min(num_computed // self.block_size, len(table.block_ids))
        return self.prefix_caching and full > table.num_keyed

    def commit(self, seq_id: str, tokens: list[int], num_computed: int) -> None:
        """Register the keys of ``seq_id``'s blocks that are now full and computed."""
        table = self.tables[seq_id]
        full = min(num_computed // self.block_size, len(table.block_ids))
        if not self.prefix_caching or full <= table.num_keyed:
            return
        prev = (self.blocks[table.block_ids[table.num_keyed - 1]].key if table.num_keyed
                else _root(table.salt))
        keys = self._keys(tokens, full - table.num_keyed, prev, table.num_keyed)
        for block_id, key in zip(table.block_ids[table.num_keyed:full], keys, strict=True):
            self.blocks[block_id].key = key
            self.cached.setdefault(key, block_id)
        table.num_keyed = full

    def free_seq(self, seq_id: str) -> None:
        """Release ``seq_id``'s blocks; tail blocks first in the LRU, so a shared prefix
        outlives the suffixes that hang off it."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            return
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None:
                    self.free[block_id] = None
                    self.free.move_to_end(block_id, last=False)  # nothing to keep: reuse first
                else:
                    self.free[block_id] = None

    def block_ids(self, seq_id: str) -> list[int]:
        return self.tables[seq_id].block_ids
