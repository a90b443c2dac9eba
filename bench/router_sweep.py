"""The decode router's launch settings (hetero.gpu.router.RouteTiles) on DeepSeek-V3's gate
(256 experts x 7168, bf16) at 1 and 16 tokens, against the two-launch path (cuBLAS logits in
fp32, then fused_route) and the weight's bytes over the device copy bandwidth measured in the
same run (the floor). Each replay runs the router over as many copies of the gate as V3 has MoE
layers (58), back to back as the decode step does, so no weight is served from L2; the time is
a copy's. JSON lines; `python bench/router_sweep.py`."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fp8_sweep import graphed  # noqa: E402
from bench.gpu_floor import cuda_ms, hbm_copy_gbps  # noqa: E402
from hetero.config import ModelConfig  # noqa: E402
from hetero.gpu.router import ROUTE_TILES, RouteTiles, fused_route, gemv_route  # noqa: E402
from hetero.model.moe import Gate  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "tests" / "data" / "models" / "deepseek-v3"
GRID = [RouteTiles(e, h, w) for e, h, w in itertools.product((1, 2, 4), (2048, 8192), (4, 8))]
SWEEP = list(dict.fromkeys([ROUTE_TILES, RouteTiles(4, 1024, 4), *GRID]))  # default first


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--quick", action="store_true", help="the default tiles and 1 expert a "
                   "program (8192 channels, 8 warps) only")  # fmt: skip
    p.add_argument("--copies", type=int, default=58, help="gates a replay runs (V3: 58 layers)")
    args = p.parse_args()
    config = ModelConfig.from_hf(json.loads((MODEL / "config.json").read_text()))
    E, H = config.n_routed_experts, config.hidden_size
    hbm = hbm_copy_gbps("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    gates = []
    for _ in range(args.copies):
        gate = Gate(config).to("cuda", torch.bfloat16)
        gate.weight.normal_(0, H**-0.5, generator=gen)
        gate.e_score_correction_bias.data = torch.randn(E, device="cuda", generator=gen) * 0.1
        gates.append(gate)
    floor_ms = E * H * 2 / hbm / 1e6
    sweep = [ROUTE_TILES, RouteTiles(1, 8192, 8)] if args.quick else SWEEP
    for T, tiles in itertools.product(map(int, args.tokens.split(",")), [None, *sweep]):
        x = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)
        counters = [torch.zeros(16, dtype=torch.int32, device="cuda") for _ in gates]
        bias = [g.e_score_correction_bias for g in gates]

        def one(i: int, g: Gate):
            if tiles is None:  # cuBLAS into fp32, then the routing kernel
                logits = torch.mm(x, g.weight.t(), out_dtype=torch.float32)
                return fused_route(logits, config, bias[i])
            return gemv_route(x, g.weight, config, bias[i], counters[i], tiles=tiles)

        want = gates[0].torch_route(x)[1]
        same = float((one(0, gates[0])[1] == want).all(-1).float().mean())
        ms = cuda_ms(graphed(lambda: [one(i, g) for i, g in enumerate(gates)]), 30) / len(gates)
        name = (
            "mm+fused_route"
            if tiles is None
            else f"e{tiles.block_e}-h{tiles.max_block_h}-w{tiles.num_warps}"
        )
        row = {"bench": "router_sweep", "T": T, "path": name, "us": round(ms * 1e3, 2),
               "floor_us": round(floor_ms * 1e3, 2), "frac_hbm": round(floor_ms / ms, 3),
               "default": tiles == ROUTE_TILES, "same_ids_as_gate": same}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
