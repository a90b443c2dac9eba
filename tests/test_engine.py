"""The serving engine (hetero.engine.Engine) driven step by step on the shipped demo model.

Every greedy output is checked against hetero.generate (the static-batch reference, no pages,
no chunking, no prefix cache); a trained model keeps greedy argmax away from ties, so the tokens
must match exactly. The page pool is checked to come back whole after every scenario.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoTokenizer

from hetero.demo import demo_dir
from hetero.engine.engine import Engine, ServingConfig
from hetero.engine.outputs import RequestOutput
from hetero.engine.params import SamplingParams
from hetero.generate import SamplingParams as GenerateParams
from hetero.generate import generate
from hetero.loader import load_model

DEMO = demo_dir()
pytestmark = pytest.mark.skipif(DEMO is None, reason="the demo weights are not in hetero/demo/")
EOS = 1
MAX_STEPS = 2000  # a scenario that has not drained by then is stuck

# Prompts are slices of this text, encoded with the demo tokenizer (trained on such code).
SOURCE = '''import os
import sys
from collections import OrderedDict


class LRUCache:
    """A mapping that forgets the least recently used key once it holds `size` keys."""

    def __init__(self, size=128):
        self.size = size
        self.data = OrderedDict()

    def get(self, key, default=None):
        if key not in self.data:
            return default
        self.data.move_to_end(key)
        return self.data[key]

    def put(self, key, value):
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


def read_lines(path, encoding="utf-8"):
    """Return the lines of the file at path, without their line endings."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    cache = LRUCache(size=4)
    for name in args:
        if not os.path.exists(name):
            print("no such file:", name, file=sys.stderr)
            continue
        cache.put(name, read_lines(name))
    return 0
