"""flashinfer on extend steps (prompt chunks): the short sequences' route to its paged MLA
kernel (`attention.FLASHINFER_EXTEND`, off until the model-level GPU test passes), checked on the
CPU with a float64 reference in flashinfer's place, and on the GPU against that reference
(kernel) and against the Triton kernels (a model's second prompt chunk, layer by layer)."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import torch
from test_flashinfer_mla import NEEDS_CUDA, NEEDS_FLASHINFER

from hetero.gpu import flashinfer_mla
from hetero.loader import load_model
from hetero.model import ForwardBatch
from hetero.model import attention as mla_module


def _fake_flashinfer(monkeypatch, wrapper) -> None:
    """flashinfer.mla with `wrapper` as its BatchMLAPagedAttentionWrapper, "installed"."""
    fake = ModuleType("flashinfer.mla")
    fake.BatchMLAPagedAttentionWrapper = wrapper
    monkeypatch.setitem(sys.modules, "flashinfer", ModuleType("flashinfer"))
    monkeypatch.setitem(sys.modules, "flashinfer.mla", fake)
    monkeypatch.setattr(flashinfer_mla, "available", lambda: True)


def _two_chunks(device: str = "cpu"):
    """Three sequences' prompts in two chunks over shuffled pages of 16: 5, 17 and 40 tokens,
    then 3, 260 and 9 more (8, 277 and 49 in all; the 260 take flash attention, the other two
    the latent kernels, a subset). -> (the two chunks' token ids, their ForwardBatches)."""
    first, more = [5, 17, 40], [3, 260, 9]
    lens = [a + b for a, b in zip(first, more)]
    g = torch.Generator().manual_seed(0)
    pages = torch.randperm(30, generator=g).add(1).tolist()
    tables = [pages[0:1], pages[1:19], pages[19:23]]
    ids = torch.randint(3, 200, (sum(lens),), generator=g).to(device)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    head = torch.cat([ids[s : s + n] for s, n in zip(starts, first)])
    tail = torch.cat([ids[s + n : s + m] for s, n, m in zip(starts, first, lens)])
    batches = (ForwardBatch.paged(tables, first, first, 16, device),
               ForwardBatch.paged(tables, more, lens, 16, device))  # fmt: skip
    return (head, tail), batches


def _latent_reference(q_lat, q_pe, latent, rope, tables, q_lens, ctx_lens, scale):
    """The absorbed attention of new tokens over their pages in float64, each sequence's new
    tokens the last of its context, masked causally: out_lat [T, h, C]."""
    outs, at = [], 0
    for table, q, n in zip(tables, q_lens, ctx_lens):
        kv = latent[table].reshape(-1, latent.shape[-1])[:n].double()  # [n, C]
        pe = rope[table].reshape(-1, rope.shape[-1])[:n].double()  # [n, R]
        ql, qp = q_lat[at : at + q].double(), q_pe[at : at + q].double()  # [q, h, C], [q, h, R]
        s = (ql @ kv.T + qp @ pe.T) * scale  # [q, h, n]
        pos = torch.arange(n - q, n, device=s.device)[:, None, None]  # [q, 1, 1]
        s = s.masked_fill(torch.arange(n, device=s.device) > pos, float("-inf"))
        outs.append(s.softmax(-1) @ kv)
        at += q
    return torch.cat(outs)


@pytest.mark.gpu
@NEEDS_CUDA
@NEEDS_FLASHINFER
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize(
    "q_lens, ctx_lens", [([3, 9], [8, 49]), ([5, 40], [5, 40]), ([1, 2], [300, 77])]
)
def test_flashinfer_extend_kernel_equals_the_reference(heads, q_lens, ctx_lens):
    """Prompt chunks over cached prefixes (and without), new tokens causal: flashinfer's kernel
    and mla_extend against the float64 reference over the same shuffled pages of 16."""
    from types import SimpleNamespace

    from hetero.gpu.flashinfer_mla import FlashInferMLA, shared_workspace
    from hetero.gpu.mla_extend import mla_extend

    g = torch.Generator(device="cuda").manual_seed(heads)
    need = [-(-n // 16) for n in ctx_lens]
    order = (torch.randperm(sum(need), device="cuda", generator=g) + 1).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(order[at : at + n])
        at += n
    table = torch.zeros(len(need), max(need), dtype=torch.int32, device="cuda")
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    latent = torch.randn(at + 1, 16, 512, device="cuda", generator=g).bfloat16()
    rope = torch.randn(at + 1, 16, 64, device="cuda", generator=g).bfloat16()
    T = sum(q_lens)
    # scores of std ~2.4 (0.1 x ~24): peaked softmaxes, where a wrong score, row or mask shows
    # (2026-12-05's first version scaled q by 0.05: near-uniform attention, a weaker check)
    q_lat = torch.randn(T, heads, 512, device="cuda", generator=g).bfloat16()
    q_pe = torch.randn(T, heads, 64, device="cuda", generator=g).bfloat16()
    scale = 0.1
    want = _latent_reference(q_lat, q_pe, latent, rope, tables, q_lens, ctx_lens, scale)
    starts = torch.tensor([0, *q_lens], device="cuda").cumsum(0).int()
    tri = mla_extend(q_lat, q_pe, latent, rope, table, starts,
                     torch.tensor(ctx_lens, dtype=torch.int32, device="cuda"), scale)  # fmt: skip
    fi = FlashInferMLA(shared_workspace({}, torch.device("cuda")))
    fi.plan(SimpleNamespace(page_table=table, ctx_lens=ctx_lens, q_lens=q_lens), 16, heads, 512,
            64, scale, torch.bfloat16)  # fmt: skip
    got = fi.run(q_lat, q_pe, latent, rope)
    rels = {name: ((o.double() - want).norm() / want.norm()).item()
            for name, o in (("triton", tri), ("flashinfer", got))}  # fmt: skip
    print(heads, q_lens, ctx_lens, rels)
    assert rels["triton"] < 1e-2 and rels["flashinfer"] < 1e-2, rels


class FakeWrapper:
    """flashinfer.mla.BatchMLAPagedAttentionWrapper's plan, recorded (the CPU has no
    flashinfer): what FlashInferMLA hands it."""

    def __init__(self, workspace, **kw):
        self.plans = []

    def plan(self, q_indptr, kv_indptr, kv_indices, kv_lens, *rest):
        self.plans.append((q_indptr.tolist(), kv_indptr.tolist(), kv_indices.tolist(),
                           kv_lens.tolist(), rest[4]))  # (rest[4]: causal)  # fmt: skip


class ReferenceWrapper(FakeWrapper):
    """flashinfer's wrapper as a float64 reference on any device: `run` attends each planned
    request's new tokens over the pages of its CSR page list, causal bottom-right (the CPU has
    no flashinfer; this checks what FlashInferMLA and the model hand it)."""

    def plan(self, q_indptr, kv_indptr, kv_indices, kv_lens, *rest):
        super().plan(q_indptr, kv_indptr, kv_indices, kv_lens, *rest)
        self.scale = rest[5]

    def run(self, q_lat, q_pe, latent, rope):
        q_ptr, kv_ptr, pages, lens, causal = self.plans[-1]
        tables = [pages[kv_ptr[i] : kv_ptr[i + 1]] for i in range(len(lens))]
        q_lens = [b - a for a, b in zip(q_ptr, q_ptr[1:])]
        assert causal == any(q > 1 for q in q_lens)
        out = _latent_reference(q_lat, q_pe, latent, rope, tables, q_lens, lens, self.scale)
        return out.to(q_lat.dtype)


def test_extend_route_hands_flashinfer_the_right_rows(tiny_v3, monkeypatch):
    """The extend route on the CPU with a reference in flashinfer's place: a second prompt
    chunk over cached prefixes (`_two_chunks`), its logits against the absorbed attention's. A
    wrong row, page or length in the route fails it."""
    _fake_flashinfer(monkeypatch, ReferenceWrapper)
    monkeypatch.setattr(flashinfer_mla, "applies", lambda cache: True)
    monkeypatch.setattr(mla_module, "FLASHINFER_EXTEND", True)
    (head, tail), (step1, step2) = _two_chunks()
    out, caches = {}, {}
    for attention in ("flashinfer", "absorbed"):
        model = load_model(tiny_v3, dtype=torch.float32, attention=attention, progress=False)
        cache = caches[attention] = model.new_paged_cache(32, 16)
        model(head, step1, cache)
        out[attention] = model(tail, step2, cache)
    plans = caches["flashinfer"].state["flashinfer_extend"].wrapper.plans
    assert [p[0] for p in plans] == [[0, 5, 22, 62], [0, 3, 12]]  # both chunks, once each
    assert plans[1][3] == [8, 49]  # the second chunk's short sequences: 0 and 2
    rel = (out["flashinfer"] - out["absorbed"]).norm() / out["absorbed"].norm()
    assert rel < 1e-4, rel


def test_extend_plans_a_subset_once_a_step(monkeypatch):
    """An extend step's short sequences (a subset) planned with their own rows of the page
    table, their new tokens causal; planned once for the step however many layers ask, again
    for a new batch."""
    _fake_flashinfer(monkeypatch, FakeWrapper)
    fi = flashinfer_mla.FlashInferMLA(torch.empty(8, dtype=torch.uint8))
    tables = [[4], [5, 6, 7], [8, 9]]
    batch = ForwardBatch.paged(tables, [3, 40, 1], [10, 40, 17], 16)
    for _ in range(3):  # three layers
        fi.plan(batch, 16, 4, 512, 64, 0.1, torch.bfloat16, subset=[0, 2])
    assert fi.wrapper.plans == [([0, 3, 4], [0, 1, 3], [4, 8, 9], [10, 17], True)]
    fi.plan(batch, 16, 4, 512, 64, 0.1, torch.bfloat16)  # the whole batch: a new plan
    step = ForwardBatch.paged(tables, [1, 1, 1], [11, 41, 18], 16)
    fi.plan(step, 16, 4, 512, 64, 0.1, torch.bfloat16)
    assert [p[4] for p in fi.wrapper.plans] == [True, True, False]  # decode: no mask
    assert fi.wrapper.plans[2][:2] == ([0, 1, 2, 3], [0, 1, 4, 6])


@pytest.mark.gpu
@NEEDS_CUDA
@NEEDS_FLASHINFER
def test_flashinfer_extend_equals_the_triton_kernels(tmp_path, monkeypatch):
    """A second prompt chunk over cached prefixes (`_two_chunks`): the short sequences through
    flashinfer's kernel (causal, bottom-right), the long one through flash attention, against
    "triton" (mla_extend for the short ones); each layer's attention output printed."""
    from hetero.testing import write_tiny_v3

    monkeypatch.setattr(mla_module, "FLASHINFER_EXTEND", True)  # (off until this test passes)
    path = write_tiny_v3(tmp_path, kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=16)
    (head, tail), (step1, step2) = _two_chunks("cuda")
    out, layers = {}, {}
    for attention in ("triton", "flashinfer"):
        model = load_model(path, device="cuda", dtype=torch.bfloat16, attention=attention,
                           progress=False)  # fmt: skip
        cache = model.new_paged_cache(32, 16)
        model(head, step1, cache)
        seen = []  # each layer's attention output of the second chunk
        hooks = [layer.self_attn.register_forward_hook(lambda m, a, o: seen.append(o.float()))
                 for layer in model.model.layers]  # fmt: skip
        out[attention] = model(tail, step2, cache).float()
        layers[attention] = seen
        for h in hooks:
            h.remove()
    rels = [((f - t).norm() / t.norm()).item() for f, t in zip(*layers.values())]
    print("attention output, layer by layer:", [round(r, 4) for r in rels])
    assert rels[0] < 1e-2, rels  # the first layer: the same inputs on both sides
    rel = (out["flashinfer"] - out["triton"]).norm() / out["triton"].norm()
    assert rel < 2e-2, rel
