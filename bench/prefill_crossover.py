"""`bench/decode.py --prefill T,...`: one DeepSeek-V3 MoE layer's CPU experts for T tokens, the
CPU engine against streaming the packed layer to the GPU; where the second wins, long prefill
should stream (`HybridOptions.stream_min_tokens`). JSON lines on stdout."""

from __future__ import annotations

import json
import time

import torch

from bench.cpu_moe import random_layer
from bench.workloads import slice_config
from hetero.config import ModelConfig
from hetero.cpu_experts.engine import CPUExperts, EngineConfig
from hetero.cpu_experts.formats import Format
from hetero.sched.hybrid import HybridExperts


def prefill_crossover(args) -> None:
    """One V3 MoE layer's CPU experts for T tokens: the CPU engine against streaming the packed
    layer to the GPU (`streamed_experts`); where the second wins, long prefill should stream."""
    config = ModelConfig.from_hf(slice_config("v3-slice", 1))
    H, I, E, k = (
        config.hidden_size,
        config.moe_intermediate_size,
        config.n_routed_experts,
        config.num_experts_per_tok,
    )
    fmt = Format.parse(args.format)
    engine = CPUExperts({1: random_layer(fmt, H, I, E, seed=1)}, EngineConfig(threads=args.threads))
    experts = torch.nn.ModuleDict()
    for stream in (False, True):
        routed = HybridExperts(
            experts, layer=1, engine=engine, num_experts=E, stream_min_tokens=1 if stream else 0
        )
        for T in args.prefill:
            gen = torch.Generator().manual_seed(T)
            x = torch.randn(T, H, generator=gen).to(args.device, torch.bfloat16)
            ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices.to(args.device)
            w = torch.rand(T, k, generator=gen).to(args.device)
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                routed.submit(x, ids, w).result()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            row = {"bench": "prefill_layer", "format": str(fmt), "tokens": T}
            row |= {"path": "gpu_stream" if stream else "cpu", "ms": round(min(times), 1)}
            print(json.dumps(row), flush=True)
    engine.close()
