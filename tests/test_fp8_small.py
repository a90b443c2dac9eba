"""The swap-AB FP8 GEMM for 17-64 tokens (hetero.gpu.fp8_small) against dequantize-then-matmul
on the same quantized activations: in Triton's interpreter on tiny shapes without CUDA, at
DeepSeek-V3's shapes on the GPU; its split-K summed in order by the last split of a tile."""

from __future__ import annotations

import pytest
import torch

from hetero.model.fp8 import block_dequantize, block_quantize

pytest.importorskip("triton")
from hetero.gpu.fp8_prefill import quantize_act  # noqa: E402
from hetero.gpu.fp8_small import counters_for, fp8_small  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def on_quantized(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """x's per-token e4m3 quantization (the kernel's own, tested in test_fp8_prefill) times
    the dequantized weight, in fp32 on the CPU."""
    M, K = x.shape
    xq, xs = (t.cpu() for t in quantize_act(x, 128))
    blocks = torch.nn.functional.pad(xq.float(), (0, -K % 128)).view(M, -1, 128)
    x_deq = (blocks * xs[..., None]).view(M, -1)[:, :K]
    return x_deq @ block_dequantize(w.cpu(), ws.cpu(), (128, 128)).T


@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("M, N, K, programs", [
    (17, 260, 300, 1),  # one split; a partial row tile, a partial K block, tokens padded to 32
    (5, 200, 640, 16),  # split-K over 5 blocks: 3 splits of 2, the last with one past K
    (64, 128, 256, 4),  # the most tokens; two splits of one block
])  # fmt: skip
def test_equals_dequantized_matmul(M, N, K, programs, silu_mul):
    """fp32 activations; `silu_mul`: the weight's rows are gate then up (a row tile of each
    straddles the halves' scale blocks where N / 2 is not a multiple of 128)."""
    g = torch.Generator().manual_seed(M + N + K)
    w, ws = block_quantize(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).to(DEVICE)
    counters = counters_for(N, torch.device(DEVICE))
    got = fp8_small(x, w.to(DEVICE), ws.to(DEVICE), counters, programs=programs,
                    silu_mul=silu_mul)  # fmt: skip
    want = on_quantized(x, w, ws)
    if silu_mul:
        gate, up = want.chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
    assert got.shape == want.shape and got.dtype == x.dtype
    assert rel(got.cpu(), want) < 1e-5
    assert counters.count_nonzero().item() == 0  # reset by each tile's last split


@pytest.mark.parametrize("silu_mul", [False, True])
def test_wider_programs_and_their_own_launch_settings(silu_mul):
    """128 weight rows a program (two of the tensor cores' M tiles), split-K: the same product."""
    from hetero.gpu.fp8_small import SmallTiles

    g = torch.Generator().manual_seed(7)
    w, ws = block_quantize(torch.randn(384, 384, generator=g))
    x = torch.randn(20, 384, generator=g).to(DEVICE)
    counters = counters_for(384, torch.device(DEVICE))
    tiles = SmallTiles(block_w=128, per_sm=4, num_warps=8, num_stages=2)
    got = fp8_small(x, w.to(DEVICE), ws.to(DEVICE), counters, programs=6, silu_mul=silu_mul,
                    tiles=tiles)  # fmt: skip
    want = on_quantized(x, w, ws)
    if silu_mul:
        gate, up = want.chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
    assert rel(got.cpu(), want) < 1e-5 and counters.count_nonzero().item() == 0
    with pytest.raises(ValueError, match="multiple of 64"):
        fp8_small(x, w.to(DEVICE), ws.to(DEVICE), counters, tiles=SmallTiles(block_w=96))


def test_split_k_is_deterministic_and_keeps_leading_dims():
    """Split-K partials summed in split order: the same y on every call, bit for bit, and
    [..., K] in -> [..., N] out."""
    g = torch.Generator().manual_seed(3)
    w, ws = block_quantize(torch.randn(96, 512, generator=g))
    w, ws = w.to(DEVICE), ws.to(DEVICE)
    x = torch.randn(2, 9, 512, generator=g).bfloat16().to(DEVICE)
    counters = counters_for(96, torch.device(DEVICE))
    first = fp8_small(x, w, ws, counters, programs=8)
    assert first.shape == (2, 9, 96)
    for _ in range(2):
        torch.testing.assert_close(fp8_small(x, w, ws, counters, programs=8), first, rtol=0,
                                   atol=0)  # fmt: skip


def test_bad_inputs_are_refused():
    w, ws = block_quantize(torch.randn(64, 128))
    counters = counters_for(64, torch.device("cpu"))
    with pytest.raises(ValueError, match="at most 64"):
        fp8_small(torch.randn(65, 128), w, ws, counters)
    with pytest.raises(ValueError, match="scale"):
        fp8_small(torch.randn(2, 128), w, ws[:, :0], counters)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_small(torch.randn(2, 128), w.float(), ws, counters)
    with pytest.raises(ValueError, match="counters for"):
        fp8_small(torch.randn(2, 128), w, ws, counters[:0])
    w, ws = block_quantize(torch.randn(63, 128))
    with pytest.raises(ValueError, match="even count"):
        fp8_small(torch.randn(2, 128), w, ws, counters, silu_mul=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [17, 32, 64])
@pytest.mark.parametrize("N, K", [(7168, 2048), (2112, 7168), (4096, 7168), (7168, 16384)])
def test_v3_shapes_on_the_gpu(M, N, K):
    """V3's decode matrices (shared down, q_a|kv_a, shared gate|up, o_proj) at serving's batch
    sizes, bf16 activations, against the same quantized product in fp32."""
    g = torch.Generator().manual_seed(M + N)
    w, ws = block_quantize(torch.randn(N, K, generator=g) / K**0.5)
    x = torch.randn(M, K, generator=g).bfloat16().cuda()
    counters = counters_for(N, x.device)
    got = fp8_small(x, w.cuda(), ws.cuda(), counters)
    assert rel(got.cpu(), on_quantized(x, w, ws)) < 1e-2  # bf16 output
    assert counters.count_nonzero().item() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_linear_takes_it_where_asked():
    """FP8Linear past the GEMV's 16 rows: cuBLAS's GEMM by default, fp8_small where its
    `small_max_tokens` reaches; the same product within the activations' rounding."""
    from hetero.model.fp8 import FP8Linear

    g = torch.Generator().manual_seed(0)
    lin = FP8Linear(2048, 7168).cuda()
    w, ws = block_quantize(torch.randn(7168, 2048, generator=g) / 2048**0.5)
    lin.weight.data, lin.weight_scale_inv.data = w.cuda(), ws.cuda()
    x = torch.randn(32, 2048, generator=g).bfloat16().cuda()
    default, default_act = lin(x), lin.silu_mul(x)
    lin.small_max_tokens = 64
    small, small_act = lin(x), lin.silu_mul(x)
    want = on_quantized(x, w, ws)
    assert rel(default.cpu(), want) < 1e-2 and rel(small.cpu(), want) < 1e-2
    gate, up = want.chunk(2, dim=-1)
    want_act = torch.nn.functional.silu(gate) * up
    assert rel(default_act.cpu(), want_act) < 2e-2 and rel(small_act.cpu(), want_act) < 2e-2
    assert lin.tile_counters(x.device).count_nonzero().item() == 0
