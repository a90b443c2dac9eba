"""The FP8 decode kernel (hetero.gpu.fp8_gemm) against dequantize-then-matmul: in Triton's
interpreter on tiny shapes without CUDA, on the GPU at DeepSeek-V3's shapes with it."""

from __future__ import annotations

import pytest
import torch

from hetero.model.fp8 import FP8Linear, block_dequantize, block_quantize

pytest.importorskip("triton")
from hetero.gpu.fp8_gemm import fp8_expert_gemm, fp8_gemm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x.float() @ block_dequantize(q, s, (128, 128)).T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "M, N, K, programs",
    [
        (1, 576, 256, 1),  # partial row block (DeepSeek's kv_a_proj has 576 rows), no split
        (3, 200, 384, 8),  # split-K over 3 K blocks, partial last row tile
        (17, 130, 300, 4),  # two token tiles, partial K block, a split with no K block left
        (5, 64, 128, 1),
    ],
)
def test_fp8_gemm_equals_dequantized_matmul(M, N, K, programs):
    g = torch.Generator().manual_seed(M * N + K)
    q, s = block_quantize(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g)
    q, s, x = q.to(DEVICE), s.to(DEVICE), x.to(DEVICE)
    want = reference(x, q, s)
    assert rel(fp8_gemm(x, q, s, programs=programs), want) < 1e-5  # fp32: exact but for order
    xb = x.bfloat16()
    got = fp8_gemm(xb, q, s, programs=programs)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # bf16 activations are exact in the kernel's tf32; the output is rounded to bf16 once
    assert rel(got, reference(xb, q, s)) < 4e-3


@pytest.mark.parametrize("programs", [1, 8])  # no split; split-K
@pytest.mark.parametrize("silu_mul", [False, True])
def test_one_row_without_the_mma_tile(programs, silu_mul):
    """Tiles(mma=False), the default: one token's row dots on the CUDA cores (more rows keep
    the MMA), with K blocks unrolled 1, 2 or 4 an iteration; and one token through the 16-row
    MMA tile (mma=True)."""
    from hetero.gpu.fp8_gemm import Tiles

    g = torch.Generator().manual_seed(programs)
    N, K = 256, 300  # two scale-block rows; a partial K block
    q, s = block_quantize(torch.randn(N, K, generator=g))
    q, s = q.to(DEVICE), s.to(DEVICE)
    variants = [(1, Tiles()), (1, Tiles(mma=True)), (1, Tiles(block_n=32)), (3, Tiles())]
    variants += [(1, Tiles(k_unroll=2)), (1, Tiles(k_unroll=4, block_n=32))]  # 3 K blocks
    for M, tiles in variants:
        x = torch.randn(M, K, generator=g).to(DEVICE)
        got = fp8_gemm(x, q, s, programs=programs, silu_mul=silu_mul, tiles=tiles)
        want = reference(x, q, s)
        if silu_mul:
            gate, up = want.chunk(2, dim=-1)
            want = torch.nn.functional.silu(gate) * up
        assert rel(got, want) < 1e-5, (M, tiles)
    xb = torch.randn(1, K, generator=g).bfloat16().to(DEVICE)
    got = fp8_gemm(xb, q, s, programs=programs, tiles=Tiles(mma=False))
    assert rel(got, reference(xb, q, s)) < 4e-3  # the bf16 output's rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("M", [1, 16])
def test_cuda_tile_variants_at_v3_width(M, silu_mul):
    """The one-row CUDA-core path (4 and 8 warps) and the MMA tile at V3's width
    against dequantize-then-matmul, with and without the tile counters."""
    from hetero.gpu.fp8_gemm import Tiles, tile_counters

    g = torch.Generator().manual_seed(M)
    q, s = block_quantize(torch.randn(4096, 7168, generator=g) / 128)
    q, s = q.cuda(), s.cuda()
    x = torch.randn(M, 7168, generator=g).bfloat16().cuda()
    want = reference(x, q, s)
    if silu_mul:
        gate, up = want.bfloat16().chunk(2, dim=-1)
        want = (torch.nn.functional.silu(gate) * up).float()
    counters = tile_counters(4096, 16, q.device)
    for tiles in (Tiles(), Tiles(mma=True), Tiles(num_warps=8), Tiles(k_unroll=2),
                  Tiles(k_unroll=4)):  # fmt: skip
        for c in (None, counters):
            got = fp8_gemm(x, q, s, silu_mul=silu_mul, tiles=tiles, counters=c)
            assert rel(got, want) < (2e-2 if silu_mul else 4e-3), (tiles, c is None)
    assert counters.count_nonzero().item() == 0


