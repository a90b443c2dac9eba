"""The optional flashinfer attention backend (hetero.gpu.flashinfer_mla, `--attention
flashinfer`): its page-table conversion, its fallbacks where flashinfer does not apply (CPU,
contiguous caches, extend steps: the "triton" path), the one-line error without the package,
and on the GPU with flashinfer installed, its decode steps against the Triton kernel's."""

from __future__ import annotations

import pytest
import torch

from hetero.cli import main
from hetero.gpu import flashinfer_mla
from hetero.gpu.flashinfer_mla import page_indices
from hetero.loader import load_model
from hetero.model import ForwardBatch


def test_page_indices_are_each_contexts_pages_in_order():
    table = torch.tensor([[5, 2, 9], [7, 0, 0], [3, 4, 0]], dtype=torch.int32)
    indptr, indices = page_indices(table, [33, 1, 17], 16)  # 3, 1 and 2 pages
    assert indptr.tolist() == [0, 3, 4, 6] and indptr.dtype == torch.int32
    assert indices.tolist() == [5, 2, 9, 7, 3, 4] and indices.dtype == torch.int32
    with pytest.raises(ValueError, match="does not hold contexts"):
        page_indices(table, [33, 1, 49], 16)


def test_page_indices_keep_their_gather_while_page_counts_stay():
    """With a memo, a step whose rows need the pages they needed before reuses the gather's
    positions but reads the table as it is now; a new page count rebuilds them."""
    memo = {}
    table = torch.tensor([[5, 2, 9], [7, 0, 0]], dtype=torch.int32)
    page_indices(table, [33, 1], 16, memo)
    flat = memo["flat"]
    table[0, 1] = 4  # (another sequence in that row: same page counts)
    indptr, indices = page_indices(table, [34, 2], 16, memo)
    assert memo["flat"] is flat and indices.tolist() == [5, 4, 9, 7]
    assert indptr.tolist() == [0, 3, 4]
    indptr, indices = page_indices(table, [34, 17], 16, memo)  # row 1 takes a second page
    assert memo["flat"] is not flat and indices.tolist() == [5, 4, 9, 7, 0]
    assert indptr.tolist() == [0, 3, 5]


def test_flashinfer_backend_falls_back_where_it_does_not_apply(tiny_v3):
    """On the CPU (and over a contiguous cache) the backend is the "triton" one's fallback: the
    absorbed attention's logits, bit for bit."""
    prompts = [[3, 4, 5, 6], [7, 8]]
    logits = {}
    for attention in ("flashinfer", "auto", "absorbed"):
        model = load_model(tiny_v3, dtype=torch.float32, attention=attention, progress=False)
        cache = model.new_cache(2, 8)
        ids = torch.tensor([t for p in prompts for t in p])
        lens = [len(p) for p in prompts]
        model(ids, ForwardBatch.build([0, 1], lens, lens), cache)
        step = ForwardBatch.build([0, 1], [1, 1], [n + 1 for n in lens])
        logits[attention] = model(torch.tensor([9, 9]), step, cache)
    assert torch.equal(logits["flashinfer"], logits["absorbed"])
    assert torch.equal(logits["auto"], logits["absorbed"])


@pytest.mark.parametrize("installed", [False, True])
def test_auto_resolves_to_flashinfer_only_where_it_is_installed(tiny_v3, monkeypatch, installed):
    from hetero.model.attention import flashinfer_attention, paged_attention

    monkeypatch.setattr(flashinfer_mla, "available", lambda: installed)
    model = load_model(tiny_v3, dtype=torch.float32, attention="auto", progress=False)
    mla = model.model.layers[0].self_attn
    assert mla.backend == "auto"
    assert mla.attend is (flashinfer_attention if installed else paged_attention)


