"""The paged latent KV cache against the contiguous one: same model, same tokens, same logits.

The reference prefills every prompt whole into a contiguous `KVCache` row, then decodes all
sequences together. The paged runs hand pages out in a scrambled order, so a sequence's context
is spread over non-adjacent pages; the chunked schedule feeds prompts in 2-3 chunks (a chunk
attends to the prefix already cached) and mixes decoding sequences with prefilling ones in one
forward. Prompt lengths cross page boundaries of 16 and 64; page size 1 makes every token a page.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hetero.loader import load_model
from hetero.model import ForwardBatch

TOL = 1e-5  # fp32: max abs diff relative to the reference's max abs logit
PROMPTS = (5, 17, 64, 70, 130)
DECODE = 2  # tokens decoded after each prompt
CHUNKS = (5, 9, 40, 33, 48)  # per sequence: 17 -> 9+8, 64 -> 40+24, 70 -> 33+33+4, 130 -> 3 chunks
START = (2, 0, 1, 0, 0)  # the step each sequence joins: prefills meet decodes in one forward
PAGE_SIZES = (1, 16, 64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def sequences(vocab: int, seed: int = 0) -> list[list[int]]:
    """Each prompt followed by the tokens that will be decoded after it."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n + DECODE,), generator=g).tolist() for n in PROMPTS]


def contiguous_logits(
    model, seqs: list[list[int]], prompts: tuple[int, ...] = PROMPTS
) -> list[torch.Tensor]:
    """Logits [len, V] of every token of every sequence: whole prompts, then batched decodes."""
    B = len(seqs)
    cache = model.new_cache(B, max(map(len, seqs)))
    ids = [t for s, n in zip(seqs, prompts) for t in s[:n]]
    batch = ForwardBatch.build(list(range(B)), list(prompts), list(prompts))
    logits = model(torch.tensor(ids), batch, cache).split(prompts)
    out = [[x] for x in logits]
    for step in range(DECODE):
        ctx = [n + step + 1 for n in prompts]
        batch = ForwardBatch.build(list(range(B)), [1] * B, ctx)
        rows = model(torch.tensor([s[c - 1] for s, c in zip(seqs, ctx)]), batch, cache)
        for i in range(B):
            out[i].append(rows[i : i + 1])
    return [torch.cat(x) for x in out]


