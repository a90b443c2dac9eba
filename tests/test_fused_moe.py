"""The fused MoE (hetero.gpu.fused_moe: tokens sorted by expert, two grouped GEMMs over FP8
blocks or the CPU's packed int4) against the per-expert loop `torch_routed_experts` over MLPs
holding the dequantized weights: in Triton's interpreter on tiny shapes without CUDA, at
DeepSeek-V3's shapes on the GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetero.cpu_experts.formats import Format, as_tensor, dequantize_tensors, pack_experts
from hetero.model.fp8 import block_dequantize, block_quantize
from hetero.model.layers import MLP
from hetero.model.moe import torch_routed_experts

pytest.importorskip("triton")
from hetero.gpu.fused_moe import fused_moe_fp8, fused_moe_int4, fused_moe_int8  # noqa: E402
from hetero.gpu.moe_align import moe_align  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def route(T: int, k: int, E: int, resident: tuple[int, ...], seed: int):
    """ids [T, k] distinct per token, the resident experts favoured (so most tokens have some
    here, some none), ~1 in 8 slots -1; weights [T, k] in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    scores[:, list(resident)] += torch.rand(T, len(resident), generator=g)
    ids = scores.topk(k, dim=-1).indices
    ids = ids.masked_fill(torch.rand(T, k, generator=g) < 0.125, -1)
    return ids.to(DEVICE), torch.rand(T, k, generator=g).to(DEVICE)


def local_map(E: int, resident: tuple[int, ...]) -> torch.Tensor:
    local = torch.full((E,), -1, dtype=torch.int32)
    local[list(resident)] = torch.arange(len(resident), dtype=torch.int32)
    return local.to(DEVICE)


def loop(mats, resident, x, ids, weights) -> torch.Tensor:
    """The reference: per-expert loop over fp32 MLPs with weights (gate, up, down) = mats[i]."""
    experts = nn.ModuleDict()
    for e, (gate, up, down) in zip(resident, mats):
        with torch.device(DEVICE):  # (initialized there: fast at V3's sizes)
            m = MLP(gate.shape[1], gate.shape[0])
        m.gate_proj.weight.data, m.up_proj.weight.data, m.down_proj.weight.data = gate, up, down
        experts[str(e)] = m
    here = torch.isin(ids, torch.tensor(resident, device=ids.device))
    return torch_routed_experts(experts, x.float(), ids.masked_fill(~here, -1), weights)


def fp8_layer(H: int, I: int, n: int, seed: int):
    """n experts' FP8 stacks as StackedFP8Experts lays them out, and their dequantized mats."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w13, s13, w2, s2, mats = [], [], [], [], []
    for _ in range(n):
        qs = [block_quantize(torch.randn(o, i, generator=g, device=DEVICE) / i**0.5)
              for o, i in ((I, H), (I, H), (H, I))]  # fmt: skip
        w13.append(torch.cat([qs[0][0], qs[1][0]]))
        s13.append(torch.cat([qs[0][1], qs[1][1]]))
        w2.append(qs[2][0])
        s2.append(qs[2][1])
        mats.append([block_dequantize(q, s, (128, 128)) for q, s in qs])
    return [torch.stack(t) for t in (w13, s13, w2, s2)], mats


def int4_layer(H: int, I: int, n: int, G: int, seed: int):
    """n experts packed by the CPU's own `pack_experts`, as tensors, and their dequantized mats
    (formats' own `dequantize_tensors`)."""
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(n, I, H, generator=g) / H**0.5 for _ in range(2))
    p = pack_experts(gate, up, torch.randn(n, H, I, generator=g) / I**0.5, Format("int4", G))
    return [as_tensor(a).to(DEVICE) for a in (p.w13, p.s13, p.w2, p.s2)]