'''


@dataclass
class Demo:
    model: torch.nn.Module
    tok: object
    ids: list[int]  # SOURCE's token ids
    done: dict = field(default_factory=dict)  # (prompt, max_tokens) -> greedy tokens

    def reference(self, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
        """hetero.generate's greedy tokens for each prompt, never stopping early (ignore_eos)."""
        todo = [p for p in dict.fromkeys(map(tuple, prompts)) if (p, max_tokens) not in self.done]
        if todo:
            outs = generate(self.model, [list(p) for p in todo], GenerateParams(max_tokens))
            self.done.update({(p, max_tokens): out for p, out in zip(todo, outs)})
        return [self.done[tuple(p), max_tokens] for p in prompts]

    def engine(self, eos_ids: tuple[int, ...] = (EOS,), **config) -> Engine:
        return Engine(self.model, self.tok, ServingConfig(**config), eos_ids=eos_ids)

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def demo() -> Demo:
    model = load_model(DEMO, dtype=torch.float32, progress=False)
    tok = AutoTokenizer.from_pretrained(DEMO)
    return Demo(model, tok, tok.encode(SOURCE, add_special_tokens=False))


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def drain(engine: Engine, outs=None) -> dict[str, list[RequestOutput]]:
    """Steps the engine until it has no work; -> every request's outputs in order."""
    outs = defaultdict(list) if outs is None else outs
    for _ in range(MAX_STEPS):
        if not engine.has_work:
            return outs
        for out in engine.step():
            assert not outs[out.request_id] or not outs[out.request_id][-1].finished
            outs[out.request_id].append(out)
    raise AssertionError(f"the engine did not drain in {MAX_STEPS} steps")


def step(engine: Engine, outs: dict[str, list[RequestOutput]]) -> dict[str, RequestOutput]:
    got = {}
    for out in engine.step():
        assert out.request_id not in got, "two outputs for one request in one step"
        got[out.request_id] = out
        outs[out.request_id].append(out)
    return got


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for out in outs for t in out.token_ids]


def text(outs: list[RequestOutput]) -> str:
    return "".join(out.text for out in outs)


def record_schedule(engine: Engine, monkeypatch) -> list[list[tuple]]:
    """Each step's work as (request id, start, n, samples, prompt length), as scheduled."""
    steps, schedule = [], engine.scheduler.schedule

    def recording():
        work = schedule()
        steps.append([(w.request.id, w.start, w.n, w.samples, w.request.num_prompt) for w in work])
        return work

    monkeypatch.setattr(engine.scheduler, "schedule", recording)
    return steps


def assert_pool_whole(engine: Engine, free_at_start: int) -> None:
    pool = engine.pool
    assert pool.num_free == free_at_start == pool.capacity
    assert sum(pool.refs) == 0, "a page is still held"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.requests


# -- continuous batching ---------------------------------------------------------------------


def test_concurrent_greedy_requests_match_generate(demo, monkeypatch):
    prompts = [demo.ids[3 * i : 3 * i + 1 + 89 * i // 31] for i in range(32)]  # 1..90 tokens
    assert [len(p) for p in prompts][::31] == [1, 90]
    engine = demo.engine(page_size=16, kv_cache_tokens=4096, max_num_seqs=32,
                         max_num_batched_tokens=64)  # fmt: skip
    free = engine.pool.num_free
    steps = record_schedule(engine, monkeypatch)
    rids = [engine.add_request(p, greedy(8)) for p in prompts]
    outs = drain(engine)

    for rid, prompt, expected in zip(rids, prompts, demo.reference(prompts, 8)):
        assert tokens(outs[rid]) == expected, f"{rid}: {len(prompt)}-token prompt"
        last = outs[rid][-1]
        assert last.finish_reason == "length"
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), 8)
        assert text(outs[rid]) == demo.text(expected)
        assert all(o.finish_reason is None for o in outs[rid][:-1])
        assert outs[rid][0].ttft_s is not None and outs[rid][0].ttft_s >= 0
        assert last.tpot_s is not None and last.tpot_s >= 0
    assert_pool_whole(engine, free)

    assert all(sum(n for _, _, n, _, _ in work) <= 64 for work in steps)
    chunks = defaultdict(int)
    for work in steps:
        for rid, start, _, _, num_prompt in work:
            chunks[rid] += start < num_prompt
    assert max(chunks.values()) >= 2, "no prompt was split into chunks"
    mixed = [
        work
        for work in steps
        if any(start >= num_prompt for _, start, _, _, num_prompt in work)  # a decode token
        and any(start + n < num_prompt for _, start, n, _, num_prompt in work)  # a prompt chunk
    ]
    assert mixed, "no step mixed decode tokens with a prompt that was still prefilling"


def test_long_prompt_never_stalls_decoding_requests(demo):
    engine = demo.engine(page_size=16, kv_cache_tokens=1024, max_num_batched_tokens=16)
    free = engine.pool.num_free
    short_prompts = [demo.ids[i : i + 5] for i in (0, 20, 40)]
    short = [engine.add_request(p, greedy(16)) for p in short_prompts]
    outs = defaultdict(list)
    while not all(outs[rid] for rid in short):
        step(engine, outs)
    long_prompt = demo.ids[100:190]
    long = engine.add_request(long_prompt, greedy(8))

    prefill_steps = 0
    while not outs[long]:
        decoding = [r.id for r in engine.scheduler.running if r.num_output and not r.finished]
        got = step(engine, outs)
        prefill_steps += 1
        for rid in decoding:
            assert rid in got and len(got[rid].token_ids) == 1, f"{rid} stalled"
    assert prefill_steps >= 90 // 16 + 1, "the long prompt was not prefilled in chunks"
    drain(engine, outs)

    assert tokens(outs[long]) == demo.reference([long_prompt], 8)[0]
    for rid, expected in zip(short, demo.reference(short_prompts, 16)):
        assert tokens(outs[rid]) == expected
    assert_pool_whole(engine, free)


def test_a_prompt_longer_than_the_budget_is_served_alone(demo, monkeypatch):
    """Steps that only prefill (no request samples) must run too."""
    engine = demo.engine(page_size=16, kv_cache_tokens=512, max_num_batched_tokens=16)
    free = engine.pool.num_free
    steps = record_schedule(engine, monkeypatch)
    prompt = demo.ids[0:40]
    rid = engine.add_request(prompt, greedy(4))
    outs = drain(engine)
    assert [n for work in steps for _, _, n, _, _ in work][:3] == [16, 16, 8]
    assert tokens(outs[rid]) == demo.reference([prompt], 4)[0]
    assert_pool_whole(engine, free)


def test_preemption_recomputes_and_keeps_outputs(demo):
    prompts = [demo.ids[25 * i : 25 * i + 9 + 2 * i] for i in range(8)]  # 9..23 tokens
    # odd requests sample with a seed: their draws must not depend on a preemption either
    params = [
        greedy(8) if i % 2 == 0 else SamplingParams(max_tokens=8, temperature=0.8, seed=i)
        for i in range(8)
    ]
    roomy = demo.engine(page_size=4, kv_cache_tokens=1024, max_num_batched_tokens=64)
    rids = [roomy.add_request(p, sp) for p, sp in zip(prompts, params)]
    unhurried = drain(roomy)
    assert roomy.scheduler.preemptions == 0
    seeded = {i: tokens(unhurried[rids[i]]) for i in range(1, 8, 2)}

    # 16 pages of 4 tokens: two or three requests at once, each growing to 8 pages
    engine = demo.engine(page_size=4, kv_cache_tokens=64, max_num_batched_tokens=64)
    free = engine.pool.num_free
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    requests = [engine.requests[rid] for rid in rids]
    outs = drain(engine)

    assert engine.scheduler.preemptions > 0
    assert sum(r.preemptions for r in requests) == engine.scheduler.preemptions
    assert any(r.preemptions for r in requests[1::2]), "no seeded request was preempted"
    for i, (rid, expected) in enumerate(zip(rids, demo.reference(prompts, 8))):
        assert tokens(outs[rid]) == (expected if i % 2 == 0 else seeded[i]), rid
        assert outs[rid][-1].finish_reason == "length"
    assert_pool_whole(engine, free)


def test_abort_frees_pages_and_ends_the_stream(demo):
    engine = demo.engine(page_size=4, kv_cache_tokens=256, max_num_seqs=3,
                         max_num_batched_tokens=16)  # fmt: skip
    free = engine.pool.num_free
    prompts = [demo.ids[0:5], demo.ids[10:15], demo.ids[30:70], demo.ids[80:90]]
    decoding, kept, prefilling, waiting = rids = [engine.add_request(p, greedy(8)) for p in prompts]
    outs = defaultdict(list)
    step(engine, outs)  # 5 + 5 + 6 of the long prompt's 40 tokens
    step(engine, outs)
    assert outs[decoding] and engine.requests[prefilling].is_prefilling
    assert engine.requests[prefilling].num_computed > 0
    assert engine.requests[waiting] in engine.scheduler.waiting

    for rid in (decoding, prefilling, waiting):
        before = len(tokens(outs[rid]))
        out = engine.abort(rid)
        assert out is not None and out.finish_reason == "abort" and out.token_ids == ()
        assert out.usage.completion_tokens == before
        outs[rid].append(out)
        assert engine.abort(rid) is None, "a second abort must do nothing"
    assert engine.abort("no-such-request") is None
    drain(engine, outs)

    for rid in (decoding, prefilling, waiting):
        assert outs[rid][-1].finish_reason == "abort", f"{rid} got output after its abort"
    assert tokens(outs[kept]) == demo.reference([prompts[1]], 8)[0]
    assert rids[1] == kept
    assert_pool_whole(engine, free)


# -- prefix cache ----------------------------------------------------------------------------


def test_prefix_reuse_prefills_only_the_rest(demo, monkeypatch):
    engine = demo.engine(page_size=16, kv_cache_tokens=1024, max_num_batched_tokens=256)
    free = engine.pool.num_free
    steps = record_schedule(engine, monkeypatch)
    first = demo.ids[:40]  # two full pages and a half
    rid = engine.add_request(first, greedy(8))
    assert drain(engine)[rid][-1].usage.cached_tokens == 0
    hits, prompt_tokens = engine.pool.stats.hit_tokens, engine.pool.stats.prompt_tokens

    second = first + demo.ids[200:220]
    rid = engine.add_request(second, greedy(8))
    steps.clear()
    outs = drain(engine)
    assert outs[rid][-1].usage.cached_tokens == 32
    assert engine.pool.stats.hit_tokens == hits + 32
    assert engine.pool.stats.prompt_tokens == prompt_tokens + len(second)
    prefilled = [(start, n) for work in steps for r, start, n, _, _ in work if r == rid]
    assert prefilled[0][0] == 32, "the cached pages were computed again"
    assert sum(n for _, n in prefilled) == len(second) - 32 + 7
    assert tokens(outs[rid]) == demo.reference([second], 8)[0]
    assert_pool_whole(engine, free)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_chat_second_turn_reuses_the_first(demo):
    ps = 16
    engine = demo.engine(page_size=ps, kv_cache_tokens=2048, max_num_batched_tokens=512)
    free = engine.pool.num_free

    def prompt(messages):
        text = demo.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return demo.tok.encode(text, add_special_tokens=False)

    messages = [{"role": "user", "content": SOURCE[:300]}]
    turn1 = prompt(messages)
    params = SamplingParams(max_tokens=8, temperature=0)
    rid1 = engine.add_request(turn1, params)
    outs = drain(engine)
    reply = tokens(outs[rid1])
    messages += [
        {"role": "assistant", "content": text(outs[rid1])},
        {"role": "user", "content": "def main():"},
    ]
    turn2 = prompt(messages)
    rid2 = engine.add_request(turn2, params)
    outs = drain(engine, outs)

    cached = outs[rid2][-1].usage.cached_tokens
    # the first turn's pages hold its prompt and all but its last output token
    shared = common_prefix(turn2, (turn1 + reply)[:-1])
    assert shared >= 2 * ps
    assert cached == ps * min(shared // ps, (len(turn2) - 1) // ps)
    assert cached >= ps * ((common_prefix(turn1, turn2) - 1) // ps)
    expected = demo.reference([turn2], 8)[0]
    if EOS in expected:
        expected = expected[: expected.index(EOS) + 1]
    assert tokens(outs[rid2]) == expected
    assert_pool_whole(engine, free)


def test_eviction_reuses_cached_pages_and_stays_correct(demo):
    engine = demo.engine(page_size=4, kv_cache_tokens=48, max_num_batched_tokens=64)  # 12 pages
    free = engine.pool.num_free
    a = demo.ids[0:20]
    rid_a = engine.add_request(a, greedy(8))
    outs = drain(engine)
    a_tokens = a + tokens(outs[rid_a])
    assert engine.pool.stats.evictions == 0
    assert len(engine.pool.cached) == 27 // 4  # every full page of a's computed tokens

    b = demo.ids[60:84]  # 8 pages once it has its 8 tokens: some must come from the cache
    rid_b = engine.add_request(b, greedy(8))
    outs = drain(engine, outs)
    assert engine.pool.stats.evictions > 0
    assert tokens(outs[rid_b]) == demo.reference([b], 8)[0]

    # a's whole text again: its first pages may still be cached, the evicted ones were
    # overwritten by b and must be computed again, not matched by their old keys
    rid_a = engine.add_request(a_tokens, greedy(8))
    outs = drain(engine, outs)
    assert 0 < outs[rid_a][-1].usage.cached_tokens < len(a_tokens) - 4
    assert tokens(outs[rid_a]) == demo.reference([a_tokens], 8)[0]
    assert_pool_whole(engine, free)


# -- limits at submission ----------------------------------------------------------------------
