"""The AMX GEMM path (kernels_amx, kernels_amx_bf16) and its tile intrinsics (amx.py) against
plain references.

On a CPU without AMX the intrinsics compile to their emulation, so these tests check the
kernels' data layout and arithmetic everywhere; on an AMX Xeon the same tests run the tile
instructions (tests/logs/ holds that run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numba import njit
from test_cpu_experts import E, int8_blocks, reference, rel_err, routing, unpack_expert

from hetero.cpu_experts import amx, kernels_amx, ops
from hetero.cpu_experts.engine import CPUExperts, EngineConfig
from hetero.cpu_experts.formats import Format, pack_experts

H, I = 256, 128  # multiples of 128, as the AMX path needs
FP32_TOL = 1e-5  # products are exact (int8) or of rounded bf16 operands: fp32 rounding only


@njit
def _tile_product(tiles, cfg, a, b, c, signed):
    """c (int32 [16, 16]) += a [16, K] . b (VNNI order), through tiles 1, 3 and 0."""
    amx.tile_config(tiles, cfg)
    amx.tile_load(tiles, 0, c, 0, 64)
    amx.tile_load(tiles, 1, a, 0, a.shape[0] // 16)
    amx.tile_load(tiles, 3, b, 0, 64)
    if signed:
        amx.tile_dp_bssd(tiles, 0, 1, 3)
    else:
        amx.tile_dp_busd(tiles, 0, 1, 3)
    amx.tile_store(tiles, 0, c, 0, 64)
    amx.tile_release(tiles)


@pytest.mark.parametrize("k, signed", [(64, False), (32, False), (64, True)])
def test_tile_product_equals_integer_matmul(k, signed):
    amx.enable()  # (on an AMX CPU: the tile state, else tile instructions fault)
    rng = np.random.default_rng(k)
    a = rng.integers(-128 if signed else 0, 128 if signed else 256, (16, k))
    b = rng.integers(-128, 128, (k, 16))
    c0 = rng.integers(-1000, 1000, (16, 16)).astype(np.int32)
    vnni = b.reshape(k // 4, 4, 16).transpose(0, 2, 1).reshape(-1)  # row kk: 4 k of each column
    cfg = amx.config({0: (16, 64), 1: (16, k), 3: (k // 4, 64)})
    c = c0.reshape(-1).copy()
    a_bytes = a.astype(np.int8 if signed else np.uint8).reshape(-1)
    _tile_product(
        np.zeros(amx.TILES_BYTES, np.uint8), cfg, a_bytes, vnni.astype(np.int8), c, signed
    )
    assert np.array_equal(c.reshape(16, 16), c0 + a @ b)


@njit
def _bf16_product(tiles, cfg, a, b, c):
    amx.tile_config(tiles, cfg)
    amx.tile_load(tiles, 0, c, 0, 64)
    amx.tile_load(tiles, 1, a, 0, 64)
    amx.tile_load(tiles, 3, b, 0, 64)
    amx.tile_dp_bf16ps(tiles, 0, 1, 3)
    amx.tile_store(tiles, 0, c, 0, 64)
    amx.tile_release(tiles)


def test_bf16_tile_product_equals_matmul():
    """tdpbf16ps: C [16 x 16] f32 += A [16 x 32] . B [32 x 16], bf16, B's rows holding pairs."""
    amx.enable()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, 32, generator=g), torch.randn(32, 16, generator=g)
    a, b = a.bfloat16(), b.bfloat16()
    c0 = torch.randn(16, 16, generator=g)
    pairs = b.view(16, 2, 16).transpose(1, 2).contiguous()  # row kk: (k = 2 kk, 2 kk + 1) a column
    bits = (t.view(torch.int16).numpy().view(np.uint16).reshape(-1) for t in (a, pairs))
    c = c0.numpy().reshape(-1).copy()
    cfg = amx.config({0: (16, 64), 1: (16, 64), 3: (16, 64)})
    _bf16_product(np.zeros(amx.TILES_BYTES, np.uint8), cfg, *bits, c)
    expected = c0.double() + a.double() @ b.double()
    assert rel_err(torch.from_numpy(c).view(16, 16).double(), expected) < 1e-6


def test_bad_tile_shape_is_refused():
    with pytest.raises(ValueError, match="tile 2: 17 rows"):
        amx.config({2: (17, 64)})


def layer_of(spec: str, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g)
    return pack_experts(*w, torch.randn(E, H, I, generator=g), Format.parse(spec))


