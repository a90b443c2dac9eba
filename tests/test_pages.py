"""PagePool: page accounting, the prefix cache's keys and its LRU of released full pages.

Pages are keyed the way the engine keys them: a Request that has computed its tokens calls
`key_full_pages`, then `release` leaves its full pages cached for later prompts."""

from __future__ import annotations

import pytest

from hetero.engine.pages import PagePool, page_hash
from hetero.engine.params import SamplingParams
from hetero.engine.request import Request

PS = 4  # page size


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def admit(pool: PagePool, prompt: list[int], name: str = "r") -> Request:
    """What the scheduler does on admission: take the cached prefix, allocate the rest."""
    req = Request(name, prompt, SamplingParams(), seed=0, stop_ids=frozenset())
    hits, keys = pool.match_prefix(prompt)
    pool.acquire(hits)
    req.pages = hits + pool.allocate(pool.pages_for(len(prompt)) - len(hits))
    req.keys = list(keys)
    req.num_computed = len(hits) * PS
    return req


def compute(pool: PagePool, req: Request) -> None:
    """The prompt went through the model: its full pages get their keys."""
    req.num_computed = req.num_tokens
    req.key_full_pages(pool)


def served(pool: PagePool, prompt: list[int], name: str = "r") -> Request:
    """A request admitted, computed and finished: its full pages end up cached."""
    req = admit(pool, prompt, name)
    compute(pool, req)
    pool.release(req.pages)
    return req


def test_allocate_release_restores_num_free():
    pool = PagePool(9, PS)
    assert pool.capacity == 8 and pool.num_free == 8 and pool.num_used == 0
    a, b = pool.allocate(3), pool.allocate(5)
    assert pool.num_free == 0 and pool.num_used == 8
    assert len(set(a + b)) == 8  # no page handed out twice
    assert all(pool.refs[p] == 1 for p in a + b)
    pool.release(a)
    assert pool.num_free == 3 and all(pool.refs[p] == 0 for p in a)
    pool.release(b)
    assert pool.num_free == 8 and pool.num_used == 0
    assert sorted(pool.allocate(8)) == list(range(1, 9))  # unkeyed pages came back free


def test_page_zero_never_handed_out():
    pool = PagePool(6, PS)
    for _ in range(3):  # also after pages went round the free list and the cache
        pages = pool.allocate(pool.num_free)
        assert 0 not in pages and sorted(pages) == [1, 2, 3, 4, 5]
        pool.release(pages)
    served(pool, tokens(5 * PS))  # every page full and keyed, then cached
    assert len(pool.cached) == 5
    pages = pool.allocate(5)  # all five come from the LRU
    assert 0 not in pages and pool.stats.evictions == 5


def test_pool_needs_a_page_besides_padding():
    with pytest.raises(ValueError, match="at least 2"):
        PagePool(1, PS)


def test_allocate_beyond_num_free_raises():
    pool = PagePool(5, PS)
    pool.allocate(3)
    with pytest.raises(RuntimeError, match="2 pages asked, 1 free"):
        pool.allocate(2)
    assert pool.num_free == 1  # the failed call took nothing
    assert pool.allocate(1) and pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_pages_for():
    pool = PagePool(4, PS)
    assert [pool.pages_for(n) for n in (0, 1, PS, PS + 1, 3 * PS)] == [0, 1, 1, 2, 3]


@pytest.mark.parametrize(
    "cached_tokens, prompt_tokens, hit_pages",
    [
        (3 * PS, 3 * PS, 2),  # 3 full pages: the third holds the last token
        (3 * PS, 2 * PS, 1),  # exactly 2 full pages: the second holds the last token
        (3 * PS, 2 * PS + 1, 2),  # one more token: both full pages are a hit
        (3 * PS, PS, 0),
        (3 * PS, PS - 1, 0),  # no full page at all
        (3 * PS, 1, 0),
        (PS + 2, 3 * PS, 1),  # only the first page was full when it was keyed
    ],
)
def test_match_prefix_full_pages_never_the_last_token(cached_tokens, prompt_tokens, hit_pages):
    pool = PagePool(16, PS)
    first = served(pool, tokens(cached_tokens))
    assert len(first.keys) == cached_tokens // PS  # the partial last page has no key
    hits, keys = pool.match_prefix(tokens(prompt_tokens))
    assert hits == first.pages[:hit_pages]
    assert keys == first.keys[:hit_pages]


def test_match_prefix_stops_at_the_first_different_page():
    pool = PagePool(16, PS)
    first = served(pool, tokens(4 * PS))
    prompt = tokens(4 * PS)
    prompt[2 * PS + 1] = 7  # the third page differs
    hits, _ = pool.match_prefix(prompt + [1])
    assert hits == first.pages[:2]


def test_chained_hash_same_page_after_other_prefix_misses():
    pool = PagePool(16, PS)
    a, b, c = tokens(PS, 100), tokens(PS, 200), tokens(PS, 300)
    first = served(pool, a + b + [1])
    other = served(pool, c + [1], "other")
    assert pool.match_prefix(a + b + [1])[0] == first.pages[:2]
    hits, _ = pool.match_prefix(c + b + [1])  # b's page is cached, but after a, not after c
    assert hits == other.pages[:1]
    assert pool.match_prefix(b + [1])[0] == []  # nor is it a first page
    assert page_hash(page_hash(b"", a), b) != page_hash(page_hash(b"", c), b)


