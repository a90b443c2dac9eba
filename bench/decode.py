"""Decode throughput of the hybrid runtime: routed experts on the CPU (INT4), the rest on the GPU.

For batch sizes B it times decode steps in these modes, on the same model and cache:
  sequential  each MoE layer waits for its CPU experts before any GPU expert work (no overlap)
  overlap     CPU experts run while the GPU computes the shared experts
  defer{d}    overlap + each token's d lowest-weight CPU experts added one layer late
and, for reference, `gpu_only` (CPU experts replaced by zeros: the GPU side alone) and, in every
row, `cpu_alone_ms` (the engine alone on a step's tokens, host to host: the CPU side alone).
`--rounds R` times all modes R times over (rounds after the first in a shuffled order) and
reports each mode's median round.

Workloads (random weights built in memory): `v3-slice` is DeepSeek-V3 at full width with a few
layers (1 dense + N MoE); its per-token time is extrapolated to the whole model (DeepSeek-V3:
61 layers, 58 of them MoE, read from its config) as
  t_full = t_gpu_only * layers / L + (t_step - t_gpu_only) * moe_layers / N_moe.
`v3` is the whole DeepSeek-V3 shape (61 layers, 58 MoE): nothing is extrapolated. 58 layers of
INT4 experts (366 GB) do not fit a 128 GB host, so the MoE layers take their CPU experts in turn
from `--cpu-layers N` distinct random layers (6.3 GB each at int4-g32). A layer reads ~200 MB of
experts at batch 1, 8 of 256 drawn afresh; between two uses of the same arrays N - 1 other layers
stream (N - 1) x 200 MB through the 300 MB L3, so from N = 4 the weights come from RAM as with 58
distinct layers (and a fresh draw would find few of its experts cached even then: 8 of 256).
`v2-lite` is the whole DeepSeek-V2-Lite shape (27 layers). JSON lines on stdout.
`--baseline` instead times transformers' DeepseekV3ForCausalLM with one MoE layer whose experts
accelerate's device_map keeps on the CPU (streamed to the GPU every step).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu_moe import random_layer  # noqa: E402
from bench.gpu_floor import gpu_floor, hbm_copy_gbps  # noqa: E402
from bench.serving_load import settle_times, time_cpu_alone  # noqa: E402
from bench.timeline import gpu_timeline, profile_step, trace_steps  # noqa: E402
from bench.workloads import (  # noqa: E402
    WORKLOADS,
    fill_prompts,
    fp8_tiles,
    full_layers,
    hybrid_layers,
    new_cache,
    packed_gpu_experts,
    random_model,
    set_fp8_small,
    set_fp8_tiles,
    set_mode,
    slice_config,
    time_steps,
)
from hetero.config import ModelConfig  # noqa: E402
from hetero.cpu_experts.engine import CPUExperts, EngineConfig  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402
from hetero.sched.graphs import GraphedDecoder  # noqa: E402


def settle(engine, config, B: int, args) -> None:
    """settle_times, printed as a JSON line."""
    times = settle_times(engine, config, B, args.gpu_experts, args.settle_s)
    print(json.dumps({"bench": "decode", "batch": B, "mode": "settle", "cpu_alone_ms": times}))


def skew_routing(model, config, skew: float) -> None:
    """Every MoE gate's correction bias = skew * linspace(1, -1, E): expert e is chosen more
    often the lower its id (the weights stay the unbiased scores, as V3's noaux_tc), so a
    layer's first G experts, the ones --gpu-experts keeps, are also its hottest: a profile's
    placement. The share of slots they take is measured (gpu_slot_share)."""
    if config.topk_method != "noaux_tc":
        raise SystemExit(
            f"--routing-skew needs a correction bias (noaux_tc), not {config.topk_method}"
        )
    for L in config.moe_layers:
        bias = model.model.layers[L].mlp.gate.e_score_correction_bias
        bias.copy_(skew * torch.linspace(1, -1, bias.numel(), device=bias.device))


def gpu_slot_share(model, engine, cache, B: int, pos: int, device: str, graphed) -> float | None:
    """Over two steps of the current (hybrid) mode: the share of routed slots that went to
    GPU experts; None without hybrid layers."""
    layers = hybrid_layers(model)
    if not layers:
        return None
    for h in layers:
        h.counts = torch.zeros(h.on_gpu.numel(), dtype=torch.int64, device=device)
    time_steps(model, engine, cache, B, pos, 2, device, graphed)
    gpu = sum(int(h.counts[h.on_gpu.to(device)].sum()) for h in layers)
    total = sum(int(h.counts.sum()) for h in layers)
    for h in layers:
        h.counts = None
    return round(gpu / max(total, 1), 4)


def median_round(rounds: list[dict]) -> dict:
    """The round with the median step time, and every round's step time."""
    ordered = sorted(rounds, key=lambda r: r["ms"])
    return {**ordered[(len(ordered) - 1) // 2], "ms_rounds": [r["ms"] for r in rounds]}


def run(args) -> None:
    config = ModelConfig.from_hf(slice_config(args.workload, args.moe_layers))
    device = args.device
    fp8, packed = args.gpu_format != "bf16", args.gpu_format.startswith("int4")
    resident = 0 if packed else args.gpu_experts  # int4: packed arrays, not modules
    model = random_model(config, device, torch.bfloat16, fp8, resident, args.attention)
    if args.routing_skew:
        skew_routing(model, config, args.routing_skew)
    if args.fp8_tiles:
        set_fp8_tiles(model, fp8_tiles(args.fp8_tiles))
    if args.fp8_small:
        set_fp8_small(model, args.fp8_small)
    fmt = Format.parse(args.format)
    H, I, E = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    moe = config.moe_layers
    n = min(args.cpu_layers or len(moe), len(moe))
    if args.modes == ["gpu_only"]:  # the GPU side alone: an engine that is never called
        n, E = 1, 1
    bar = tqdm(moe[:n], desc="random CPU expert layers", unit="layer", file=sys.stderr)
    distinct = [random_layer(fmt, H, I, E, seed=L) for L in bar]
    layers = {L: distinct[i % n] for i, L in enumerate(moe)}  # MoE layer i: distinct i % n
    if packed and args.gpu_experts:
        gfmt = Format.parse(args.gpu_format)
        model.packed_gpu = packed_gpu_experts(config, gfmt, args.gpu_experts, n, device)
    engine = CPUExperts(layers, EngineConfig(
        threads=args.threads, ring=not args.no_ring, caller_spin_s=args.caller_spin_s,
        caller_nap_s=args.caller_nap_s,
    ))  # fmt: skip
    L, M = config.num_hidden_layers, len(config.moe_layers)
    base = {
        "bench": "decode",
        "workload": args.workload,
        "layers": L,
        "moe_layers": M,
        "format": str(fmt),
        "gpu_format": args.gpu_format,
        "graphs": args.graphs,
        "paged": args.paged,
        "attention": args.attention,
        "fp8_tiles": args.fp8_tiles or "default",
        "fp8_small": args.fp8_small,
        "gpu_experts": args.gpu_experts,
        "routing_skew": args.routing_skew,
        "cpu_layers": n,
        "cpu_threads": engine.threads,
        "caller_spin_s": args.caller_spin_s,
        "ring": bool(engine._ring_tokens),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    }
    hbm = hbm_copy_gbps(device) if device.startswith("cuda") else 0.0
    modes = args.modes or ["gpu_only", "sequential", "overlap"] + [f"defer{d}" for d in args.defer]
    gpu_alone = modes == ["gpu_only"]  # the GPU side only: no CPU side to time or settle
    full, full_moe = full_layers(args.workload)  # of the model the workload stands for
    for B, context in [(B, c) for B in args.batch for c in args.context]:
        length = context + (len(modes) * args.rounds + 2) * (args.steps + 2) + 7
        cache = new_cache(model, B, length, args.paged)
        set_mode(model, config, engine, "gpu_only" if gpu_alone else "overlap")
        fill_prompts(model, cache, B, context, device)
        graphed = None
        if args.graphs:  # CUDA graphs on a GPU; the same segments eagerly elsewhere
            P = -(-length // args.paged) if args.paged else 0
            graphed = GraphedDecoder(model, cache, device.startswith("cuda"), batch=B, pages=P)
        if not gpu_alone:
            settle(engine, config, B, args)
        pos, rounds = context, {mode: [] for mode in modes}
        order = random.Random(B)  # rounds of all modes, each in its own order: a VM's slow
        for round_ in range(args.rounds):  # spell then hits every mode, not always the same one
            cpu_alone = 0.0 if gpu_alone else time_cpu_alone(
                engine, config, B, args.steps, args.gpu_experts
            )  # fmt: skip
            for mode in modes if round_ == 0 else order.sample(modes, len(modes)):
                set_mode(model, config, engine, mode)
                time_steps(model, engine, cache, B, pos, 2, device, graphed)  # warm-up
                pos += 2
                r = time_steps(model, engine, cache, B, pos, args.steps, device, graphed)
                rounds[mode].append({**r, "cpu_alone_ms": cpu_alone})
                pos += args.steps
        rows = {mode: median_round(rs) for mode, rs in rounds.items()}
        share = None if gpu_alone else gpu_slot_share(model, engine, cache, B, pos, device, graphed)
        pos += 2
        if args.profile:
            profiled = [m for m in ("gpu_only", "overlap") if m in modes]
            profile_step(model, config, engine, cache, B, pos, device, args.profile, profiled)
            pos += 2
        if args.gpu_timeline:
            rows["gpu_timeline"] = gpu_timeline(
                model, config, engine, cache, B, pos, device, graphed, args.gpu_timeline
            )
            pos += 3
        if args.trace:
            rows["trace"] = trace_steps(model, config, engine, cache, B, pos, device, graphed, args)
            pos += args.steps
        # the GPU side alone, for the per-layer split and the slice's extrapolation (for `v3`
        # itself t_full = t_step whatever it is: 0 where --modes left gpu_only out)
        gpu = rows["gpu_only"]["ms"] if "gpu_only" in rows else 0.0
        for mode, r in rows.items():
            out = {**base, "batch": B, "context": context, "mode": mode, **r}
            if graphed is not None:  # which kernel decoded: auto's choice, as the graphs made it
                out["flashinfer_decodes"] = graphed.mla_plan is not None
            if share is not None and mode not in ("trace", "gpu_timeline", "gpu_only"):
                out["gpu_slot_share"] = share
            if mode in ("trace", "gpu_timeline"):
                print(json.dumps(out), flush=True)
                continue
            if mode == "gpu_only" and device.startswith("cuda"):
                out |= gpu_floor(model, config, B, pos, r["ms"], hbm)
            if mode != "gpu_only":
                out["vs_cpu_alone"] = round(r["ms"] / r["cpu_alone_ms"], 3)
                if "sequential" in rows:
                    out["speedup_vs_sequential"] = round(rows["sequential"]["ms"] / r["ms"], 3)
                out["per_layer"] = {
                    "gpu_ms": round(gpu / L, 3),
                    "cpu_ms": round(r["cpu_ms"] / M, 3),
                    "wait_ms": round(r["wait_ms"] / M, 3),
                }
            if args.workload == "v3" or (args.workload == "v3-slice" and "gpu_only" in rows):
                t61 = gpu * full / L + (r["ms"] - gpu) * full_moe / M
                out["v3_ms_per_step"] = round(t61, 1)
                out["v3_tokens_per_s"] = round(1e3 * B / t61, 2)
                # the CPU's share of V3's step by the same estimate, on mean step times (as
                # cpu_ms): its time a MoE layer times V3's MoE layers (the slice's own cpu_busy
                # charges its fixed part, the LM head and the first layers that wait for the
                # new token, to M layers, not 58)
                mean61 = gpu * full / L + (r["mean_ms"] - gpu) * full_moe / M
                out["v3_cpu_busy"] = round(r["cpu_ms"] / M * full_moe / mean61, 3)
            else:
                out["tokens_per_s"] = round(1e3 * B / r["ms"], 2)
            print(json.dumps(out), flush=True)
    engine.close()


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=WORKLOADS, default="v3-slice")
    p.add_argument("--moe-layers", type=int, default=3, help="v3-slice: MoE layers after 1 dense")
    p.add_argument("--format", default="int4", help="CPU experts")
    p.add_argument("--gpu-format", choices=("fp8", "bf16", "int4", "int4-g128"), default="fp8",
                   help="GPU experts (int4: packed as the CPU's, PackedGPUExperts)")  # fmt: skip
    p.add_argument("--gpu-experts", type=int, default=0, help="v3*: GPU experts a layer")
    p.add_argument("--routing-skew", type=float, default=0.0,
                   help="V3 gates' correction bias skew * linspace(1, -1, E): low ids hot, the "
                        "GPU's experts the hottest (0: uniform random routing)")  # fmt: skip
    p.add_argument(
        "--cpu-layers", type=int, default=0,
        help="distinct random CPU expert layers, taken in turn by the MoE layers (0: one each)",
    )  # fmt: skip
    p.add_argument("--batch", type=ints, default=[1, 4, 16])
    p.add_argument("--defer", type=ints, default=[1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--context", type=ints, default=[16], help="tokens each sequence starts with")
    p.add_argument("--paged", type=int, default=0, help="page size of a paged cache (0: rows)")
    p.add_argument(
        "--fp8-tiles",
        default="",
        help="the FP8 GEMV's launch settings, e.g. mma=0+num_warps=8 (fp8_gemm.Tiles)",
    )
    p.add_argument("--fp8-small", type=int, default=0, help="FP8 layers' rows past the GEMV's "
                   "up to this many through hetero.gpu.fp8_small, not cuBLAS (0: off)")  # fmt: skip
    p.add_argument("--attention", choices=("auto", "triton", "flashinfer", "absorbed"),
                   default="auto", help="MLA: the kernels (a paged cache; flashinfer: its "
                   "decode kernel wherever it runs, auto: where it pays) or the torch "
                   "ops")  # fmt: skip
    p.add_argument("--modes", type=lambda s: s.split(","), help="default: all (gpu_only, ...)")
    p.add_argument("--rounds", type=int, default=1, help="all modes this many times; medians")
    p.add_argument("--threads", type=int, default=0, help="CPU expert threads; 0: cores - 1")
    p.add_argument("--settle-s", type=float, default=60, help="at most this long: see settle()")
    p.add_argument("--caller-spin-s", type=float, default=EngineConfig.caller_spin_s)
    p.add_argument("--caller-nap-s", type=float, default=EngineConfig.caller_nap_s)
    p.add_argument("--no-ring", action="store_true", help="decode jobs through the worker's queue")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--baseline", action="store_true", help="then, in the same run, transformers' device_map"
    )
    p.add_argument("--baseline-only", action="store_true", help="only transformers' device_map")
    p.add_argument("--profile", help="a directory for torch.profiler tables of one step")
    p.add_argument(
        "--gpu-timeline",
        help="DIR: one gpu_only step under torch.profiler (as run: "
        "graphed with --graphs): its chrome trace and GPU idle time",
    )
    p.add_argument("--trace", help="FILE: the CPU engine's timeline of the deepest deferral")
    p.add_argument(
        "--graphs", action="store_true", help="decode steps from per-layer CUDA graph segments"
    )
    p.add_argument(
        "--prefill",
        type=lambda s: [int(t) for t in s.split(",")],
        help="instead: one V3 layer's CPU experts at these token counts, CPU vs GPU streaming",
    )
    args = p.parse_args()
    if args.workload != "v3-slice":
        args.moe_layers = None
    if args.prefill:
        from bench.prefill_crossover import prefill_crossover

        prefill_crossover(args)
        return
    if not args.baseline_only:
        run(args)
    if args.baseline or args.baseline_only:
        from bench.baseline_hf import baseline

        baseline(args)


if __name__ == "__main__":
    main()
