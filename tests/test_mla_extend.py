"""The paged MLA extend kernel (hetero.gpu.mla_extend) against causal attention in latent space over
the same pages: in Triton's interpreter on tiny shapes without CUDA (conftest sets
TRITON_INTERPRET=1), at DeepSeek-V3's shapes on the GPU."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from test_mla_decode import pages_for  # noqa: E402

from hetero.gpu.mla_extend import mla_extend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q_lat, q_pe, latent, rope, table, q_lens, ctx_lens, scale):
    """Per sequence, in fp32: its keys gathered through the table, causal softmax over them."""
    q_lat, q_pe, latent, rope = (t.float() for t in (q_lat, q_pe, latent, rope))
    out, page, t = torch.empty_like(q_lat), latent.shape[1], 0
    for b, (q, n) in enumerate(zip(q_lens, ctx_lens)):
        rows = table[b, : -(-n // page)].long()
        lat, rp = latent[rows].flatten(0, 1)[:n], rope[rows].flatten(0, 1)[:n]  # [n, C], [n, R]
        s = torch.einsum("thc,sc->ths", q_lat[t : t + q], lat)
        s = (s + torch.einsum("thr,sr->ths", q_pe[t : t + q], rp)) * scale  # [q, h, n]
        keys = torch.arange(n, device=s.device)
        future = keys[None, :] > torch.arange(n - q, n, device=s.device)[:, None]  # [q, n]
        out[t : t + q] = s.masked_fill(future[:, None], float("-inf")).softmax(-1) @ lat
        t += q
    return out


def launch(q_lat, q_pe, latent, rope, table, q_lens, ctx_lens, scale, **blocks):
    starts = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    args = (q_lat, q_pe, latent, rope, table, starts, lens)
    return mla_extend(*(t.to(DEVICE) for t in args), scale, **blocks)


def inputs(q_lens, ctx_lens, H, page, dtype, C=32, R=16, seed=0):
    latent, rope, table = pages_for(ctx_lens, page, C, R, seed=seed + sum(ctx_lens) + H)
    g = torch.Generator().manual_seed(seed)
    q_lat, q_pe = (
        torch.randn(sum(q_lens), H, C, generator=g),
        torch.randn(sum(q_lens), H, R, generator=g),
    )
    return [t.to(dtype) for t in (q_lat, q_pe, latent, rope)] + [table]


CASES = {  # q_lens, ctx_lens, heads, page_size (blocks: 4 tokens x 4 heads, 16 keys)
    "pure-prefill": ([11], [11], 3, 8),
    "long-prefix-short-chunk": ([3], [70], 4, 16),
    "decode-like-rows": ([1, 1], [1, 37], 3, 16),
    "ragged-page-below-key-block": ([1, 9, 5, 0], [33, 9, 21, 4], 4, 8),
    "ragged-page-above-key-block": ([6, 2], [6, 45], 5, 32),  # 5 heads: two head blocks
}


@pytest.mark.parametrize("q_lens, ctx_lens, H, page", CASES.values(), ids=CASES.keys())
def test_kernel_equals_torch_over_the_pages(q_lens, ctx_lens, H, page):
    args = inputs(q_lens, ctx_lens, H, page, torch.float32)
    want = reference(*args, q_lens, ctx_lens, 0.3)
    got = launch(*args, q_lens, ctx_lens, 0.3, block_m=4, block_h=4, block_n=16)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


# Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584, "not
# supported yet"): there fp16 takes the same 16-bit path, bf16 runs on the GPU only
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NO_BF16 = pytest.mark.skipif(INTERPRETED, reason="the interpreter's tl.dot has no bf16")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=NO_BF16)])
@pytest.mark.parametrize("block_m, block_h", [(16, 1), (1, 16), (2, 8)])
def test_16_bit_and_other_blockings(dtype, block_m, block_h):
    """16-bit inputs and output, fp32 accumulation: errors of the 16-bit rounding only."""
    q_lens, ctx_lens = [1, 9, 5], [33, 9, 21]
    args = inputs(q_lens, ctx_lens, 3, 8, dtype, seed=1)
    want = reference(*args, q_lens, ctx_lens, 0.3)
    got = launch(*args, q_lens, ctx_lens, 0.3, block_m=block_m, block_h=block_h, block_n=16)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-2)


def test_the_model_attention_agrees(tiny_v3):
    """On a real model's paged cache the kernel gives `absorbed_attention` (its per-sequence
    path): a chunk after a cached prefix, a whole prompt and a decode row in one batch."""
    from hetero.loader import load_model
    from hetero.model import ForwardBatch
    from hetero.model.attention import absorbed_attention

    model = load_model(tiny_v3, device="cpu", dtype=torch.float32, progress=False)
    mla = model.model.layers[0].self_attn
    if mla.kv_rank & (mla.kv_rank - 1) or mla.rope_dim & (mla.rope_dim - 1):
        pytest.skip("the tiny model's sizes are not powers of two")
    cache = model.new_paged_cache(8, 16)
    table, q_lens, ctx_lens = [[3, 1], [2], [5, 4]], [6, 7, 1], [19, 7, 21]
    whole = ForwardBatch.paged(table, ctx_lens, ctx_lens, 16, "cpu")
    g = torch.Generator().manual_seed(0)
    cache.write(0, whole, torch.randn(sum(ctx_lens), mla.kv_rank, generator=g),
                torch.randn(sum(ctx_lens), mla.rope_dim, generator=g))  # fmt: skip
    step = ForwardBatch.paged(table, q_lens, ctx_lens, 16, "cpu")
    q_nope = torch.randn(sum(q_lens), mla.n_heads, mla.nope_dim, generator=g)
    q_pe = torch.randn(sum(q_lens), mla.n_heads, mla.rope_dim, generator=g)
    want = absorbed_attention(mla, q_nope, q_pe, step, cache)  # [T, h, v]
    w_uk, w_uv = mla.wkv_b()
    q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk).contiguous()
    pages = (cache.latent[0], cache.rope[0], step.page_table)
    out_lat = launch(q_lat, q_pe, *pages, q_lens, ctx_lens, mla.softmax_scale, block_m=4, block_h=4)
    got = torch.einsum("thc,hdc->thd", out_lat, w_uv)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_launcher_rejects_bad_inputs():
    q_lens, ctx_lens = [2], [5]
    q_lat, q_pe, latent, rope, table = inputs(q_lens, ctx_lens, 3, 8, torch.float32)
    starts, lens = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    ok = (q_lat, q_pe, latent, rope, table, starts, lens)

    names = ("q_lat", "q_pe", "latent", "rope", "page_table", "q_starts", "ctx_lens")

    def call(**bad):
        mla_extend(**{**dict(zip(names, ok)), **bad}, scale=0.3)

    with pytest.raises(ValueError, match="3-D"):
        call(q_lat=q_lat[0])
    with pytest.raises(ValueError, match="do not agree"):
        call(q_pe=q_pe[:, :2])
    with pytest.raises(ValueError, match="q_lat, q_pe dtypes"):
        call(q_pe=q_pe.double())
    with pytest.raises(ValueError, match="latent, rope dtypes"):
        call(rope=rope.half())
    with pytest.raises(ValueError, match="int32"):
        call(q_starts=starts.long())
    with pytest.raises(ValueError, match="do not fit one batch"):
        call(q_starts=starts[:1])
    with pytest.raises(ValueError, match="C = 24"):
        call(q_lat=q_lat[..., :24], latent=latent[..., :24].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        call(q_lat=q_lat.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match="block_m \\* block_h = 8"):
        mla_extend(*ok, 0.3, block_m=2, block_h=4)


V3_BATCHES = {  # q_lens, ctx_lens
    "chunk-after-prefix": ([512], [3512]),  # 512 new tokens after a 3000-token prefix
    # chunks after prefixes, decode rows, whole prompts
    "ragged": ([512, 1, 77, 300, 1, 64], [3512, 4000, 77, 1000, 65, 64]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens, ctx_lens", V3_BATCHES.values(), ids=V3_BATCHES.keys())
def test_v3_shapes_on_the_gpu(q_lens, ctx_lens):
    C, R, H, page = 512, 64, 128, 64
    q_lat, q_pe, latent, rope, table = inputs(q_lens, ctx_lens, H, page, torch.float32, C, R)
    q_lat, q_pe, latent, rope = (t.cuda().bfloat16() for t in (q_lat / 8, q_pe / 8, latent, rope))
    want = reference(q_lat, q_pe, latent, rope, table.cuda(), q_lens, ctx_lens, 0.1)
    got = launch(q_lat, q_pe, latent, rope, table, q_lens, ctx_lens, 0.1)
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 2e-2, err  # bf16 inputs


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, S", [(2048, 2048), (1024, 3000)])
def test_v3_decompressed_form_on_the_gpu(q_len, S):
    """mha_sequence (flash attention over K = [W_UK latent, k_pe], V = W_UV latent) at V3's
    dims in bf16, with and without a cached prefix: the absorbed form's fp32 result."""
    from types import SimpleNamespace

    from hetero.model.attention import mha_sequence

    h, nope, r, v, c = 128, 128, 64, 128, 512
    g = torch.Generator(device="cuda").manual_seed(S)
    w_uk, w_uv = (torch.randn(h, d, c, generator=g, device="cuda") / c**0.5 for d in (nope, v))
    latent, k_pe = torch.randn(S, c, generator=g, device="cuda"), torch.randn(S, r, device="cuda")
    q_nope, q_pe = (torch.randn(q_len, h, d, generator=g, device="cuda") for d in (nope, r))
    scale = (nope + r) ** -0.5
    q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk)
    scores = torch.einsum("thc,sc->ths", q_lat, latent) + torch.einsum("thr,sr->ths", q_pe, k_pe)
    future = (
        torch.arange(S, device="cuda")[None, :] > torch.arange(S - q_len, S, device="cuda")[:, None]
    )
    probs = (scores * scale).masked_fill(future[:, None], float("-inf")).softmax(-1)
    want = torch.einsum("thc,hdc->thd", torch.einsum("ths,sc->thc", probs, latent), w_uv)
    bf = torch.bfloat16
    mla = SimpleNamespace(wkv_b=lambda: (w_uk.to(bf), w_uv.to(bf)), n_heads=h, nope_dim=nope,
                          rope_dim=r, v_dim=v, softmax_scale=scale)  # fmt: skip
    got = mha_sequence(mla, q_nope.to(bf), q_pe.to(bf), latent.to(bf), k_pe.to(bf))
    assert got.shape == (q_len, h, v)
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2