def test_fp8_gemm_keeps_leading_dims_and_strides():
    g = torch.Generator().manual_seed(1)
    q, s = block_quantize(torch.randn(96, 256, generator=g))
    x = torch.randn(2, 3, 512, generator=g)[..., ::2]  # [2, 3, 256], not contiguous
    got = fp8_gemm(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), programs=2)
    assert got.shape == (2, 3, 96)
    assert rel(got.cpu(), reference(x.reshape(6, 256), q, s).view(2, 3, 96)) < 1e-5


@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize(
    "M, N, K, programs", [(1, 256, 384, 8), (3, 384, 300, 16), (17, 256, 640, 64)]
)
def test_split_k_summed_by_the_last_split_equals_the_sum_kernel(M, N, K, programs, silu_mul):
    """With tile counters the last split of a tile sums the partials (no second kernel): the
    same y bit for bit (the same order), and the counters are back to zero for the next call."""
    from hetero.gpu.fp8_gemm import tile_counters

    g = torch.Generator().manual_seed(M + N + K)
    q, s = block_quantize(torch.randn(N, K, generator=g))
    q, s = q.to(DEVICE), s.to(DEVICE)
    counters = tile_counters(N, 64, q.device)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
        want = fp8_gemm(x, q, s, programs=programs, silu_mul=silu_mul)
        for _ in range(2):  # a second call finds the counters reset
            got = fp8_gemm(x, q, s, programs=programs, silu_mul=silu_mul, counters=counters)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert counters.count_nonzero().item() == 0
    with pytest.raises(ValueError, match="counters for"):
        fp8_gemm(x, q, s, programs=programs, counters=counters[:1])


@pytest.mark.parametrize("programs", [1, 16])  # no split; split-K
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_silu_mul_equals_the_swiglu_half(programs, dtype):
    """gate|up rows in one weight: silu(x gate^T) * (x up^T), rounded as torch's ops round."""
    g = torch.Generator().manual_seed(programs)
    I, K = 128, 256
    q, s = block_quantize(torch.randn(2 * I, K, generator=g))
    x = torch.randn(2, 3, K, generator=g).to(dtype)
    got = fp8_gemm(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), programs=programs, silu_mul=True)
    gate, up = reference(x.reshape(6, K), q, s).to(dtype).chunk(2, dim=-1)
    want = (torch.nn.functional.silu(gate) * up).view(2, 3, I)
    assert got.dtype == dtype and got.shape == (2, 3, I)
    # bf16: the tf32 dot's own ~0.3% (truncated in the interpreter) on gate and up, compounded
    assert rel(got.cpu(), want.float()) < (1e-5 if dtype == torch.float32 else 2e-2)
    with pytest.raises(ValueError, match="even"):
        fp8_gemm(x.to(DEVICE), q[:-1].to(DEVICE), s.to(DEVICE), silu_mul=True)


@pytest.mark.parametrize("programs", [1, 16])  # no split; split-K
def test_fp8_expert_gemm_uses_each_rows_expert(programs):
    g = torch.Generator().manual_seed(programs)
    N, K, E = 200, 300, 3
    qs = [block_quantize(torch.randn(N, K, generator=g)) for _ in range(E)]
    w, s = torch.stack([q for q, _ in qs]), torch.stack([sc for _, sc in qs])
    experts = torch.tensor([2, -1, 0, 2, 1], dtype=torch.int32)
    x = torch.randn(5, K, generator=g)
    got = fp8_expert_gemm(x.to(DEVICE), experts.to(DEVICE), w.to(DEVICE), s.to(DEVICE),
                          programs=programs).cpu()  # fmt: skip
    assert got.shape == (5, N)
    for m, e in enumerate(experts.tolist()):
        if e < 0:
            assert (got[m] == 0).all()  # no expert: zeros, whatever the buffer held
        else:
            assert rel(got[m], reference(x[m : m + 1], *qs[e])[0]) < 1e-5


