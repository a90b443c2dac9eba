"""The GPU side's physical floor for a decode step, measured in the same run: the bytes a step
must read from HBM (weights once, each sequence's latent cache) over the device-to-device copy
bandwidth (bench/decode.py's `gpu_only` rows report their time against it)."""

from __future__ import annotations

import statistics

import torch


def cuda_ms(fn, reps: int = 20) -> float:
    """Median ms of `fn()` between CUDA events, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def hbm_copy_gbps(device: str, nbytes: int = 2**30, reps: int = 10) -> float:
    """A device-to-device copy of `nbytes`, counting the bytes read and written (GB/s)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.nbytes / cuda_ms(lambda: dst.copy_(src), reps) / 1e6


def step_weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads (the model on the GPU, its routed experts
    on the CPU engine): every parameter and buffer but the embedding table (a row a token),
    the routed experts (a few a token) and kv_b_proj where W_UK / W_UV were absorbed (the
    absorbed copies are read instead)."""
    skip = {id(model.model.embed_tokens.weight)}
    for block in model.model.layers:
        experts = getattr(block.mlp, "experts", None)
        if experts is not None:
            skip |= {id(t) for t in experts.parameters()}
        attn = block.self_attn
        if attn.w_uk is not None:
            skip |= {id(t) for t in attn.kv_b_proj.parameters()}
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if id(t) not in skip)


def step_kv_bytes(config, batch: int, context: int, dtype_bytes: int = 2) -> int:
    """The latent cache a step reads: each sequence's context, every layer."""
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    return batch * context * per_token * dtype_bytes


def gpu_floor(model, config, B: int, context: int, ms: float, hbm_gbps: float) -> dict:
    """The step's HBM reads (weights once, the sequences' caches) at the copy bandwidth
    measured in this run, against its measured time."""
    weights, kv = step_weight_bytes(model), step_kv_bytes(config, B, context)
    floor = (weights + kv) / hbm_gbps / 1e6
    return {"weight_gb": round(weights / 1e9, 2), "kv_gb": round(kv / 1e9, 2),
            "hbm_gbps": round(hbm_gbps), "floor_ms": round(floor, 2),
            "frac_hbm": round(floor / ms, 3)}  # fmt: skip