def amx_reference(layer, x, ids, w, int4_tiles="auto"):
    """The per-expert loop, with the AMX path's rounding: int8 activations a 128 on int8 tiles;
    on bf16 tiles (int4-g32 by default) weights, activations and h rounded to bf16."""
    if int4_tiles == "auto":
        int4_tiles = "bf16" if layer.fmt.group_size == 32 else "int8"
    if layer.fmt.name == "int4" and int4_tiles == "bf16":
        return bf16_tile_reference(layer, x, ids, w)
    if ops.q8_activations(layer):
        return reference(layer, x, ids, w)
    return reference(layer, int8_blocks(x), ids, w)  # (h's rounding is not modelled here)


def bf16_tile_reference(layer, x, ids, w):
    def bf16(t):
        return t.bfloat16().float()

    y = torch.zeros(x.shape[0], layer.hidden)
    experts = {e: [bf16(m) for m in unpack_expert(layer, e)] for e in ids.unique().tolist()}
    for t, j in zip(*torch.nonzero(ids >= 0, as_tuple=True)):
        gate, up, down = experts[int(ids[t, j])]
        h = bf16(F.silu(gate @ bf16(x[t])) * (up @ bf16(x[t])))
        y[t] += w[t, j] * (down @ h)
    return y


@pytest.mark.parametrize(
    "spec, tiles",
    [(f"int4{g}", t) for g in ("", "-g64", "-g128") for t in ("bf16", "int8", "auto")]
    + [("int8", "auto"), ("int8-g128", "auto")],
)
def test_layer_equals_reference(spec, tiles):
    """37 tokens on 8 experts, top 3: ~14 an expert, some over 16 (two token tiles); the
    output is added to what `out` holds."""
    layer = layer_of(spec)
    x, ids, w = routing(37, 3, seed=4, hidden=H)
    ids[0, 2] = -1  # a skipped slot
    out = np.ones((37, H), np.float32)
    g = ops.group_by_expert(ids.numpy(), E)
    ops.moe_gemm_amx(layer, x.numpy(), w.numpy(), g, out, int4_tiles=tiles)
    ref = amx_reference(layer, x, ids.clamp_min(-1), w, tiles) + 1
    assert rel_err(torch.from_numpy(out), ref) < FP32_TOL


def test_int8_groups_of_32_round_activations_only():
    """int8-g32 rescales every 32 k; its reference has fp32 activations, so only the int8
    activations' ~1% error separates them."""
    layer = layer_of("int8-g32")
    x, ids, w = routing(20, 2, seed=5, hidden=H)
    out = np.zeros((20, H), np.float32)
    ops.moe_gemm_amx(layer, x.numpy(), w.numpy(), ops.group_by_expert(ids.numpy(), E), out)
    assert rel_err(torch.from_numpy(out), reference(layer, x, ids, w)) < 3e-2


@pytest.mark.parametrize("spec, tiles", [("int4", "bf16"), ("int4", "int8"), ("int4-g128", "int8")])
def test_edge_cases(spec, tiles):
    """No experts, one token, all tokens on one expert (5 token tiles: a group of 4 in flight,
    then 1), 3 and 2 tiles (int8 tiles of 64 k: the second's B tiles in idle C tiles), k = 1."""
    layer = layer_of(spec)
    x, _, w = routing(70, 1, seed=6, hidden=H)
    none, every = torch.full((70, 1), -1), torch.zeros(70, 1, dtype=torch.long)
    split = torch.where(torch.arange(70)[:, None] < 40, 1, 2)  # 3 token tiles and 2
    scratch = {}  # the buffers an engine keeps between calls: grown, then reused
    for ids in (none, every, split):
        out = np.zeros((70, H), np.float32)
        g = ops.group_by_expert(ids.numpy(), E)
        ops.moe_gemm_amx(layer, x.numpy(), w.numpy(), g, out, scratch, int4_tiles=tiles)
        if ids is none:
            assert not out.any()
        else:
            assert rel_err(torch.from_numpy(out), amx_reference(layer, x, ids, w, tiles)) < FP32_TOL
    one = np.zeros((1, H), np.float32)
    ids = torch.tensor([[5]])
    g = ops.group_by_expert(ids.numpy(), E)
    ops.moe_gemm_amx(layer, x[:1].numpy(), w[:1].numpy(), g, one, scratch, int4_tiles=tiles)
    assert rel_err(torch.from_numpy(one), amx_reference(layer, x[:1], ids, w[:1], tiles)) < FP32_TOL