def fp8_experts(H: int, I: int, ids: tuple[int, ...]):
    from torch import nn

    from hetero.model.fp8 import to_fp8
    from hetero.model.layers import MLP

    experts = nn.ModuleDict({str(e): MLP(H, I) for e in ids})
    to_fp8(experts, lambda name: True, (128, 128))
    for m in experts.modules():
        if isinstance(m, FP8Linear):
            w = torch.randn(m.out_features, m.in_features) / m.in_features**0.5
            m.weight.data, m.weight_scale_inv.data = block_quantize(w)
    return experts.to(DEVICE)


def stacked_against_loop(H, I, E, resident, ids, dtype, tol):
    from hetero.gpu.experts import StackedFP8Experts
    from hetero.model.moe import torch_routed_experts

    experts = fp8_experts(H, I, resident)
    T, k = ids.shape
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    weights = torch.rand(T, k, device=DEVICE)
    on_gpu = torch.isin(ids, torch.tensor(resident, device=DEVICE))
    want = torch_routed_experts(experts, x, ids.masked_fill(~on_gpu, -1), weights)
    assert StackedFP8Experts.supports(experts)
    got = StackedFP8Experts(experts, E)(x, ids, weights)
    assert got.dtype == dtype and rel(got, want.float()) < tol
    again = torch_routed_experts(experts, x, ids.masked_fill(~on_gpu, -1), weights)
    assert torch.equal(again, want)  # the modules now read the stacks: same numbers
    return got, want


def test_stacked_fp8_experts_equal_the_module_loop():
    """A layer's GPU experts stacked and run over the tokens x top-k slots give what the
    per-expert loop gives on the same FP8 modules, which still work (views of the stacks)."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 2, 6, -1], [4, 4, 0, 1], [3, 5, 7, 0]], device=DEVICE)
    got, want = stacked_against_loop(256, 128, 8, (1, 4, 6), ids, torch.float32, 1e-5)
    assert (got[2] == 0).all() and want[2].abs().sum() == 0  # token 2 has no GPU expert


@pytest.mark.gpu
def test_cuda_stacked_fp8_experts_at_v3_width():
    """DeepSeek-V3's expert shapes, bf16 activations, 20 resident experts of 256 (the 80 GB
    config), 4 tokens x top-8: the kernel path against the module loop."""
    torch.manual_seed(1)
    ids = torch.stack([torch.randperm(256)[:8] for _ in range(4)]).to(DEVICE)
    ids[:, :2] = torch.tensor([[3, 17], [0, 19], [5, 5 + 200], [11, 12]])  # some on the GPU
    stacked_against_loop(7168, 2048, 256, tuple(range(20)), ids, torch.bfloat16, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("N, K", [(24576, 1536), (7168, 16384), (576, 7168), (2048, 7168)])
@pytest.mark.parametrize("M", [1, 16, 64])
def test_cuda_fp8_linear_uses_the_kernel_at_v3_shapes(M, N, K):
    """FP8Linear on CUDA at decode sizes equals its dequantizing path: the W8A16 kernel up to
    GEMV_MAX_TOKENS rows (bf16 activations), past them the W8A8 GEMM, whose per-128 activation
    quantization to e4m3 costs ~2.5%."""
    from hetero.model.fp8 import GEMV_MAX_TOKENS

    g = torch.Generator().manual_seed(N + K)
    q, s = block_quantize(torch.randn(N, K, generator=g) / K**0.5)
    lin = FP8Linear(K, N).cuda()
    lin.weight.data.copy_(q.cuda())
    lin.weight_scale_inv.data.copy_(s.cuda())
    x = torch.randn(M, K, generator=g).cuda().bfloat16()
    want = reference(x, lin.weight, lin.weight_scale_inv)
    assert rel(lin(x), want) < (4e-3 if M <= GEMV_MAX_TOKENS else 4e-2)
