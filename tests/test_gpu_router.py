"""The fused router (hetero.gpu.router) against `Gate.torch_route` on the same x: in Triton's
interpreter on tiny configs without CUDA, at DeepSeek-V3 and V2-Lite shapes on the GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from hetero.config import ModelConfig  # noqa: E402
from hetero.gpu.router import RouteTiles, fused_route, gemv_route, route  # noqa: E402
from hetero.model.moe import Gate  # noqa: E402
from hetero.testing import tiny_v2_config, tiny_v3_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODELS = Path(__file__).parent / "data" / "models"  # copies of ../shared/models

V3 = {"n_routed_experts": 32, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 4}
V2_GROUPS = {"n_routed_experts": 32, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
             "topk_method": "group_limited_greedy"}  # fmt: skip
CASES = {
    "v3": tiny_v3_config(**V3),
    "v3-unnormed": tiny_v3_config(**V3, norm_topk_prob=False),
    "v3-k1": tiny_v3_config(**V3 | {"num_experts_per_tok": 1}),
    "v3-odd": tiny_v3_config(n_routed_experts=12, n_group=3, topk_group=2, num_experts_per_tok=3),
    "v3-one-per-group": tiny_v3_config(n_routed_experts=8, n_group=8, topk_group=5),
    "moonlight": tiny_v3_config(
        n_routed_experts=24, n_group=1, topk_group=1, num_experts_per_tok=6
    ),
    "v2-greedy": tiny_v2_config(n_routed_experts=32, num_experts_per_tok=6),
    "v2-greedy-normed": tiny_v2_config(num_experts_per_tok=5, norm_topk_prob=True),
    "v2-k1": tiny_v2_config(num_experts_per_tok=1, routed_scaling_factor=1.5),
    "v2-groups": tiny_v2_config(**V2_GROUPS),
    "v2-groups-normed": tiny_v2_config(**V2_GROUPS, norm_topk_prob=True),
}


def gate_for(config: ModelConfig, seed: int, device: str = DEVICE) -> Gate:
    """A Gate with random weights whose logits are ~N(0, 1), and a random correction bias."""
    g = torch.Generator().manual_seed(seed)
    gate = Gate(config)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) / config.hidden_size**0.5)
        if config.topk_method == "noaux_tc":
            gate.e_score_correction_bias.normal_(0, 0.25, generator=g)
    return gate.to(device)


def check(gate: Gate, x: torch.Tensor) -> None:
    want_w, want_ids = gate.torch_route(x)
    got_w, got_ids = route(gate, x)
    assert got_ids.dtype == want_ids.dtype == torch.int64
    # torch.topk orders by descending choice; with distinct scores the kernel's order is the same
    torch.testing.assert_close(got_ids, want_ids, rtol=0, atol=0)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_kernel_equals_gate(name):
    config = ModelConfig.from_hf(CASES[name])
    gate = gate_for(config, seed=len(name))
    for T in (1, 5, 33):
        check(gate, torch.randn(T, config.hidden_size, generator=torch.Generator().manual_seed(T)))


@pytest.mark.parametrize("name", ["v3", "v3-odd", "moonlight", "v2-greedy", "v2-groups"])
def test_one_launch_router_equals_gate(name):
    """gemv_route (logits by the kernel from the bf16 weight, the token's last program routing)
    against Gate's fp32 product of the same bf16 values; its counters back to zero after."""
    config = ModelConfig.from_hf(CASES[name])
    gate = gate_for(config, seed=5).to(torch.bfloat16)
    if config.topk_method == "noaux_tc":
        gate.e_score_correction_bias.data = gate.e_score_correction_bias.float()
    x = torch.randn(7, config.hidden_size, generator=torch.Generator().manual_seed(6))
    x = x.to(torch.bfloat16).to(DEVICE)
    counters = torch.zeros(16, dtype=torch.int32, device=DEVICE)
    want_w, want_ids = gate.torch_route(x)
    bias = getattr(gate, "e_score_correction_bias", None)
    for _ in range(2):  # the second call finds the counters reset
        got_w, got_ids = gemv_route(x, gate.weight, config, bias, counters)
        torch.testing.assert_close(got_ids, want_ids, rtol=0, atol=0)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
        assert counters.count_nonzero().item() == 0
    for tiles in (RouteTiles(1, 16, 1), RouteTiles(4, 32, 2), RouteTiles(8, 1024, 4)):
        got_w, got_ids = gemv_route(x, gate.weight, config, bias, counters, tiles=tiles)
        torch.testing.assert_close(got_ids, want_ids, rtol=0, atol=0)  # hidden in 1-4 passes
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="counters for 7 tokens"):
        gemv_route(x, gate.weight, config, bias, counters[:3])
    with pytest.raises(ValueError, match="do not fit"):
        gemv_route(x.float(), gate.weight, config, bias, counters)