def int4_mats(w13, s13, w2, s2, G: int):
    fmt, (n, I, _, H) = Format("int4", G), (*w13.shape[:3], 2 * w13.shape[3])
    w13f = dequantize_tensors(w13, s13, fmt, H, torch.float32)  # [n, I, 2, H]
    w2f = dequantize_tensors(w2, s2, fmt, I, torch.float32)  # [n, H, I]
    return [(w13f[i, :, 0], w13f[i, :, 1], w2f[i]) for i in range(n)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T, k, block_m", [(1, 2, 16), (17, 3, 16), (40, 4, 4), (3, 3, 64)])
def test_moe_align_places_each_local_pair_once(T, k, block_m):
    E, resident = 8, (6, 1, 4, 7)
    ids, _ = route(T, k, E, resident, seed=T * k)
    local = local_map(E, resident)
    pairs, block_expert = (t.cpu().long() for t in moe_align(ids, local, 4, block_m))
    P, flat = T * k, ids.cpu().view(-1)
    stack = torch.where(flat >= 0, local.cpu()[flat.clamp_min(0)], -1)  # [P]
    assert pairs.numel() == block_expert.numel() * block_m >= P + min(4, P) * (block_m - 1)
    real = pairs[pairs < P]
    assert sorted(real.tolist()) == torch.nonzero(stack >= 0).view(-1).tolist()  # once each
    counts = torch.bincount(stack[stack >= 0], minlength=4)
    used = (-(-counts // block_m)).sum().item()
    assert block_expert[:used].tolist() == sorted(block_expert[:used].tolist())
    assert (block_expert[:used] >= 0).all() and (block_expert[used:] == -1).all()
    for b, e in enumerate(block_expert.tolist()):
        rows = pairs[b * block_m : (b + 1) * block_m]
        rows = rows[rows < P]
        assert (stack[rows] == e).all() and (e < 0) == (rows.numel() == 0)


@pytest.mark.parametrize(
    "T, k, dtype, block_m",
    [
        (1, 2, torch.float32, None),
        (3, 3, torch.bfloat16, None),
        (17, 3, torch.float32, None),  # experts with more pairs than a block
        (17, 2, torch.float32, 64),  # the prefill tile
    ],
)
def test_fp8_equals_the_expert_loop(T, k, dtype, block_m):
    H, I, E, resident = 256, 128, 8, (1, 4, 6)
    stacks, mats = fp8_layer(H, I, len(resident), seed=T)
    ids, weights = route(T, k, E, resident, seed=T + k)
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    want = loop(mats, resident, x, ids, weights)
    got = fused_moe_fp8(x, ids, weights, local_map(E, resident), *stacks, block_m=block_m)
    assert got.dtype == dtype and got.shape == (T, H)
    # fp32: the same sums in another order; bf16: x, h and the output rounded to bf16
    assert rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    none_here = (want == 0).all(-1)
    assert (got[none_here] == 0).all()


@pytest.mark.parametrize("G, T, k, dtype", [
    (32, 3, 2, torch.float32),
    (64, 17, 3, torch.float32),
    (32, 1, 3, torch.bfloat16),
])  # fmt: skip
def test_int4_equals_the_expert_loop(G, T, k, dtype):
    H, I, E, resident = 128, 64, 6, (5, 0, 2, 3)
    packed = int4_layer(H, I, len(resident), G, seed=G + T)
    ids, weights = route(T, k, E, resident, seed=T * k)
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    want = loop(int4_mats(*packed, G), resident, x, ids, weights)
    got = fused_moe_int4(x, ids, weights, local_map(E, resident), *packed, G)
    assert got.dtype == dtype and got.shape == (T, H)
    assert rel(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("spec, T", [("int8", 3), ("int8-g128", 17)])
def test_int8_equals_the_expert_loop(spec, T):
    """The CPU's packed int8 (a scale per row, or per 128) as is."""
    H, I, E, resident = 256, 128, 6, (4, 1, 2)
    fmt, g = Format.parse(spec), torch.Generator().manual_seed(T)
    gate, up = (torch.randn(3, I, H, generator=g) / H**0.5 for _ in range(2))
    p = pack_experts(gate, up, torch.randn(3, H, I, generator=g) / I**0.5, fmt)
    packed = [as_tensor(a).to(DEVICE) for a in (p.w13, p.s13, p.w2, p.s2)]
    w13f = dequantize_tensors(packed[0], packed[1], fmt, H, torch.float32)  # [n, I, 2, H]
    w2f = dequantize_tensors(packed[2], packed[3], fmt, I, torch.float32)
    mats = [(w13f[i, :, 0], w13f[i, :, 1], w2f[i]) for i in range(3)]
    ids, weights = route(T, 3, E, resident, seed=T)
    x = torch.randn(T, H, device=DEVICE)
    want = loop(mats, resident, x, ids, weights)
    got = fused_moe_int8(x, ids, weights, local_map(E, resident), *packed)
    assert rel(got, want) < 1e-5


def test_int4_scales_as_their_bits_and_no_local_pairs():
    """The scales as the CPU store keeps them (uint16 bits) give the same; a batch that chose
    no local expert gives zeros."""
    H, I, E, resident, G = 128, 64, 6, (1, 2), 32
    w13, s13, w2, s2 = int4_layer(H, I, 2, G, seed=0)
    ids, weights = route(3, 2, E, resident, seed=1)
    x, local = torch.randn(3, H, device=DEVICE), local_map(E, resident)
    got = fused_moe_int4(x, ids, weights, local, w13, s13, w2, s2, G)
    bits = (s13.view(torch.int16), s2.view(torch.int16))
    assert torch.equal(fused_moe_int4(x, ids, weights, local, w13, bits[0], w2, bits[1], G), got)
    elsewhere = torch.tensor([[0, -1], [3, 4]], device=DEVICE)
    assert (fused_moe_int4(x[:2], elsewhere, weights[:2], local, w13, s13, w2, s2, G) == 0).all()


def test_bad_inputs_are_refused():
    (w13, s13, w2, s2), _ = fp8_layer(256, 128, 2, seed=0)
    x, w, local = (
        torch.randn(2, 256, device=DEVICE),
        torch.rand(2, 2, device=DEVICE),
        local_map(4, (0, 1)),
    )
    ids = torch.zeros(2, 2, dtype=torch.long, device=DEVICE)
    cases = [
        ((x, ids, w, local, w13.float(), s13, w2, s2), "e4m3fn"),
        ((x, ids, w, local, w13, s13[:, :1], w2, s2), "s13"),
        ((x, ids, w, local, w13, s13, w2[:, :, :64], s2), "w2"),
        ((x[:, :128], ids, w, local, w13, s13, w2, s2), "H does not match"),
        ((x, ids.float(), w, local, w13, s13, w2, s2), "ids"),
        ((x, ids, w[:, :1], local, w13, s13, w2, s2), "weights"),
        ((x, ids, w, local, w13[:, :, None], s13, w2, s2), "dims"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            fused_moe_fp8(*args)
    with pytest.raises(ValueError, match="block_m"):
        fused_moe_fp8(x, ids, w, local, w13, s13, w2, s2, block_m=24)
    packed = int4_layer(128, 64, 2, 32, seed=0)
    x = x[:, :128]
    with pytest.raises(ValueError, match="group"):
        fused_moe_int4(x, ids, w, local, *packed, 48)
    with pytest.raises(ValueError, match="group 64"):
        fused_moe_int4(x, ids, w, local, *packed, 64)  # s13 has H/32 columns
    with pytest.raises(ValueError, match="bf16"):
        fused_moe_int4(x, ids, w, local, packed[0], packed[1].float(), *packed[2:], 32)
    with pytest.raises(ValueError, match="uint8"):
        fused_moe_int4(x, ids, w, local, packed[0].to(torch.int8), *packed[1:], 32)


V3 = dict(H=7168, I=2048, E=256, resident=(3, 17, 40, 64, 100, 128, 200, 255), k=8)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 512])
def test_v3_fp8_on_the_gpu(T):
    H, I, E, resident, k = V3.values()
    stacks, mats = fp8_layer(H, I, len(resident), seed=T)
    ids, weights = route(T, k, E, resident, seed=T)
    x = torch.randn(T, H, device=DEVICE).bfloat16()
    want = loop(mats, resident, x, ids, weights)
    got = fused_moe_fp8(x, ids, weights, local_map(E, resident), *stacks)
    assert rel(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("G", [32, 128])
@pytest.mark.parametrize("T", [1, 16, 512])
def test_v3_int4_on_the_gpu(T, G):
    """Random packed bytes and scales (pack_experts' search is slow at this size): the format,
    not the quantizer, is under test."""
    H, I, E, resident, k = V3.values()
    n, g = len(resident), torch.Generator(device=DEVICE).manual_seed(T)
    w13 = torch.randint(0, 256, (n, I, 2, H // 2), generator=g, device=DEVICE, dtype=torch.uint8)
    w2 = torch.randint(0, 256, (n, H, I // 2), generator=g, device=DEVICE, dtype=torch.uint8)
    s13 = (torch.rand(n, I, 2, H // G, generator=g, device=DEVICE) / 4 / H**0.5).bfloat16()
    s2 = (torch.rand(n, H, I // G, generator=g, device=DEVICE) / 4 / I**0.5).bfloat16()
    ids, weights = route(T, k, E, resident, seed=T)
    x = torch.randn(T, H, device=DEVICE).bfloat16()
    want = loop(int4_mats(w13, s13, w2, s2, G), resident, x, ids, weights)
    got = fused_moe_int4(x, ids, weights, local_map(E, resident), w13, s13, w2, s2, G)
    assert rel(got, want) < 1e-2


@pytest.mark.gpu
def test_v3_fp8_replays_in_a_cuda_graph():
    """No host sync: the whole call captures into a CUDA graph and replays with new routing."""
    H, I, E, resident, k = V3.values()
    stacks, mats = fp8_layer(H, I, len(resident), seed=0)
    local = local_map(E, resident)
    ids, weights = route(16, k, E, resident, seed=1)
    x = torch.randn(16, H, device=DEVICE).bfloat16()
    fused_moe_fp8(x, ids, weights, local, *stacks)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe_fp8(x, ids, weights, local, *stacks)
    new_ids, new_weights = route(16, k, E, resident, seed=2)
    ids.copy_(new_ids), weights.copy_(new_weights), x.normal_()
    graph.replay()
    assert rel(out, loop(mats, resident, x, ids, weights)) < 1e-2


def test_on_local_pairs_equals_the_whole_batch():
    """moe_align.on_local_pairs (prefill: the local pairs gathered, the kernel on them, the sums
    added back a slot at a time) gives the fused kernel's sum over the whole batch."""
    from hetero.gpu.moe_align import on_local_pairs

    H, I, E, resident = 256, 128, 8, (6, 1, 4)
    ws, mats = fp8_layer(H, I, len(resident), seed=3)
    ids, weights = route(19, 3, E, resident, seed=3)
    x, local = torch.randn(19, H, device=DEVICE), local_map(E, resident)
    moe = lambda xs, i, w: fused_moe_fp8(xs, i, w, local, *ws, out_dtype=torch.float32)  # noqa: E731
    got = on_local_pairs(moe, x, ids, weights, local)
    want = loop(mats, resident, x, ids, weights)
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5
    none = on_local_pairs(moe, x, torch.full_like(ids, -1), weights, local)
    assert none.shape == x.shape and not none.any()


@pytest.mark.parametrize("G", [32, 128])
def test_int4_dequant_equals_the_formats_reference(G):
    """The one-pass GPU dequantization (kernel in the interpreter without CUDA) against
    formats.dequantize_tensors, rows of several groups and a partial last block."""
    from hetero.gpu.dequant import dequant_int4

    w13, s13, w2, s2 = int4_layer(256, 128, 2, G, seed=G)
    fmt = Format("int4", G)
    for q, s, K in ((w13, s13, 256), (w2, s2, 128)):
        want = dequantize_tensors(q, s, fmt, K, torch.float32)
        assert torch.equal(dequant_int4(q, s.view(torch.bfloat16), G, torch.float32), want)


@pytest.mark.parametrize("G", [32, 64])
def test_int4_prefill_dequantizes_then_runs_the_dense_tiles(G, monkeypatch):
    """From DEQUANT_PAIRS pairs an expert the int4 experts are dequantized first: the same
    result as the expert loop, in passes of a few experts (dequant_bytes) too, and as the packed
    kernels (DEQUANT_PAIRS raised past the batch)."""
    import hetero.gpu.fused_moe as fm

    H, I, E, resident, T, k = 128, 64, 6, (5, 0, 2, 3), 40, 4
    packed = int4_layer(H, I, len(resident), G, seed=G)
    ids, weights = route(T, k, E, resident, seed=G)
    x = torch.randn(T, H, device=DEVICE)
    want = loop(int4_mats(*packed, G), resident, x, ids, weights)
    got = fused_moe_int4(x, ids, weights, local_map(E, resident), *packed, G)
    monkeypatch.setattr(fm, "dequant_bytes", lambda: 3 * H * I * 4 * 3)  # passes of 3, then 1
    passes = fused_moe_int4(x, ids, weights, local_map(E, resident), *packed, G)
    monkeypatch.setattr(fm, "DEQUANT_PAIRS", 10**6)
    packed_path = fused_moe_int4(x, ids, weights, local_map(E, resident), *packed, G)
    assert rel(got, want) < 1e-5 and rel(got, packed_path) < 1e-5 and rel(passes, got) < 1e-6


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_decode_sizes_split_k_equals_one_range(fmt, monkeypatch):
    """Decode sizes sum gate/up over SPLIT_K ranges of K (here 4 of 128), then `_silu_mul`
    adds them in order: the expert loop's result, and one range's to fp32 rounding."""
    import hetero.gpu.fused_moe as fm

    H, I, E, resident, T, k = 512, 128, 6, (5, 0, 2, 3), 3, 2
    ids, weights = route(T, k, E, resident, seed=7)
    x = torch.randn(T, H, device=DEVICE)
    if fmt == "int4":
        packed = int4_layer(H, I, len(resident), 32, seed=7)
        mats, run = int4_mats(*packed, 32), lambda: fused_moe_int4(
            x, ids, weights, local_map(E, resident), *packed, 32)  # fmt: skip
    else:
        stacks, mats = fp8_layer(H, I, len(resident), seed=7)
        run = lambda: fused_moe_fp8(x, ids, weights, local_map(E, resident), *stacks)  # noqa: E731
    assert fm.split_k(16, H, 128) == 4
    split = run()
    monkeypatch.setattr(fm, "SPLIT_K", 1)
    whole = run()
    assert rel(split, loop(mats, resident, x, ids, weights)) < 1e-5 and rel(split, whole) < 1e-6
