"""Host-side bookkeeping of the paged KV cache: which blocks are free, who holds which, and the
prefix cache that lets requests share the blocks of a common prompt prefix.

The pool has `num_blocks` blocks of `block_size` positions (the tensors are in server/kv_cache.py;
nothing here touches them). A block is in one of three states:
- held: one or more sequences reference it (refcount > 0);
- cached: nobody holds it, but it carries a prefix hash, so a later request with the same
  adapter version and the same leading tokens can take it over without recomputing it;
- free: nobody holds it and it carries no hash.
Allocation takes free blocks first, then evicts cached ones, least recently released first.

A block's hash chains the adapter version key, the hash of the block before it and its own
tokens (sha256: token ids are user input, and a forged collision would hand one tenant's keys
and values to another). A prefix cached by one adapter version can therefore never serve another
version, or the base model. Only full blocks are cached, and a sequence never writes into a block
it got from the cache, so shared blocks need no copy-on-write.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from server.kv_cache import blocks_for

BlockHash = bytes


def block_hashes(adapter: str | None, token_ids: Sequence[int], block_size: int) -> Iterator[BlockHash]:
    """The chained hash of each full block of `token_ids` under `adapter` (None: the base model)."""
    parent = hashlib.sha256(b"adapter\0" + (adapter or "").encode() + (b"\1" if adapter else b"\0")).digest()
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        digest = hashlib.sha256(parent)
        digest.update(array("q", block).tobytes())  # int64 ids, native order: the keys never leave the process
        parent = digest.digest()
        yield parent


@dataclass
class PrefixStats:
    """Prompt tokens looked up in the prefix cache and tokens found there, per adapter name."""

    queries: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, queried: int, hit: int) -> None:
        self.queries[name] = self.queries.get(name, 0) + queried
        self.hits[name] = self.hits.get(name, 0) + hit


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one position")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._total_refs = 0  # sum(self._refs), kept as it changes (read every engine step)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: low blocks first
        self._cached: OrderedDict[int, None] = OrderedDict()  # refcount 0 with a hash, LRU first
        self._hash_of: dict[int, tuple[BlockHash, tuple[str, ...]]] = {}  # block -> (hash, adapter keys)
        self._by_hash: dict[BlockHash, int] = {}

    # ---- counts ----------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks an allocation can take now (free, plus cached ones it would evict)."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.available

    @property
    def references(self) -> int:
        """Block references held by all holders together (a shared block counts once per holder)."""
        return self._total_refs

    @property
    def cached(self) -> int:
        """Blocks that carry a prefix hash (held or not)."""
        return len(self._hash_of)

    def blocks_for(self, positions: int) -> int:
        return blocks_for(positions, self.block_size)

    # ---- allocation ------------------------------------------------------------------------
    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks for one holder, or None (nothing taken) when fewer are available."""
        if count > self.available:
            return None
        out = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently released cached block
                block, _ = self._cached.popitem(last=False)
                self._forget(block)
            self._refs[block] = 1
            out.append(block)
        self._total_refs += count
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """A holder lets go of its blocks. Cached ones stay reachable until evicted, least
        recently released first; of one sequence's blocks the last are evicted first, since its
        first ones (a shared system prompt) are the likeliest to be asked for again."""
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs < 0:
                raise RuntimeError(f"KV block {block} released more often than taken")
            self._refs[block] = refs
            self._total_refs -= 1
            if refs == 0:
                if block in self._hash_of:
                    self._cached[block] = None  # the newest end of the LRU order
                else:
                    self._free.append(block)

    # ---- prefix cache ----------------------------------------------------------------------
    def peek(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of `hashes` the cache holds (nothing is taken)."""
        count = 0
        if self.prefix_caching:
            for digest in hashes:
                if digest not in self._by_hash:
                    break
                count += 1
        return count

    def match(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, now also held by the caller."""
        found = [self._by_hash[digest] for digest in hashes[: self.peek(hashes)]]
        for block in found:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
        self._total_refs += len(found)
        return found

    def register(self, block: int, digest: BlockHash, adapters: tuple[str, ...] = ()) -> None:
        """Make a full, computed block findable by its hash (first writer wins: an equal block
        that another sequence computed meanwhile stays private to it)."""
        if not self.prefix_caching or digest in self._by_hash or block in self._hash_of:
            return
        self._by_hash[digest] = block
        self._hash_of[block] = (digest, adapters)

    def forget_adapter(self, adapter: str) -> int:
        """Drop every cached block of an adapter version (replaced or deleted): none is found
        again; unheld ones become free at once. Returns how many were dropped."""
        dropped = [block for block, (_, keys) in self._hash_of.items() if adapter in keys]
        for block in dropped:
            self._forget(block)
            if block in self._cached:
                del self._cached[block]
                self._free.append(block)
        return len(dropped)

    def _forget(self, block: int) -> None:
        digest, _ = self._hash_of.pop(block)
        del self._by_hash[digest]

    def check(self) -> str | None:
        """A consistency problem, or None (the tests' deep check; the engine compares references)."""
        free, cached = set(self._free), set(self._cached)
        if len(free) != len(self._free) or free & cached:
            return "a KV block is listed twice"
        held = {b for b, refs in enumerate(self._refs) if refs > 0}
        if sum(self._refs) != self._total_refs:
            return "the KV block reference count is off"
        if held & (free | cached) or len(held) + len(free) + len(cached) != self.num_blocks:
            return f"{self.num_blocks - len(held) - len(free) - len(cached)} KV block(s) are lost"
        return None