def test_int32_ids_and_no_tokens():
    config = ModelConfig.from_hf(CASES["v3"])
    gate = gate_for(config, seed=0)
    logits = torch.randn(3, 32, device=DEVICE)
    bias = gate.e_score_correction_bias
    w64, ids64 = fused_route(logits, config, bias)
    w32, ids32 = fused_route(logits, config, bias, ids_dtype=torch.int32)
    assert ids32.dtype == torch.int32 and torch.equal(ids32.long(), ids64)
    assert torch.equal(w32, w64)
    w, ids = fused_route(logits[:0], config, bias)
    assert w.shape == ids.shape == (0, 4)


def bad(**changes):
    return dataclasses.replace(ModelConfig.from_hf(CASES["v3"]), **changes)


@pytest.mark.parametrize(
    "logits, config, bias, message",
    [
        (torch.randn(2, 32).bfloat16(), bad(), None, "fp32"),
        (torch.randn(32), bad(), None, r"\[T, E\]"),
        (torch.randn(2, 16), bad(), None, "16 experts, the config 32"),
        (torch.randn(2, 32), bad(n_group=5), None, "n_group=5 does not divide"),
        (torch.randn(2, 32), bad(topk_group=5), None, "topk_group=5"),
        (torch.randn(2, 32), bad(num_experts_per_tok=17), None, r"1\.\.16"),
        (torch.randn(2, 32), bad(num_experts_per_tok=0), None, "num_experts_per_tok=0"),
        (torch.randn(2, 32), bad(scoring_func="relu"), None, "unknown routing"),
        (torch.randn(2, 32), bad(topk_method="greedy"), torch.zeros(32), "only used by noaux"),
        (torch.randn(2, 32), bad(), torch.zeros(31), r"bias must be \[32\]"),
        (torch.randn(2, 32), bad(), torch.zeros(32).double(), "bias must be"),
        (torch.randn(32, 2).T, bad(), None, "contiguous"),
    ],
)
def test_launcher_refuses(logits, config, bias, message):
    with pytest.raises(ValueError, match=message):
        fused_route(logits, config, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["deepseek-v3", "deepseek-v2-lite", "moonlight"])
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_published_shapes_on_the_gpu(model, T):
    config = ModelConfig.from_hf(MODELS / model)
    gate = gate_for(config, seed=T)
    x = torch.randn(T, config.hidden_size, generator=torch.Generator().manual_seed(T)).cuda()
    want_w, want_ids = gate.torch_route(x)
    got_w, got_ids = route(gate, x)
    # sigmoid/softmax may differ from torch's by an ulp, which can swap near-tied experts in a
    # few of 4096 tokens; all others must match exactly
    same = (got_ids == want_ids).all(dim=1)
    assert same.float().mean().item() >= 0.999, (~same).sum().item()
    torch.testing.assert_close(got_w[same], want_w[same], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 64])  # the one-launch router (<= 16), then cuBLAS
def test_bf16_weight_routes_as_fp32(T):
    """A bf16 gate (as checkpoints store it) multiplied into fp32 without a copy of its weight
    routes as `Gate`'s fp32 product of the same values does."""
    config = ModelConfig.from_hf(MODELS / "deepseek-v3")
    gate = gate_for(config, seed=T).to(torch.bfloat16)
    gate.e_score_correction_bias.data = gate.e_score_correction_bias.float()
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, config.hidden_size, generator=g).to(torch.bfloat16).cuda()
    want_w, want_ids = gate.torch_route(x)
    got_w, got_ids = route(gate, x)
    same = (got_ids == want_ids).all(dim=1)
    assert same.float().mean().item() >= 0.98, (~same).sum().item()
    torch.testing.assert_close(got_w[same], want_w[same], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["moonlight", "v2-greedy"])
def test_equal_choices_go_to_the_lowest_expert_id(name):
    """Logits on four levels (many exact ties): ids in descending choice, the lowest id first
    among equals, as a stable sort gives them."""
    config = ModelConfig.from_hf(CASES[name])
    E, k = config.n_routed_experts, config.num_experts_per_tok
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (6, E), generator=g).float().to(DEVICE)
    _, ids = fused_route(logits, config)
    want = torch.sort(-logits.cpu(), dim=-1, stable=True).indices[:, :k]
    assert torch.equal(ids.cpu(), want)
