"""The paged MLA decode kernel (hetero.gpu.mla_decode) against the model's absorbed attention
over the same pages: in Triton's interpreter on tiny shapes without CUDA, at DeepSeek-V3's
shapes on the GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from hetero.gpu.mla_decode import mla_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pages_for(ctx_lens: list[int], page: int, C: int, R: int, seed: int):
    """A layer's pages with each sequence's tokens in shuffled pages (page 0: padding)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page) for n in ctx_lens]
    P = sum(need) + 1
    order = (torch.randperm(P - 1, generator=g) + 1).tolist()
    table = torch.zeros(len(ctx_lens), max(need), dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(order[at : at + n], dtype=torch.int32)
        at += n
    latent = torch.randn(P, page, C, generator=g)
    rope = torch.randn(P, page, R, generator=g)
    return latent, rope, table


def reference(q_lat, q_pe, latent, rope, table, ctx_lens, scale):
    """Per sequence: its tokens gathered through the table, softmax over them (torch)."""
    out = torch.empty_like(q_lat)
    page = latent.shape[1]
    for b, n in enumerate(ctx_lens):
        rows = table[b, : -(-n // page)].long()
        lat = latent[rows].flatten(0, 1)[:n]  # [n, C]
        rp = rope[rows].flatten(0, 1)[:n]  # [n, R]
        s = (q_lat[b] @ lat.T + q_pe[b] @ rp.T) * scale  # [h, n]
        out[b] = s.softmax(-1) @ lat
    return out


@pytest.mark.parametrize(
    "ctx_lens, H, page, splits, block_h",
    [
        ([1, 17, 50], 5, 16, 1, 64),  # one token, page edges, heads fewer than a head block
        ([40, 3], 20, 16, 3, 16),  # two head blocks (16 + 4), splits of which one is empty for b=1
        ([33], 16, 32, 2, None),  # head_block's choice
    ],
)
def test_kernel_equals_torch_over_the_pages(ctx_lens, H, page, splits, block_h):
    C, R, scale = 32, 16, 0.3
    latent, rope, table = pages_for(ctx_lens, page, C, R, seed=sum(ctx_lens) + H)
    g = torch.Generator().manual_seed(1)
    q_lat, q_pe = (
        torch.randn(len(ctx_lens), H, C, generator=g),
        torch.randn(len(ctx_lens), H, R, generator=g),
    )
    want = reference(q_lat, q_pe, latent, rope, table, ctx_lens, scale)
    args = (q_lat, q_pe, latent, rope, table, torch.tensor(ctx_lens, dtype=torch.int32))
    got = mla_decode(*(t.to(DEVICE) for t in args), scale, splits=splits, block_h=block_h,
                     block_n=16)  # fmt: skip
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_one_split_stores_the_result_in_the_query_dtype():
    """16-bit queries and pages: one split (no merge kernel: the split stores fp16 itself) and
    two splits (merged) both give fp16 near the reference. (fp16: Triton 3.9's interpreter
    gets bf16 dots wrong; the gpu tests run the model's bf16.)"""
    C, R, H, lens = 32, 16, 4, [9, 30]
    latent, rope, table = pages_for(lens, 16, C, R, seed=4)
    g = torch.Generator().manual_seed(5)
    q_lat, q_pe = torch.randn(2, H, C, generator=g), torch.randn(2, H, R, generator=g)
    bf = [t.half() for t in (q_lat, q_pe, latent, rope)]
    want = reference(*[t.float() for t in bf], table, lens, 0.3)
    for splits in (1, 2):
        args = [t.to(DEVICE) for t in (*bf, table, torch.tensor(lens, dtype=torch.int32))]
        got = mla_decode(*args, 0.3, splits=splits, block_n=16)
        assert got.dtype == torch.float16 and got.shape == (2, H, C)
        torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-2)


def test_positions_read_as_context_lengths():
    """The model passes its int64 positions with lens_offset=1 (no cast kernel a layer): the
    same output as the int32 context lengths; other dtypes are refused."""
    C, R, H, lens = 32, 16, 4, [9, 30, 17]
    latent, rope, table = pages_for(lens, 16, C, R, seed=8)
    g = torch.Generator().manual_seed(9)
    q_lat = torch.randn(len(lens), H, C, generator=g)
    q_pe = torch.randn(len(lens), H, R, generator=g)
    pages = [t.to(DEVICE) for t in (q_lat, q_pe, latent, rope, table)]
    want = mla_decode(*pages, torch.tensor(lens, dtype=torch.int32).to(DEVICE), 0.3, block_n=16)
    positions = torch.tensor(lens, dtype=torch.int64).to(DEVICE) - 1
    got = mla_decode(*pages, positions, 0.3, block_n=16, lens_offset=1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="int32 or int64"):
        mla_decode(*pages, positions.float(), 0.3, lens_offset=1)


def test_strided_queries_as_an_einsum_leaves_them():
    """q_lat as `torch.einsum` returns it ([B, h, C] over an [h, B, C] buffer) and q_pe as a
    slice of a wider q: the same result as contiguous copies (no copy needed)."""
    C, R, H, lens = 32, 16, 4, [9, 30, 17]
    latent, rope, table = pages_for(lens, 16, C, R, seed=5)
    g = torch.Generator().manual_seed(4)
    q_lat = torch.randn(H, len(lens), C, generator=g).transpose(0, 1)  # strides (C, B*C, 1)
    q_pe = torch.randn(len(lens), H, 8 + R, generator=g)[..., 8:]  # strides (H*(8+R), 8+R, 1)
    assert not q_lat.is_contiguous() and not q_pe.is_contiguous()
    ctx = torch.tensor(lens, dtype=torch.int32)
    pages = [t.to(DEVICE) for t in (latent, rope, table, ctx)]
    got = mla_decode(q_lat.to(DEVICE), q_pe.to(DEVICE), *pages, 0.3, block_n=16)
    want = mla_decode(q_lat.contiguous().to(DEVICE), q_pe.contiguous().to(DEVICE), *pages, 0.3,
                      block_n=16)  # fmt: skip
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.cpu(), reference(q_lat, q_pe, latent, rope, table, lens, 0.3),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="last dim"):
        every_other = torch.randn(len(lens), H, 2 * C)[..., ::2]  # [B, h, C], last stride 2
        mla_decode(every_other.to(DEVICE), q_pe.to(DEVICE), *pages, 0.3)


def test_the_model_attention_agrees(tiny_v3):
    """The kernel on a real model's paged cache gives the model's own decode attention."""
    from hetero.loader import load_model
    from hetero.model import ForwardBatch
    from hetero.model.attention import _decode_latent

    model = load_model(tiny_v3, device="cpu", dtype=torch.float32, progress=False)
    mla = model.model.layers[0].self_attn
    if mla.kv_rank & (mla.kv_rank - 1) or mla.rope_dim & (mla.rope_dim - 1):
        pytest.skip("the tiny model's sizes are not powers of two")
    cache = model.new_paged_cache(8, 16)
    lens = [21, 5]
    table = [[1, 2], [3]]
    batch = ForwardBatch.paged(table, lens, lens, 16, "cpu")
    g = torch.Generator().manual_seed(0)
    cache.write(0, batch, torch.randn(sum(lens), mla.kv_rank, generator=g),
                torch.randn(sum(lens), mla.rope_dim, generator=g))  # fmt: skip
    step = ForwardBatch.paged(table, [1, 1], lens, 16, "cpu")
    q_lat = torch.randn(2, mla.n_heads, mla.kv_rank, generator=g)
    q_pe = torch.randn(2, mla.n_heads, mla.rope_dim, generator=g)
    want = _decode_latent(mla, q_lat, q_pe, step, cache)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    pages = (cache.latent[0], cache.rope[0], step.page_table, lens_t)
    got = mla_decode(q_lat, q_pe, *pages, mla.softmax_scale, block_n=16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("B, ctx", [(1, 1024), (16, 4096), (64, 333)])
def test_v3_shapes_on_the_gpu(B, ctx):
    C, R, H, page = 512, 64, 128, 64
    lens = [ctx - 7 * b % ctx for b in range(B)]
    latent, rope, table = pages_for(lens, page, C, R, seed=B)
    g = torch.Generator().manual_seed(2)
    q_lat, q_pe = torch.randn(B, H, C, generator=g) / 8, torch.randn(B, H, R, generator=g) / 8
    want = reference(q_lat, q_pe, latent, rope, table, lens, 0.1)
    args = [t.cuda().bfloat16() for t in (q_lat, q_pe, latent, rope)]
    got = mla_decode(*args, table.cuda(), torch.tensor(lens, dtype=torch.int32).cuda(), 0.1)
    err = ((got.float().cpu() - want).norm() / want.norm()).item()
    assert err < 2e-2, err  # bf16 inputs


def test_merge_kernel_equals_merge_splits_with_empty_splits():
    """The one-kernel merge against the torch reference: splits past a short context have
    lse -inf and contribute nothing; the result comes out in the asked dtype."""
    from hetero.gpu.mla_decode import merge, merge_splits

    g = torch.Generator().manual_seed(3)
    B, S, H, C = 3, 5, 4, 16
    out = torch.randn(B, S, H, C, generator=g)
    lse = torch.randn(B, S, H, generator=g) * 3
    lse[0, 2:] = float("-inf")  # sequence 0 only filled two splits
    out[0, 2:] = 0.0
    want = merge_splits(out, lse)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        got = merge(out.to(DEVICE), lse.to(DEVICE), dtype)
        assert got.dtype == dtype and got.shape == (B, H, C)
        torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)
    only = merge(out[:1, :1].to(DEVICE), lse[:1, :1].to(DEVICE), torch.float32)
    torch.testing.assert_close(only.cpu(), out[:1, 0])  # one split: its own output


@pytest.mark.parametrize("interleave", [True, False])
def test_rotation_in_the_kernel_equals_rope_first(interleave):
    """mla_decode rotating q_pe itself (positions read as context lengths) against
    hetero.gpu.rope's rotation, then the kernel: the same output, both rotary layouts; a
    rotation without positions is refused."""
    from hetero.gpu.rope import rope as rotate

    C, R, H, lens = 32, 32, 5, [7, 40, 19]
    latent, rope, table = pages_for(lens, 16, C, R, seed=11)
    g = torch.Generator().manual_seed(12)
    q_lat, q_pe = torch.randn(3, H, C, generator=g), torch.randn(3, H, R, generator=g)
    angles = torch.outer(torch.arange(64.0), torch.rand(R // 2, generator=g))
    cos, sin = angles.cos(), angles.sin()
    positions = torch.tensor([n - 1 for n in lens])
    args = [t.to(DEVICE) for t in (q_lat, q_pe, latent, rope, table, positions, cos, sin)]
    q_lat, q_pe, latent, rope, table, positions, cos, sin = args
    rotated = rotate(q_pe, positions, cos, sin, interleave)
    want = mla_decode(q_lat, rotated, latent, rope, table, positions, 0.3, lens_offset=1)
    got = mla_decode(q_lat, q_pe, latent, rope, table, positions, 0.3, lens_offset=1,
                     rotary=(cos, sin, interleave))  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rotary wants positions"):
        mla_decode(q_lat, q_pe, latent, rope, table, positions, 0.3, rotary=(cos, sin, True))


def test_split_count_fills_one_wave_before_splitting_further():
    """The default rule's splits: V3's 32 x 4K (64 head blocks, 132 SMs) takes 2 splits, one
    wave of 128 programs (the earlier ~2-an-SM rule took 5: 320 programs in 3 waves); batch 1
    splits a long context up to one split a 256 tokens; a short one or a full wave is not
    split; the choice never takes longer by the rule's own count than any other."""
    from hetero.gpu.mla_decode import split_count

    assert split_count(64, 4096, 64, 132) == 2
    assert split_count(2, 4096, 64, 132) == 16  # one split a 256 tokens
    assert split_count(2, 16, 64, 132) == 1
    assert split_count(128, 4096, 64, 132) == 1  # a full wave already
    assert split_count(2, 4096, 64, 1) == 1  # the interpreter: one slot

    def cdiv(a, b):
        return -(-a // b)

    def waves_x_steps(programs, longest, s, slots=132, block_n=64):
        return cdiv(programs * s, slots) * (cdiv(cdiv(longest, s), block_n) + 1)

    for programs in (2, 16, 64, 100, 256):
        for longest in (512, 4096, 32768):
            best = split_count(programs, longest, 64, 132)
            cap = -(-longest // 256)
            assert 1 <= best <= cap
            assert all(waves_x_steps(programs, longest, best) <= waves_x_steps(programs, longest, s)
                       for s in range(1, min(cap, 4 * 132 // programs) + 1))  # fmt: skip


def test_head_block_takes_16_heads_only_where_64_leave_most_of_a_wave_idle():
    """V3's 128 heads on 132 SMs: 16 heads a program at batch 1 (2 programs of 64, even split
    a 256 tokens up to 4K, fill less than half a wave) and at 8 x 1K; 64 from 4 x 4K and
    16 x 1K (where 64 measured faster), and at every long or large batch."""
    from hetero.gpu.mla_decode import head_block

    assert head_block(1, 128, 64, 132) == head_block(1, 128, 4096, 132) == 16
    assert head_block(8, 128, 1024, 132) == 16
    assert head_block(4, 128, 4096, 132) == head_block(16, 128, 1024, 132) == 64
    assert head_block(32, 128, 4096, 132) == head_block(1, 128, 32768, 132) == 64
    assert head_block(1, 16, 64, 1) == 64  # the interpreter: one slot
