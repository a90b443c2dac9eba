"""The page pool of the paged latent KV cache, with its prefix cache (nano-vllm's block_manager).

Pages 1..N-1 are handed out (page 0 is the padding page a graph's unused rows write to). A page
that fills is keyed by a hash of every token up to its end, so a later request whose prompt starts
with the same tokens takes the page instead of computing it again. A page no request holds stays
cached (least recently freed first out) until the pool needs it for something else.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def page_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full page: its tokens chained to the key of the page before it."""
    data = np.asarray(tokens, dtype=np.int64).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


@dataclass
class PageStats:
    prompt_tokens: int = 0  # of requests admitted (each admission counts)
    hit_tokens: int = 0  # of those, found in the prefix cache
    evictions: int = 0  # cached pages given to another use


class PagePool:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (got {num_pages})")
        self.num_pages, self.page_size = num_pages, page_size
        self.refs = [0] * num_pages
        self.free: list[int] = list(range(num_pages - 1, 0, -1))  # never held nor cached
        self.cached: OrderedDict[int, None] = OrderedDict()  # held by none, kept for reuse (LRU)
        self.key_of: dict[int, bytes] = {}  # page -> its hash, for full pages
        self.page_of: dict[bytes, int] = {}  # hash -> page
        self.stats = PageStats()

    @property
    def capacity(self) -> int:
        """Pages a request can ever hold (all but the padding page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages that can be taken now: never used, or cached and held by nobody."""
        return len(self.free) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def match_prefix(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """The cached pages that start `tokens` (full pages only, and never the page holding the
        last token: its logits must be computed), with their keys."""
        pages, keys, key = [], [], b""
        ps = self.page_size
        for i in range((len(tokens) - 1) // ps):
            key = page_hash(key, tokens[i * ps : (i + 1) * ps])
            page = self.page_of.get(key)
            if page is None:
                break
            pages.append(page)
            keys.append(key)
        return pages, keys

    def acquire(self, pages: Sequence[int]) -> None:
        """Hold cached pages (a prefix hit)."""
        for p in pages:
            if self.refs[p] == 0:
                self.cached.pop(p, None)
            self.refs[p] += 1

    def allocate(self, n: int) -> list[int]:
        """n new pages (the caller checked num_free); cached pages go least recently used first."""
        if n > self.num_free:
            raise RuntimeError(f"{n} pages asked, {self.num_free} free")
        out = []
        for _ in range(n):
            if self.free:
                page = self.free.pop()
            else:
                page, _ = self.cached.popitem(last=False)
                del self.page_of[self.key_of.pop(page)]
                self.stats.evictions += 1
            self.refs[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Let go of a request's pages: full pages stay cached by their key, the rest are free.
        Released last page first, so a prompt's later pages are evicted before its earlier
        ones (which more requests share)."""
        for p in reversed(pages):
            self.refs[p] -= 1
            if self.refs[p] > 0:
                continue
            if p in self.key_of:
                self.cached[p] = None
            else:
                self.free.append(p)

    def register(self, page: int, key: bytes) -> None:
        """Page `page` is full and holds the tokens `key` names: later prompts may reuse it. A key
        already cached elsewhere keeps its page (this one is freed as usual when released)."""
        if key in self.page_of or page in self.key_of:
            return
        self.key_of[page] = key
        self.page_of[key] = page
