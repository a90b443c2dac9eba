"""The FP8 prefill GEMM (hetero.gpu.fp8_prefill: e4m3 activations, a scale per token per 128)
against dequantize-then-matmul on the same quantized activations: in Triton's interpreter on
tiny shapes without CUDA, at DeepSeek-V3's shapes on the GPU."""

from __future__ import annotations

import pytest
import torch

from hetero.model.fp8 import block_dequantize, block_quantize

pytest.importorskip("triton")
from hetero.gpu.fp8_prefill import fp8_gemm_w8a8, quantize_act  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def act_reference(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token per block: s = amax / 448, q = e4m3(x / s) (torch)."""
    M, K = x.shape
    xb = torch.nn.functional.pad(x.float(), (0, -K % block)).view(M, -1, block)
    s = xb.abs().amax(-1) / 448
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = (xb / s[..., None]).to(torch.float8_e4m3fn).view(M, -1)[:, :K]
    return q, s


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("M", [5, 37])  # one tile of rows; three, the last partial
def test_activation_quantization_equals_torch(M):
    x = torch.randn(M, 300, generator=torch.Generator().manual_seed(0)) * 3
    x[2, 128:256] = 0  # an all-zero block: scale 1, zeros
    q, s = quantize_act(x.to(DEVICE), 128)
    want_q, want_s = act_reference(x, 128)
    torch.testing.assert_close(s.cpu(), want_s)
    q_t, s_t = quantize_act(x.to(DEVICE), 128, token_minor=True)  # cuBLAS's scale layout
    assert s_t.t().is_contiguous() and torch.equal(s_t.cpu(), s.cpu())
    assert torch.equal(q_t.cpu().float(), q.cpu().float())
    got, want = q.cpu().float(), want_q.float()
    assert got[2, 128:256].eq(0).all()
    if DEVICE == "cuda":
        assert torch.equal(got, want)
    else:  # Triton 3.x's interpreter rounds fp32 -> e4m3 wrongly where rounding carries into
        # the exponent (31.07 -> 16, not 32): only most values can be held to torch's there
        assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize("M, N, K, block_m, block_n", [
    (70, 200, 384, 64, 128),  # partial token and row tiles, three K blocks
    (16, 130, 300, 16, 64),  # a partial K block; row tiles straddling a scale block
    (1, 64, 128, 16, 64),
])  # fmt: skip
def test_w8a8_equals_dequantized_matmul(M, N, K, block_m, block_n):
    g = torch.Generator().manual_seed(M + N + K)
    w, ws = block_quantize(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g)
    xq, xs = (t.cpu() for t in quantize_act(x.to(DEVICE), 128))  # (tested above)
    blocks = torch.nn.functional.pad(xq.float(), (0, -K % 128)).view(M, -1, 128)
    x_deq = (blocks * xs[..., None]).view(M, -1)[:, :K]
    want = x_deq @ block_dequantize(w, ws, (128, 128)).T
    got = fp8_gemm_w8a8(x.to(DEVICE), w.to(DEVICE), ws.to(DEVICE), block_m=block_m, block_n=block_n)
    assert rel(got.cpu(), want) < 1e-5
    exact = x @ block_dequantize(w, ws, (128, 128)).T  # and the activations' rounding is small
    assert rel(got.cpu(), exact) < 0.08


def test_bad_inputs_are_refused():
    w, ws = block_quantize(torch.randn(64, 128))
    with pytest.raises(ValueError, match="scale"):
        fp8_gemm_w8a8(torch.randn(2, 128), w, ws[:, :0])
    with pytest.raises(ValueError, match="e4m3fn"):
        fp8_gemm_w8a8(torch.randn(2, 128), w.float(), ws)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [64, 512, 4096])
@pytest.mark.parametrize("N, K", [(7168, 2048), (24576, 1536), (2112, 7168)])
def test_v3_shapes_on_the_gpu(M, N, K):
    g = torch.Generator().manual_seed(M)
    w, ws = block_quantize(torch.randn(N, K, generator=g))
    x = torch.randn(M, K, generator=g).cuda().bfloat16()
    got = fp8_gemm_w8a8(x, w.cuda(), ws.cuda())
    want = x.float() @ block_dequantize(w.cuda(), ws.cuda(), (128, 128)).T
    assert rel(got, want) < 0.08


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 17, 64, 65, 1024])
def test_fp8_linear_picks_a_kernel_at_every_size(M):
    """FP8Linear on CUDA: the W8A16 kernel up to GEMV_MAX_TOKENS rows, the W8A8 one beyond,
    each within FP8's tolerance of the dequantized matmul (its CPU path)."""
    from hetero.model.fp8 import FP8Linear

    g = torch.Generator().manual_seed(M)
    lin = FP8Linear(7168, 576)  # kv_a_proj_with_mqa: a partial last block of rows
    w, ws = block_quantize(torch.randn(576, 7168, generator=g))
    lin.weight.data, lin.weight_scale_inv.data = w, ws
    x = torch.randn(M, 7168, generator=g).bfloat16()
    want = lin(x.float())  # CPU: dequantize + matmul
    got = lin.cuda()(x.cuda())
    assert got.shape == (M, 576) and rel(got.cpu(), want) < 0.08


def has_flashinfer_gemm() -> bool:
    try:
        from flashinfer.gemm import fp8_blockscale_gemm_sm90  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["cublas", "flashinfer"])