def test_acquire_takes_cached_page_out_of_lru():
    pool = PagePool(5, PS)
    first = served(pool, tokens(2 * PS + 1))  # 2 full pages cached, 1 partial page freed
    assert pool.num_free == 4 and list(pool.cached) == first.pages[1::-1]
    second = admit(pool, tokens(2 * PS + 1), "second")
    assert second.pages[:2] == first.pages[:2]
    assert [pool.refs[p] for p in second.pages[:2]] == [1, 1]
    assert not pool.cached and pool.num_free == 4 - 3  # two acquired, one allocated
    assert second.num_computed == 2 * PS
    # a held page is not free, so allocating everything else never evicts it
    rest = pool.allocate(pool.num_free)
    assert not set(rest) & set(second.pages) and pool.stats.evictions == 0


def test_shared_page_released_by_one_holder_stays_held():
    pool = PagePool(8, PS)
    prompt = tokens(2 * PS + 1)
    first = admit(pool, prompt, "first")
    compute(pool, first)
    second = admit(pool, prompt, "second")  # shares first's two full pages while both run
    shared = first.pages[:2]
    assert second.pages[:2] == shared and [pool.refs[p] for p in shared] == [2, 2]
    pool.release(first.pages)
    assert [pool.refs[p] for p in shared] == [1, 1]
    assert not set(shared) & set(pool.cached) and not set(shared) & set(pool.free)
    assert pool.num_free == 8 - 1 - 3  # only first's partial page came back
    pages = pool.allocate(pool.num_free)
    assert not set(pages) & set(shared)  # the pool never hands out a page still held
    pool.release(pages)
    pool.release(second.pages)
    assert [pool.refs[p] for p in shared] == [0, 0] and set(shared) <= set(pool.cached)
    assert pool.match_prefix(prompt)[0] == shared  # still keyed after the last holder left


def test_lru_evicts_least_recently_released_first():
    pool = PagePool(7, PS)
    reqs = [admit(pool, tokens(PS + 1, 100 * (i + 1)), f"r{i}") for i in range(3)]
    for r in reqs:
        compute(pool, r)
    for r in (reqs[1], reqs[0], reqs[2]):  # released in this order
        pool.release(r.pages)
    full = [r.pages[0] for r in reqs]
    assert list(pool.cached) == [full[1], full[0], full[2]]
    assert pool.num_free == 6 and len(pool.free) == 3  # the partial pages are plain free

    assert set(pool.allocate(3)).isdisjoint(full)  # never-keyed pages go before cached ones
    assert pool.stats.evictions == 0
    assert pool.allocate(1) == [full[1]]  # released first, evicted first
    assert pool.stats.evictions == 1
    assert pool.match_prefix(tokens(PS + 1, 200))[0] == []  # its key is forgotten
    assert full[1] not in pool.key_of and len(pool.page_of) == 2
    assert pool.match_prefix(tokens(PS + 1, 100))[0] == [full[0]]  # the others still hit
    assert pool.allocate(2) == [full[0], full[2]] and pool.stats.evictions == 3
    assert not pool.page_of and not pool.key_of and pool.num_free == 0


def test_lru_reuse_moves_page_to_the_back():
    pool = PagePool(4, PS)
    a, b = served(pool, tokens(PS + 1, 100), "a"), served(pool, tokens(PS + 1, 200), "b")
    assert list(pool.cached) == [a.pages[0], b.pages[0]]
    again = served(pool, tokens(PS + 1, 100), "a again")  # a's page used and released again
    assert again.pages[0] == a.pages[0]
    assert list(pool.cached) == [b.pages[0], a.pages[0]]
    pool.allocate(1)  # the free partial page first
    assert pool.allocate(1) == [b.pages[0]]
    assert pool.match_prefix(tokens(PS + 1, 100))[0] == [a.pages[0]]


def test_release_puts_later_pages_of_a_prompt_first_in_line():
    pool = PagePool(8, PS)
    first = served(pool, tokens(3 * PS + 1))
    assert list(pool.cached) == first.pages[2::-1]  # the third page goes first
    pool.allocate(len(pool.free))
    pool.allocate(1)
    hits, _ = pool.match_prefix(tokens(3 * PS + 1))
    assert hits == first.pages[:2]  # the shared prefix outlives the page after it


def test_register_keeps_the_first_page_for_a_key():
    pool = PagePool(8, PS)
    prompt = tokens(PS + 1)
    first = admit(pool, prompt, "first")
    second = admit(pool, prompt, "second")  # admitted before first computed: no hit
    assert second.pages[0] != first.pages[0]
    compute(pool, first)
    compute(pool, second)  # the same key again, for another page
    assert first.keys == second.keys
    assert pool.page_of[first.keys[0]] == first.pages[0]
    assert second.pages[0] not in pool.key_of
    pool.release(second.pages)
    assert second.pages[0] in pool.free and second.pages[0] not in pool.cached
    pool.release(first.pages)
    assert pool.match_prefix(prompt)[0] == [first.pages[0]]


def test_register_keeps_the_first_key_of_a_page():
    pool = PagePool(4, PS)
    page = pool.allocate(1)[0]
    k1, k2 = page_hash(b"", tokens(PS)), page_hash(b"", tokens(PS, 7))
    pool.register(page, k1)
    pool.register(page, k2)
    assert pool.key_of[page] == k1 and k2 not in pool.page_of


def test_key_full_pages_only_keys_computed_full_pages():
    pool = PagePool(8, PS)
    req = admit(pool, tokens(3 * PS + 2))
    req.num_computed = PS + 3  # a chunk stopped inside the second page
    req.key_full_pages(pool)
    assert len(req.keys) == 1 and list(pool.key_of) == [req.pages[0]]
    req.num_computed = 3 * PS + 2
    req.key_full_pages(pool)
    assert req.keys[-1] == page_hash(req.keys[1], tokens(3 * PS + 2)[2 * PS : 3 * PS])
    assert [pool.page_of[k] for k in req.keys] == req.pages[:3]
