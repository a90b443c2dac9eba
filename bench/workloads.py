"""The benchmarks' workloads: random-weight models at the published shapes (DeepSeek-V3 whole or
as a slice, V2-Lite), the routed experts' modes (all on the GPU side's zeros, the hybrid
runtime with or without overlap and deferral, packed int4 GPU experts), the MLA backend,
decode batches over a contiguous or a paged latent cache and their timed steps (`time_steps`,
and `DecodeRef`: bench/decode.py's batch-1 step beside the serving engine's). bench/decode.py,
throughput.py, prefill.py and serving_http.py build on them."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path

import torch

from bench.cpu_moe import random_layer
from hetero.config import ModelConfig
from hetero.cpu_experts.formats import Format
from hetero.model import ForwardBatch, Transformer
from hetero.model.batch import PagedKVCache
from hetero.model.fp8 import FP8Linear, block_quantize, to_fp8
from hetero.model.moe import RoutedRun
from hetero.placement import parse_placement
from hetero.sched.graphs import GraphedDecoder
from hetero.sched.hybrid import HybridExperts
from hetero.sched.runtime import is_fp8_module

MODELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "models"
WORKLOADS = {
    "v3-slice": ("deepseek-v3", {"first_k_dense_replace": 1}),
    "v3": ("deepseek-v3", {}),
    "v2-lite": ("deepseek-v2-lite", {}),
}


def full_layers(workload: str) -> tuple[int, int]:
    """(layers, MoE layers) of the whole published model the workload stands for."""
    config = ModelConfig.from_hf(MODELS / WORKLOADS[workload][0])
    return config.num_hidden_layers, len(config.moe_layers)


def slice_config(workload: str, moe_layers: int | None) -> dict:
    name, overrides = WORKLOADS[workload]
    d = json.loads((MODELS / name / "config.json").read_text())
    d.update(overrides)
    if moe_layers:
        d["num_hidden_layers"] = d["first_k_dense_replace"] + moe_layers
    d.pop("quantization_config", None)
    return d


@torch.no_grad()
def random_model(
    config: ModelConfig,
    device: str,
    dtype: torch.dtype,
    fp8: bool,
    gpu_experts: int = 0,
    attention: str = "auto",
) -> Transformer:
    """All non-expert weights random (scaled so activations stay O(1)); of the routed experts,
    the first `gpu_experts` of each layer as GPU modules (as configs/deepseek-v3-80gb.yaml
    keeps 20). `fp8`: all their Linear layers as FP8 blocks. `attention`: the MLA backend, as
    `hetero serve --attention` (auto, the default: triton, and flashinfer's decode where it
    is installed and pays; triton: the kernels over a paged cache, W_UK / W_UV read from
    kv_b_proj's FP8 blocks, as the loader leaves them (`runtime.absorbs`); flashinfer: decode
    through flashinfer's MLA kernel, the rest as triton; absorbed: the torch ops, kv_b_proj
    dequantized at every call)."""
    resident = {L: tuple(range(gpu_experts)) for L in config.moe_layers}
    with torch.device("meta"):
        model = Transformer(config, attention=attention, resident=resident)
    if fp8:  # the hybrid loader's rule, for a placement with everything but experts in fp8
        experts = f"{{match: '\\.mlp\\.experts$', device: cpu, gpu_experts: {gpu_experts}, "
        experts += "gpu_format: fp8}"  # (a slice's config has no quantization block: say it)
        text = f"rules:\n  - {experts}\n  - {{device: gpu, format: fp8}}\n"
        to_fp8(model, partial(is_fp8_module, parse_placement(text, config)), (128, 128))
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for m in model.modules():
        if isinstance(m, FP8Linear):
            w = torch.randn(m.weight.shape, device=device, generator=gen)
            m.weight.data, m.weight_scale_inv.data = block_quantize(w / math.sqrt(w.shape[1]))
    for name, p in model.named_parameters():
        if p.dtype == torch.float8_e4m3fn or name.endswith("weight_scale_inv"):
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            p.fill_(1.0)
        elif p.ndim == 2:
            p.normal_(0, 1 / math.sqrt(p.shape[-1]), generator=gen)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    for name, p in model.named_parameters():
        if p.dtype == torch.float32 and not name.endswith("weight_scale_inv"):
            p.data = p.data.to(dtype)
    if attention != "absorbed":  # as hetero serve loads: FP8 projections fused
        model.fuse_projections()
    return model.eval()


class ZeroExperts:
    """The GPU side alone: routed experts contribute nothing and cost nothing."""

    def submit(self, x, ids, weights) -> RoutedRun:
        y = torch.zeros_like(x)
        return RoutedRun(lambda: y)


def set_mode(model, config, engine, mode: str) -> None:
    for L in config.moe_layers:
        moe = model.model.layers[L].mlp
        if mode == "gpu_only":
            moe.routed = ZeroExperts()
            continue
        d = int(mode[5:]) if mode.startswith("defer") else 0
        moe.routed = HybridExperts(
            moe.experts,
            layer=L,
            engine=engine,
            num_experts=config.n_routed_experts,
            deferred=d,
            overlap=mode != "sequential",
            gpu=getattr(model, "packed_gpu", {}).get(L),  # --gpu-format int4's experts
        )


def hybrid_layers(model) -> list[HybridExperts]:
    """The model's HybridExperts, in layer order (seen through a StepProbe's wrapper)."""
    routed = (getattr(b.mlp, "routed", None) for b in model.model.layers)
    return [h for r in routed if isinstance(h := getattr(r, "inner", r), HybridExperts)]


def pin_for_policy(model, config, layers: list, device: str, threads: int) -> str:
    """As load_hybrid with runtime.pin_experts: the CPU experts' arrays page-locked in place
    (`layers`: the distinct PackedExperts), direct staging (the default runtime.staging_gb) and
    the measured rates (this machine's calibration, measured now if none is cached) given to
    every HybridExperts, so steps of DIRECT_POLICY_MIN_TOKENS tokens or more ask the prefill
    policy which experts the GPU streams. -> the rates' source."""
    from hetero.cpu_experts.staging import GroupStaging, register_host
    from hetero.placement import RuntimeSettings
    from hetero.sched.calibrate import load_rates
    from hetero.sched.hybrid import DIRECT_POLICY_MIN_TOKENS

    register_host(layers)
    staging = GroupStaging(int(RuntimeSettings().staging_gb * (1 << 30)) // 2, device, True)
    shape = config.hidden_size, config.moe_intermediate_size
    rates = load_rates("auto", shape, sorted({str(p.fmt) for p in layers}), threads=threads)
    for L in config.moe_layers:
        h = model.model.layers[L].mlp.routed
        h.staging, h.rates, h.policy_min_tokens = staging, rates, DIRECT_POLICY_MIN_TOKENS
    return rates.source


def packed_gpu_experts(config, fmt: Format, g: int, n: int, device: str) -> dict:
    """MoE layer -> its first g experts packed in `fmt` on the GPU (PackedGPUExperts, as a
    placement's `gpu_format: int4-gG` keeps them), n distinct random sets taken in turn."""
    from hetero.gpu.packed_experts import PackedGPUExperts

    H, I, E = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    sets = [random_layer(fmt, H, I, g, seed=100 + i) for i in range(n)]
    experts = range(g)
    return {L: PackedGPUExperts(sets[i % n], experts, E, device)
            for i, L in enumerate(config.moe_layers)}  # fmt: skip


def decode_batch(cache, seqs: range, q_len: int, ctx: int, device: str) -> ForwardBatch:
    """Sequences `seqs` at `ctx` tokens, the last `q_len` new: those rows of a contiguous cache,
    or in a PagedKVCache sequence i on pages 1 + i * P .. (P: the pages `cache.seq_len` needs)."""
    B = len(seqs)
    if not isinstance(cache, PagedKVCache):
        return ForwardBatch.build(list(seqs), [q_len] * B, [ctx] * B, device)
    P, used = -(-cache.seq_len // cache.page_size), -(-ctx // cache.page_size)
    tables = [list(range(1 + i * P, 1 + i * P + used)) for i in seqs]
    return ForwardBatch.paged(tables, [q_len] * B, [ctx] * B, cache.page_size, device)


def new_cache(model, B: int, length: int, page_size: int):
    """A contiguous cache of B rows, or (page_size > 0) a paged one with B sequences' pages."""
    if not page_size:
        return model.new_cache(B, length)
    cache = model.new_paged_cache(1 + B * -(-length // page_size), page_size)
    cache.seq_len = length
    return cache


def set_defer(model, d: int) -> None:
    """Every CPU-engine layer defers d of a token's experts from now on."""
    for block in model.model.layers:
        routed = getattr(block.mlp, "routed", None)
        routed = getattr(routed, "inner", routed)  # (the probe's wrapper)
        if hasattr(routed, "deferred"):
            routed.deferred = d


def set_attention(model, handle, name: str) -> None:
    """Every MLA layer attends through backend `name` from now on (issue 18's A/B: the Triton
    kernels or the torch ops; "absorbed" keeps W_UK / W_UV dense from then on, as the loader
    does for it, where the kernels read kv_b_proj's FP8 blocks); the engine's captured decode
    graphs are dropped so the next steps capture the new path (called between levels: no step
    runs)."""
    from hetero.sched.runtime import absorbs

    for block in model.model.layers:
        block.self_attn.set_backend(name)
        if absorbs(name, True) and block.self_attn.w_uk is None:
            block.self_attn.absorb()
    getattr(handle.engine.runner, "decoders", {}).clear()


def fp8_tiles(spec: str):
    """'mma=0+num_warps=8' -> hetero.gpu.fp8_gemm.Tiles with those fields ('' : the defaults)."""
    from hetero.gpu.fp8_gemm import Tiles

    fields = {f.name: f.type for f in dataclasses.fields(Tiles)}
    kw = {}
    for item in filter(None, spec.split("+")):
        name, _, value = item.partition("=")
        if name not in fields or not value.lstrip("-").isdigit():
            raise ValueError(f"{item!r}: want NAME=INT, NAME one of {sorted(fields)}")
        kw[name] = bool(int(value)) if fields[name] in (bool, "bool") else int(value)
    return Tiles(**kw)


def fp8_linears(model):
    """Every FP8Linear of the model, the fused ones too."""
    for m in model.modules():
        for lin in (m, m.__dict__.get("qkv_a"), m.__dict__.get("gate_up")):
            if isinstance(lin, FP8Linear):
                yield lin


def set_fp8_tiles(model, tiles) -> None:
    """Every FP8Linear of the model launches its GEMV with `tiles`."""
    for lin in fp8_linears(model):
        lin.tiles = tiles


def set_fp8_small(model, max_tokens: int) -> None:
    """Every FP8Linear of the model multiplies up to `max_tokens` rows past the GEMV's through
    hetero.gpu.fp8_small (0: cuBLAS's GEMM, the default)."""
    for lin in fp8_linears(model):
        lin.small_max_tokens = max_tokens


def set_fp8_prefill(model, gemms: tuple[str, ...]) -> None:
    """Every FP8Linear of the model multiplies past the decode kernels' rows through the first
    of `gemms` (hetero.gpu.fp8_prefill.ROUTES) that takes its shape, chosen again."""
    for lin in fp8_linears(model):
        lin.prefill_gemms, lin.prefill_gemm = gemms, None


def fill_prompts(model, cache, B: int, context: int, device: str) -> None:
    """Sequences 0..B-1 of `cache` prefilled with `context` random tokens each (<= 16K tokens
    a forward pass)."""
    per_pass = max(1, 16384 // context)
    for i in range(0, B, per_pass):
        seqs = range(i, min(B, i + per_pass))
        batch = decode_batch(cache, seqs, context, context, device)
        ids = torch.randint(0, model.config.vocab_size, (len(seqs) * context,)).to(device)
        model(ids, batch, cache)


def time_steps(model, engine, cache, B: int, start: int, steps: int, device: str, graphed=None):
    """`steps` decode steps of B sequences from context length `start`; ms per step and stats.
    `graphed`: a GraphedDecoder over `cache` to step with instead of the model."""
    gen = torch.Generator().manual_seed(B)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ms = []
    engine.stats.busy_s = engine.stats.wait_s = engine.stats.compute_s = 0.0
    for i in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (B,), generator=gen).to(device)
        batch = decode_batch(cache, range(B), 1, start + i + 1, device)
        sync()
        t0 = time.perf_counter()
        if graphed is None:
            model(ids, batch, cache, last_only=True)
        elif batch.page_table is not None:
            graphed.paged_step(ids, batch.positions, batch.page_table, batch.slot_mapping,
                               batch.ctx_lens)  # fmt: skip
        else:
            graphed.step(ids, batch.positions)
        sync()
        ms.append((time.perf_counter() - t0) * 1e3)
    wall = sum(ms) / 1e3
    ms.sort()
    return {
        "ms": round(ms[len(ms) // 2], 3),
        "mean_ms": round(wall / steps * 1e3, 3),
        "cpu_busy": round(engine.stats.busy_s / wall, 3),
        "cpu_ms": round(engine.stats.busy_s / steps * 1e3, 3),
        "cpu_compute_ms": round(engine.stats.compute_s / steps * 1e3, 3),
        "wait_ms": round(engine.stats.wait_s / steps * 1e3, 3),
    }


class DecodeRef:
    """bench/decode.py's measure on this same model and CPU engine: batch-1 decode steps of one
    sequence over a paged cache as the engine's (the same attention kernels), each layer's GPU
    work from graph segments (CUDA graphs on a GPU): the rate the engine's batch-1 decode is
    held to."""

    PROMPT, PAGE = 16, 64  # tokens of context before the timed steps; the cache's page size

    @torch.no_grad()
    def __init__(self, model, cpu, device: str, steps: int, rounds: int) -> None:
        self.model, self.cpu, self.device, self.steps = model, cpu, device, steps
        length = self.PROMPT + (steps + 2) * (rounds + 1) + 8
        self.cache = new_cache(model, 1, length, self.PAGE)
        fill_prompts(model, self.cache, 1, self.PROMPT, device)
        self.graphed = GraphedDecoder(model, self.cache, device.startswith("cuda"), batch=1,
                                      pages=-(-length // self.PAGE))  # fmt: skip
        self.pos = self.PROMPT

    def time(self) -> dict:
        args = self.model, self.cpu, self.cache, 1
        time_steps(*args, self.pos, 2, self.device, self.graphed)  # warm-up (graph capture)
        r = time_steps(*args, self.pos + 2, self.steps, self.device, self.graphed)
        self.pos += self.steps + 2
        return {"ms": r["ms"], "cpu_busy": r["cpu_busy"]}