def test_prefetch_runs_past_a_rows_end_into_the_next_item():
    """16 rows of 1024 bytes from row 32, the next item's from row 80: position 1000 is in the
    rows, 1024 is byte 0 of the next item's, 2000 its byte 976; with no next item, none."""
    at = kernels_amx.ahead_at
    assert at(32, 80, 1024, 1000) == 32 * 1024 + 1000
    assert at(32, 80, 1024, 1024) == 80 * 1024
    assert at(32, 80, 1024, 2000) == 80 * 1024 + 976
    assert at(32, -1, 1024, 1000) == 32 * 1024 + 1000
    assert at(32, -1, 1024, 1024) == -1


def test_item_rows():
    """Item i: `rows` rows of expert experts[i // per], its (i % per)-th; past the last, -1."""
    experts = np.array([5, 2], np.int64)
    rows = [kernels_amx.item_row(i, experts, 3, 48, 16) for i in range(7)]
    assert rows == [240, 256, 272, 96, 112, 128, -1]
    rows = [kernels_amx.item_row(i, experts, 2, 64, 32) for i in range(5)]
    assert rows == [320, 352, 128, 160, -1]


@pytest.mark.parametrize("spec", ["int4", "int4-g128"])
def test_bf16_orders_equal_one_another(spec):
    """bf16 tiles in each order of loads and products (items of two 16-row slabs x two token
    tiles; two token tiles on alternating registers; four slabs with k in blocks, the sums
    stored and reloaded between blocks): the same sums as one slab against up to four token
    tiles, bit for bit (the same products in the same k order), over experts with 1, 2 and 3
    token tiles (an odd one: a pair, then one; blocks of 256 k, then 128)."""
    layer = layer_of(spec)
    x, _, w = routing(70, 1, seed=6, hidden=H)
    ids = torch.where(
        torch.arange(70)[:, None] < 40, 1, torch.where(torch.arange(70)[:, None] < 60, 2, 6)
    )
    g = ops.group_by_expert(ids.numpy(), E)
    outs = {}
    for order in ("1x4", "2x2", "1x2db", "kb"):
        out = np.zeros((70, H), np.float32)
        ops.moe_gemm_amx(layer, x.numpy(), w.numpy(), g, out, int4_tiles="bf16", bf16_order=order)
        outs[order] = out
    assert np.array_equal(outs["1x4"], outs["2x2"])
    assert np.array_equal(outs["1x4"], outs["1x2db"])
    assert np.array_equal(outs["1x4"], outs["kb"])
    want = amx_reference(layer, x, ids, w, "bf16")
    assert rel_err(torch.from_numpy(outs["1x4"]), want) < FP32_TOL
    with pytest.raises(ValueError, match="must be one of 1x4, 2x2, 1x2db, kb, not '4x1'"):
        ops.moe_gemm_amx(layer, x.numpy(), w.numpy(), g, out, bf16_order="4x1")


def test_unsupported_layers_are_refused():
    layer = layer_of("bf16")
    x, ids, w = routing(4, 2, hidden=H)
    g, out = ops.group_by_expert(ids.numpy(), E), np.zeros((4, H), np.float32)
    with pytest.raises(ValueError, match="AMX path takes int4/int8"):
        ops.moe_gemm_amx(layer, x.numpy(), w.numpy(), g, out)
    with pytest.raises(ValueError, match="int4_tiles must be auto, bf16 or int8, not 'fp8'"):
        ops.moe_gemm_amx(layer_of("int4"), x.numpy(), w.numpy(), g, out, int4_tiles="fp8")


@pytest.mark.parametrize("G", [32, 64, 128, 7168])
def test_tile_k_and_rescale_interval(G):
    """Sums are rescaled every min(G, 128) of k (the activations' block), never across a weight
    group, in at most two tile products (the kernel's A0/A1) of at most 64 bytes of k."""
    kt, rr = kernels_amx.tile_k(G)
    assert rr == min(G, 128) and G % rr == 0 and rr % kt == 0
    assert kt <= 64 and rr // kt <= 2


@pytest.mark.skipif(not amx.has_amx(), reason="needs a CPU with AMX (runs on the GPU machine)")
def test_engine_takes_the_amx_path_where_the_cpu_has_it():
    """On an AMX Xeon the engine sends experts of >= gemm_min_tokens_amx tokens to the tiles:
    the result matches the AMX reference, not the bf16 GEMM path's rounding."""
    layer = layer_of("int4")
    assert amx.enable()
    eng = CPUExperts({0: layer}, EngineConfig(threads=2, gemm_min_tokens_amx=4))
    x, ids, w = routing(48, 3, seed=7, hidden=H)
    assert rel_err(eng.forward(0, x, ids, w), amx_reference(layer, x, ids, w)) < FP32_TOL
    eng.close()