def test_auto_decodes_through_flashinfer_where_it_measured_faster(tiny_v3, monkeypatch):
    """Backend "auto" takes flashinfer's kernel from 8 sequences of 4K tokens (the H200's crossing);
    "flashinfer" wherever the kernel applies; neither where it does not (here: the CPU)."""
    assert flashinfer_mla.pays(8, 4096) and flashinfer_mla.pays(32, 8192)
    assert not flashinfer_mla.pays(4, 4096) and not flashinfer_mla.pays(64, 2048)
    cache = load_model(tiny_v3, dtype=torch.bfloat16, progress=False).new_paged_cache(4, 16)
    for backend in ("auto", "flashinfer"):
        assert not flashinfer_mla.decodes(backend, cache, 32, 8192)  # the CPU
    monkeypatch.setattr(flashinfer_mla, "applies", lambda cache: True)
    assert flashinfer_mla.decodes("flashinfer", cache, 1, 16)
    assert not flashinfer_mla.decodes("auto", cache, 1, 16)
    assert flashinfer_mla.decodes("auto", cache, 8, 4096)


def test_missing_flashinfer_is_a_one_line_error(tiny_v3, capsys, monkeypatch):
    monkeypatch.setattr(flashinfer_mla, "available", lambda: False)
    code = main(["generate", "--model", str(tiny_v3), "--prompt", "x", "--attention",
                 "flashinfer"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("hetero: error: attention 'flashinfer' needs the flashinfer package")


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NEEDS_FLASHINFER = pytest.mark.skipif(not flashinfer_mla.available(), reason="no flashinfer")


@pytest.mark.gpu
@NEEDS_CUDA
@NEEDS_FLASHINFER
@pytest.mark.parametrize("B, ctx, page", [(1, 300, 64), (8, 1000, 16), (32, 4096, 64)])
def test_flashinfer_kernel_equals_mla_decode(B, ctx, page):
    """V3's MLA (128 heads, kv_rank 512, rope 64), bf16, shuffled pages: flashinfer's decode
    against mla_decode over the same pages, contexts of different lengths."""
    from types import SimpleNamespace

    from hetero.gpu.flashinfer_mla import FlashInferMLA, shared_workspace
    from hetero.gpu.mla_decode import mla_decode

    g = torch.Generator(device="cuda").manual_seed(B)
    lens = [max(1, ctx - 37 * i) for i in range(B)]
    need = [-(-n // page) for n in lens]
    order = torch.randperm(sum(need), device="cuda", generator=g).int() + 1
    table = torch.zeros(B, max(need), dtype=torch.int32, device="cuda")
    at = 0
    for i, n in enumerate(need):
        table[i, :n], at = order[at : at + n], at + n
    latent = torch.randn(at + 1, page, 512, device="cuda", generator=g).bfloat16()
    rope = torch.randn(at + 1, page, 64, device="cuda", generator=g).bfloat16()
    q_lat = torch.randn(B, 128, 512, device="cuda", generator=g).bfloat16()
    q_pe = torch.randn(B, 128, 64, device="cuda", generator=g).bfloat16()
    scale = 0.1
    want = mla_decode(q_lat, q_pe, latent, rope, table, torch.tensor(lens, device="cuda"), scale)
    fi = FlashInferMLA(shared_workspace({}, torch.device("cuda")))
    fi.plan(SimpleNamespace(page_table=table, ctx_lens=lens, q_lens=[1] * B), page, 128, 512,
            64, scale, torch.bfloat16)  # fmt: skip
    got = fi.run(q_lat, q_pe, latent, rope)
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert got.shape == want.shape and rel < 1e-2, rel


@pytest.mark.gpu
@NEEDS_CUDA
@NEEDS_FLASHINFER
def test_flashinfer_decode_equals_the_triton_kernel(tmp_path):
    """A tiny V3 with V3's MLA head sizes (kv_rank 512, rope 64: what flashinfer's kernels
    take), bf16, 16-token pages in shuffled order, contexts of 5 to 40 tokens: a decode step
    through flashinfer's kernel against mla_decode's (the prefill runs the Triton extend path
    in both)."""
    from hetero.testing import write_tiny_v3

    path = write_tiny_v3(tmp_path, kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=16)
    lens = [5, 17, 40]
    g = torch.Generator().manual_seed(0)
    pages = torch.randperm(12, generator=g).add(1).tolist()
    tables = [pages[0:1], pages[1:3], pages[3:6]]  # enough for each context + 1
    out = {}
    for attention in ("triton", "flashinfer"):
        model = load_model(path, device="cuda", dtype=torch.bfloat16, attention=attention,
                           progress=False)  # fmt: skip
        cache = model.new_paged_cache(16, 16)
        ids = torch.randint(3, 200, (sum(lens),), generator=g.manual_seed(1)).cuda()
        model(ids, ForwardBatch.paged(tables, lens, lens, 16, "cuda"), cache)
        step = ForwardBatch.paged(tables, [1] * 3, [n + 1 for n in lens], 16, "cuda")
        out[attention] = model(torch.tensor([9, 9, 9], device="cuda"), step, cache).float()
    rel = (out["flashinfer"] - out["triton"]).norm() / out["triton"].norm()
    assert rel < 2e-2, rel


@pytest.mark.gpu
@NEEDS_CUDA
@NEEDS_FLASHINFER
def test_flashinfer_decode_through_cuda_graphs(tmp_path):
    """Decode steps replayed from CUDA graphs with flashinfer's plan fixed for the graphs' batch
    (4 rows, 3 real: one is padding) and planned again before each replay, against the same
    steps run eagerly: the logits of three steps."""
    from hetero.sched.graphs import GraphedDecoder
    from hetero.testing import write_tiny_v3

    path = write_tiny_v3(tmp_path, kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=16)
    model = load_model(path, device="cuda", dtype=torch.bfloat16, attention="flashinfer",
                       progress=False)  # fmt: skip
    lens = [5, 17, 40]
    tables = [[1], [2, 3], [4, 5, 6]]  # enough for each context + 3
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 200, (sum(lens),), generator=g).cuda()
    caches = [model.new_paged_cache(8, 16) for _ in range(2)]
    for cache in caches:  # the same prompts in both
        model(ids, ForwardBatch.paged(tables, lens, lens, 16, "cuda"), cache)
    decoder = GraphedDecoder(model, caches[1], graphs=True, batch=4, pages=4)
    assert decoder.mla_plan is not None  # flashinfer's, fixed for the graphs
    nxt = torch.tensor([9, 10, 11], device="cuda")
    for _ in range(3):
        lens = [n + 1 for n in lens]
        step = ForwardBatch.paged(tables, [1] * 3, lens, 16, "cuda")
        want = model(nxt, step, caches[0]).float()
        got = decoder.paged_step(nxt, step.positions, step.page_table, step.slot_mapping,
                                 step.ctx_lens).float()  # fmt: skip
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-2, rel
        nxt = want.argmax(-1)


def test_one_workspace_a_cache():
    """Every flashinfer plan over one cache shares one float scratch (made once, on the CPU
    here: the function only allocates)."""
    state = {}
    a = flashinfer_mla.shared_workspace(state, torch.device("cpu"))
    assert flashinfer_mla.shared_workspace(state, torch.device("cpu")) is a
    assert a.numel() == flashinfer_mla.WORKSPACE_BYTES and a.dtype == torch.uint8


def test_applies_only_to_a_16_bit_paged_cache_on_cuda(tiny_v3):
    """The one condition the attention backend and the graphs' plan both ask: never on the
    CPU, never over a contiguous cache (and on CUDA, never in fp32: tested on the GPU)."""
    model = load_model(tiny_v3, dtype=torch.bfloat16, progress=False)
    assert not flashinfer_mla.applies(model.new_paged_cache(4, 16))  # the CPU
    assert not flashinfer_mla.applies(model.new_cache(1, 8))
    if torch.cuda.is_available():
        paged = model.cuda().new_paged_cache(4, 16)
        assert flashinfer_mla.applies(paged)
        assert not flashinfer_mla.applies(model.float().new_paged_cache(4, 16))