class PagedRun:
    """Runs steps of (sequence, new tokens) on a PagedKVCache, taking pages from a random
    permutation of 1..N-1 as each sequence grows; records every token's logits. `reserve`: the
    tokens a sequence gets pages for on its first step (the engine's admission takes pages for
    the whole prompt, so a chunk's page table reaches past its context)."""

    def __init__(
        self,
        model,
        seqs: list[list[int]],
        page_size: int,
        seed: int = 0,
        reserve: tuple[int, ...] | None = None,
    ) -> None:
        self.model, self.seqs, self.page_size = model, seqs, page_size
        self.reserve = reserve or (0,) * len(seqs)
        needed = sum(-(-len(s) // page_size) for s in seqs)
        num_pages = needed + 1 + 3  # the padding page, and a few never handed out
        self.cache = model.new_paged_cache(num_pages, page_size)
        g = torch.Generator().manual_seed(seed)
        self.unused = (torch.randperm(num_pages - 1, generator=g) + 1).tolist()
        self.pages: list[list[int]] = [[] for _ in seqs]
        self.done = [0] * len(seqs)  # tokens of each sequence in the cache
        self.logits: list[list[torch.Tensor]] = [[] for _ in seqs]

    def batch(self, work: list[tuple[int, int]]) -> tuple[torch.Tensor, ForwardBatch]:
        ids, q_lens, ctx_lens = [], [], []
        for i, n in work:
            start = self.done[i]
            while len(self.pages[i]) * self.page_size < max(start + n, self.reserve[i]):
                self.pages[i].append(self.unused.pop())
            ids += self.seqs[i][start : start + n]
            q_lens.append(n)
            ctx_lens.append(start + n)
        tables = [self.pages[i] for i, _ in work]
        return torch.tensor(ids), ForwardBatch.paged(tables, q_lens, ctx_lens, self.page_size)

    def step(self, work: list[tuple[int, int]]) -> None:
        ids, batch = self.batch(work)
        rows = self.model(ids, batch, self.cache).split([n for _, n in work])
        for (i, n), x in zip(work, rows):
            self.logits[i].append(x)
            self.done[i] += n

    def result(self) -> list[torch.Tensor]:
        assert self.done == [len(s) for s in self.seqs]  # every token went through the model
        return [torch.cat(x) for x in self.logits]


def chunked_schedule(seqs: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Steps of (sequence, tokens): prompts in chunks of CHUNKS[i] from step START[i] on, then one
    token a step until the sequence is done."""
    done, steps = [0] * len(seqs), []
    while any(d < len(s) for d, s in zip(done, seqs)):
        work = []
        for i, s in enumerate(seqs):
            if len(steps) < START[i] or done[i] == len(s):
                continue
            n = min(CHUNKS[i], PROMPTS[i] - done[i]) if done[i] < PROMPTS[i] else 1
            work.append((i, n))
            done[i] += n
        steps.append(work)
    return steps


@pytest.fixture(scope="module", params=["tiny_v3", "tiny_v2"])
def checkpoint(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module", params=["naive", "absorbed"])
def setup(request, checkpoint):
    """A model, its sequences, and the contiguous cache's logits for them."""
    model = load_model(checkpoint, dtype=torch.float32, progress=False, attention=request.param)
    seqs = sequences(model.config.vocab_size)
    return model, seqs, contiguous_logits(model, seqs)


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"sequence {i}"
        assert rel_err(g, w) < TOL, f"sequence {i} ({PROMPTS[i]} prompt tokens)"


def assert_unhanded_pages_untouched(run: PagedRun) -> None:
    """Writes land only in the pages a sequence holds: page 0 and the spare pages stay zero."""
    for p in [0, *run.unused]:
        assert not run.cache.latent[:, p].any() and not run.cache.rope[:, p].any(), p


def test_schedule_mixes_prefill_and_decode():
    steps = chunked_schedule(sequences(1000))
    kinds = [{n == 1 for _, n in work} for work in steps]
    assert {True, False} in kinds  # a step where one sequence decodes while another prefills
    assert kinds[-1] == {True} and len(steps[-1]) > 2  # and batched decodes of several lengths
    assert sum(1 for w in steps for i, n in w if i == 4 and n > 1) == 3  # 130 tokens: 3 chunks


@pytest.mark.parametrize("page_size", [1, 64])  # 16: test_chunked_prefill_mixed_batches
def test_prefill_then_decode(setup, page_size):
    model, seqs, want = setup
    run = PagedRun(model, seqs, page_size)
    B = len(seqs)
    run.step([(i, n) for i, n in enumerate(PROMPTS)])
    for _ in range(DECODE):
        run.step([(i, 1) for i in range(B)])
    flat = [p for pages in run.pages for p in pages]
    assert flat != sorted(flat)  # the pages really are scrambled
    assert_same(run.result(), want)
    assert_unhanded_pages_untouched(run)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_chunked_prefill_mixed_batches(setup, page_size):
    model, seqs, want = setup
    run = PagedRun(model, seqs, page_size, seed=1, reserve=PROMPTS)
    for work in chunked_schedule(seqs):
        run.step(work)
    assert_same(run.result(), want)
    assert_unhanded_pages_untouched(run)


def test_shared_prefix_pages(setup):
    """A prefix-cache hit: sequence 1 starts with sequence 0's first two pages, the same pages
    in both page tables, and computes only the tokens after them."""
    model, _, _ = setup
    ps, shared = 16, 2
    g = torch.Generator().manual_seed(6)
    first = torch.randint(2, model.config.vocab_size, (40 + DECODE,), generator=g).tolist()
    tail = torch.randint(2, model.config.vocab_size, (20 + DECODE,), generator=g).tolist()
    seqs = [first, first[: shared * ps] + tail]
    want = contiguous_logits(model, seqs, (40, shared * ps + 20))
    run = PagedRun(model, seqs, ps, seed=7)
    run.step([(0, 40)])
    run.pages[1], run.done[1] = run.pages[0][:shared], shared * ps
    run.step([(1, 20)])
    for _ in range(DECODE):
        run.step([(0, 1), (1, 1)])
    got = run.result()
    assert rel_err(got[0], want[0]) < TOL
    assert got[1].shape[0] == 20 + DECODE
    assert rel_err(got[1], want[1][shared * ps :]) < TOL
    assert run.pages[1][:shared] == run.pages[0][:shared]


def padded_step(run: PagedRun, work: list[tuple[int, int]], where: int) -> torch.Tensor:
    """`work` with a padding row (page table [0], one token at position 0) inserted at `where`;
    -> the logits of the real rows."""
    ids, batch = run.batch(work)
    tables = [run.pages[i] for i, _ in work]
    q_lens, ctx_lens = list(batch.q_lens), list(batch.ctx_lens)
    tables.insert(where, [0])
    q_lens.insert(where, 1)
    ctx_lens.insert(where, 1)
    at = sum(n for _, n in work[:where])
    ids = torch.cat([ids[:at], torch.tensor([7]), ids[at:]])
    padded = ForwardBatch.paged(tables, q_lens, ctx_lens, run.page_size)
    logits = run.model(ids, padded, run.cache)
    return torch.cat([logits[:at], logits[at + 1 :]])


def test_padding_row_changes_nothing(setup):
    """A padded row writes its KV to page 0; no real sequence ever reads it as context (shorter
    rows of a decode batch do read page 0 through their padded tables, but masked)."""
    model, seqs, want = setup
    run = PagedRun(model, seqs, 16)
    prefill = [(i, n) for i, n in enumerate(PROMPTS)]
    first = padded_step(run, prefill, where=2)
    for (i, n), x in zip(prefill, first.split([n for _, n in prefill])):
        run.logits[i].append(x)
        run.done[i] += n
    assert run.cache.latent[:, 0, 0].abs().sum() > 0  # the padding row did write page 0
    run.cache.latent[:, 0] = 1e4  # and whatever page 0 holds must not leak into a context
    run.cache.rope[:, 0] = -1e4
    for step in range(DECODE):
        work = [(i, 1) for i in range(len(seqs))]
        rows = padded_step(run, work, where=[0, 5][step])
        for i in range(len(seqs)):
            run.logits[i].append(rows[i : i + 1])
            run.done[i] += 1
    assert_same(run.result(), want)


@pytest.mark.parametrize("name", ["tiny_v3", "tiny_v2"])
def test_decode_different_context_lengths(request, name):
    """One decode batch (absorbed: every row over the longest context, the rest masked) whose
    contexts end inside, at and just past page boundaries."""
    path = request.getfixturevalue(name)
    model = load_model(path, dtype=torch.float32, progress=False, attention="absorbed")
    lens = [1, 2, 16, 17, 64, 65]
    g = torch.Generator().manual_seed(2)
    toks = [torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist() for n in lens]
    B = len(lens)
    work = [(i, n - 1) for i, n in enumerate(lens) if n > 1]  # all but the token decoded below
    q_lens = [n for _, n in work]
    ids = torch.tensor([t for i, n in work for t in toks[i][:n]])
    cache = model.new_cache(B, max(lens))
    model(ids, ForwardBatch.build([i for i, _ in work], q_lens, q_lens), cache)
    last = torch.tensor([s[-1] for s in toks])
    want = model(last, ForwardBatch.build(list(range(B)), [1] * B, lens), cache)
    for page_size in PAGE_SIZES:
        run = PagedRun(model, toks, page_size, seed=3)
        run.step(work)
        run.step([(i, 1) for i in range(B)])
        got = torch.cat([x[-1][-1:] for x in run.logits])
        assert rel_err(got, want) < TOL, page_size


@pytest.mark.parametrize("mha_min", [10**9, 3])
def test_triton_kernels_through_the_model(checkpoint, mha_min, monkeypatch):
    """The "triton" backend's kernels (mla_decode, mla_extend; here in Triton's interpreter on
    CPU tensors) in every layer, on chunked prefills mixed with decodes: the contiguous
    cache's logits. mha_min 3: chunks of 3 or more tokens run the decompressed form through
    scaled_dot_product_attention (after a cached prefix too), the rest of their batch the
    extend kernel."""
    from hetero.model import attention

    monkeypatch.setattr(attention, "MHA_MIN_TOKENS", mha_min)
    kernels_equal_contiguous(load_model(checkpoint, dtype=torch.float32, progress=False))


def kernels_equal_contiguous(model) -> None:
    """`model` through the kernels' path (kernel_attention in every layer) over a paged cache,
    on chunked prefills mixed with decodes: the contiguous cache's logits (torch attention)."""
    from hetero.model.attention import kernel_attention

    seqs = sequences(model.config.vocab_size)
    want = contiguous_logits(model, seqs)
    for block in model.model.layers:
        block.self_attn.attend = kernel_attention
    run = PagedRun(model, seqs, 16, seed=2, reserve=PROMPTS)
    for work in chunked_schedule(seqs):
        run.step(work)
    assert_same(run.result(), want)


@pytest.mark.gpu
def test_cuda_triton_greedy_equals_the_cpu(tiny_v2):
    """The V2 fixture on CUDA with the "triton" attention (fp32: the kernels' dots in TF32),
    through the serving engine with its CUDA graphs: the CPU engine's 32 greedy tokens."""
    from transformers import AutoTokenizer

    from hetero.engine.engine import Engine, ServingConfig
    from hetero.engine.params import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_v2)
    prompts = sequences(1024, seed=5)[:3]
    runs = []
    for device in ("cpu", "cuda"):
        model = load_model(tiny_v2, device=device, dtype=torch.float32, attention="triton",
                           progress=False)  # fmt: skip
        config = ServingConfig(page_size=16, kv_cache_tokens=2048, max_num_batched_tokens=128,
                               cuda_graph_max_batch=8)  # fmt: skip
        engine = Engine(model, tok, config)
        params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        rids = [engine.add_request(p, params) for p in prompts]
        out = {r: [] for r in rids}
        while engine.has_work:
            for o in engine.step():
                out[o.request_id] += o.token_ids
        runs.append([out[r] for r in rids])
    assert runs[0] == runs[1] and all(len(t) == 32 for t in runs[0])


def test_triton_kernels_read_an_fp8_kv_b_proj(tiny_v3):
    """Without the dense W_UK / W_UV copies (no `absorb()`), the kernels' path reads kv_b_proj's
    FP8 blocks itself (hetero.gpu.mla_absorb, interpreted here): the contiguous cache's logits
    of the same model, whose torch attention dequantizes kv_b_proj."""
    from hetero.model.fp8 import FP8Linear, block_quantize

    model = load_model(tiny_v3, dtype=torch.float32, progress=False)
    for block in model.model.layers:
        mla, dense = block.self_attn, block.self_attn.kv_b_proj
        fp8 = FP8Linear(dense.in_features, dense.out_features)
        fp8.weight.data, fp8.weight_scale_inv.data = block_quantize(dense.weight.data)
        mla.kv_b_proj = fp8
    assert model.model.layers[0].self_attn.w_uk is None
    kernels_equal_contiguous(model)