@pytest.mark.parametrize("M, N, K", [(17, 24576, 1536), (1000, 7168, 16384), (4096, 2048, 7168),
                                     (64, 2112, 7168)])  # fmt: skip
def test_library_block_scaled_gemms_equal_the_triton_kernel(route, M, N, K):
    """cuBLAS's block-scaled GEMM (torch._scaled_mm, 1x128 and 128x128 scales, on the same
    quantized activations) and flashinfer's SM90 one (which quantizes the activations itself,
    per token per 128 as quantize_act does): the Triton W8A8 kernel's result up to summation
    order; and what FP8Linear computes when asked for the route first."""
    from hetero.gpu.fp8_prefill import ROUTES
    from hetero.model.fp8 import FP8Linear

    if route == "flashinfer" and not has_flashinfer_gemm():
        pytest.skip("needs flashinfer >= 0.6 on a Hopper GPU")
    g = torch.Generator(device="cuda").manual_seed(M)
    w, ws = block_quantize(torch.randn(N, K, generator=g, device="cuda"))
    x = torch.randn(M, K, generator=g, device="cuda").bfloat16()
    got = ROUTES[route](x, w, ws, (128, 128))
    assert got is not None, f"{route} refused the shape (on cuBLAS: no block-scaled FP8 GEMM)"
    want = fp8_gemm_w8a8(x, w, ws)
    assert got.shape == (M, N) and rel(got.float(), want.float()) < 1e-2
    lin = FP8Linear(K, N).cuda()
    lin.weight.data, lin.weight_scale_inv.data = w, ws
    lin.prefill_gemms = (route, "triton")
    assert rel(lin.prefill(x).float(), got.float()) < 1e-3 and lin.prefill_gemm == route


def test_fp8_linear_keeps_the_first_gemm_that_takes_its_shape(monkeypatch):
    """FP8Linear.prefill tries `prefill_gemms` in order, skips those that answer None (not
    installed, not this GPU, not this shape), tries the first that answered first on the
    layer's later calls (the others after it should it refuse), and names them all where none
    answers."""
    from hetero.gpu import fp8_prefill
    from hetero.model.fp8 import PREFILL_GEMMS, FP8Linear

    calls = []

    def route(name, answers):
        def fn(x, weight, scale, block):
            calls.append(name)
            return torch.full((x.shape[0], weight.shape[0]), float(len(name))) if answers else None

        return fn

    monkeypatch.setitem(fp8_prefill.ROUTES, "no", route("no", False))
    monkeypatch.setitem(fp8_prefill.ROUTES, "yes", route("yes", True))
    monkeypatch.setitem(fp8_prefill.ROUTES, "later", route("later", True))
    assert PREFILL_GEMMS[-1] == "triton" and set(PREFILL_GEMMS) <= set(fp8_prefill.ROUTES)
    lin = FP8Linear(256, 128)
    lin.prefill_gemms = ("no", "yes", "later")
    x = torch.randn(3, 256)
    assert torch.equal(lin.prefill(x), torch.full((3, 128), 3.0)) and lin.prefill_gemm == "yes"
    lin.prefill(x)
    assert calls == ["no", "yes", "yes"]  # tried once; kept after
    monkeypatch.setitem(fp8_prefill.ROUTES, "yes", route("yes", False))  # now refuses: the rest
    assert torch.equal(lin.prefill(x), torch.full((3, 128), 5.0)) and lin.prefill_gemm == "later"
    assert calls[3:] == ["yes", "no", "later"]
    lin2 = FP8Linear(256, 128)
    lin2.prefill_gemms = ("no",)
    with pytest.raises(RuntimeError, match=r"no FP8 GEMM of \['no'\] takes a 128 x 256 weight"):
        lin2.prefill(x)
