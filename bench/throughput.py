"""Serving throughput of the engine (hetero/engine/): N requests, prompt and output lengths drawn
from distributions, C of them in flight (closed loop: a new one when one finishes), for each C.
One JSON line per (workload, concurrency) on stdout, after a `setup` line and a `naive` one.

    python bench/throughput.py --workload v2-lite --concurrency 1,4,16,64 --requests 4x \
        --prompt-len uniform:64,512 --output-len fixed:128 --shared-prefix 32

Each line: output tok/s, requests/s, TTFT / time per output token / end-to-end latency
percentiles (ms, from the stream's arrival times), the prefix cache's share of prompt tokens,
preemptions, the mean running batch, and, when routed experts run on the CPU engine,
`read_share`: the unique experts of each step's tokens, a MoE layer at a time, in bytes of the
CPU format, over the engine's busy seconds (the rate at which the CPU side reads its weights,
if each used expert is read once a step), as a share of the host's read bandwidth measured in
the same run (bench/cpu_moe.read_bandwidth with the engine's threads). `naive`: the static
`hetero.generate` loop on the first `--naive` requests one at a time; `vs_naive` compares.

Workloads: `demo` (the shipped demo model; `--placement configs/demo.yaml`: its experts on the
CPU engine), `v2-lite` and `v3` (whole depth, random weights built as bench/workloads.py builds
them; `v3 --cpu-layers 4`: the MoE layers take their CPU experts in turn from 4 random layers).
Prompts are random ids (a stub tokenizer for random models); temperature 0, ignore_eos, so
every request produces exactly its drawn output length. Every level draws new prompts (the
same shared prefix), so only the prefix is reused across levels, as a system prompt is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prediction import predictor  # noqa: E402
from bench.serving_load import (  # noqa: E402
    GPUExperts,
    Req,
    StepProbe,
    StubTokenizer,
    draw_requests,
    drive,
    host_read,
    latency_summary,
    machine,
    parse_dist,
    policy_modes,
    set_levels,
    settle_times,
)
from bench.workloads import (  # noqa: E402
    WORKLOADS,
    DecodeRef,
    pin_for_policy,
    random_model,
    set_defer,
    set_mode,
    slice_config,
)
from hetero.config import ModelConfig  # noqa: E402
from hetero.engine.engine import Engine, RequestError, ServingConfig  # noqa: E402
from hetero.engine.handle import EngineHandle  # noqa: E402
from hetero.engine.params import SamplingParams  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "hetero" / "demo"
DEFER = {"v2-lite": 1, "v3": 3}  # v2-lite: configs/deepseek-v2-lite.yaml's deferral
GPU_FORMAT = {"v2-lite": "bf16", "v3": "fp8"}  # as the checkpoints are published


def load(args) -> tuple:
    """-> (model, CPU engine or None, tokenizer, close, facts for the JSON lines)."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.workload == "demo":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(DEMO)
        if args.placement:
            from hetero.placement import load_placement
            from hetero.sched.runtime import HybridOptions, load_hybrid

            config = ModelConfig.from_hf(DEMO)
            placement = load_placement(args.placement, config)
            opts = HybridOptions(device=args.device, dtype=dtype, progress=False)
            hybrid = load_hybrid(DEMO, placement, opts)
            return hybrid.model, hybrid.engine, tokenizer, hybrid.close, {}
        from hetero.loader import load_model

        model = load_model(DEMO, device=args.device, dtype=dtype, progress=False)
        return model, None, tokenizer, lambda: None, {}
    from bench.cpu_moe import random_layer
    from hetero.cpu_experts.engine import CPUExperts, EngineConfig
    from hetero.cpu_experts.formats import Format
    from hetero.sched.runtime import default_stream_min_tokens

    config = ModelConfig.from_hf(slice_config(args.workload, args.moe_layers or None))
    E, moe = config.n_routed_experts, config.moe_layers
    g = E if args.gpu_experts == "all" else int(args.gpu_experts)
    gpu_format = args.gpu_format or GPU_FORMAT[args.workload]
    model = random_model(config, args.device, dtype, gpu_format == "fp8", g, args.attention)
    facts = {"layers": config.num_hidden_layers, "moe_layers": len(moe), "gpu_experts": g,
             "gpu_format": gpu_format, "attention": args.attention}  # fmt: skip
    if g >= E:
        for L in moe:
            model.model.layers[L].mlp.routed = GPUExperts(model.model.layers[L].mlp.experts, E)
        return model, None, StubTokenizer(), lambda: None, facts
    fmt, n = Format.parse(args.format), min(args.cpu_layers or len(moe), len(moe))
    H, I = config.hidden_size, config.moe_intermediate_size
    distinct = [random_layer(fmt, H, I, E, seed=L) for L in moe[:n]]
    layers = {L: distinct[i % n] for i, L in enumerate(moe)}  # MoE layer i: distinct i % n
    cpu = CPUExperts(layers, EngineConfig(threads=args.threads))
    d = DEFER[args.workload] if args.defer is None else args.defer
    set_mode(model, config, cpu, f"defer{d}" if d else "overlap")
    for L in moe:  # long prefill streams the CPU's experts to the GPU, as load_hybrid does
        s = args.stream_min_tokens
        s = default_stream_min_tokens(cpu.uses_amx(L)) if s < 0 else s
        model.model.layers[L].mlp.routed.stream_min_tokens = s
    facts |= {"format": str(fmt), "cpu_layers": n, "defer": d, "cpu_threads": cpu.threads}
    if args.pin_experts:  # page-locked: decode steps of 16+ tokens ask the policy
        facts["policy_rates"] = pin_for_policy(model, config, distinct, args.device, cpu.threads)
    return model, cpu, StubTokenizer(), cpu.close, facts


@torch.no_grad()
def naive(model, reqs, device: str) -> dict:
    """The static loop (hetero.generate), one request at a time."""
    from hetero.generate import SamplingParams as Static
    from hetero.generate import generate

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    generate(model, [reqs[0].prompt], Static(max_tokens=2))  # warm-up
    sync()
    t0, tokens = time.perf_counter(), 0
    for r in reqs:
        tokens += len(generate(model, [r.prompt], Static(max_tokens=r.output))[0])
    sync()
    wall = time.perf_counter() - t0
    return {"requests": len(reqs), "output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tok_s": round(tokens / wall, 2)}  # fmt: skip


def batch1_ab(handle, ref: DecodeRef, rounds: int, vocab: int) -> dict:
    """bench/decode.py's step and the engine's batch-1 decode (one request, TPOT p50),
    alternated `rounds` times: a VM's speed drifts within a run, so each engine figure has
    its reference beside it."""
    gen = torch.Generator().manual_seed(7)
    # one request alone first: the batch-1 graphs are captured here, not in round 1 (the
    # warm-up's requests ran together; 2026-12-04 round 1 was 203 ms against 114 after)
    drive(handle, [Req(torch.randint(0, vocab, (32,), generator=gen).tolist(), 4)], params, 1)
    pairs = []
    for _ in range(rounds):
        r = ref.time()
        prompt = torch.randint(0, vocab, (32,), generator=gen).tolist()
        req = Req(prompt, ref.steps + 8)
        timings, _ = drive(handle, [req], params, 1)
        pairs.append((timings[0].tpot * 1e3, r["ms"]))
    ratios = sorted(e / m for e, m in pairs)
    return {
        "mode": "batch1_ab",
        "engine_tpot_ms": [round(e, 3) for e, _ in pairs],
        "decode_ref_ms": [round(m, 3) for _, m in pairs],
        "engine_vs_ref": [round(x, 3) for x in ratios],
        "engine_vs_ref_median": round(ratios[len(ratios) // 2], 3),
    }


def serving_config(args) -> ServingConfig:
    return ServingConfig(
        page_size=args.page_size, kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        cuda_graph_max_batch=args.cuda_graph_max_batch, deterministic=args.deterministic,
    )  # fmt: skip


def plan(args, vocab: int) -> tuple[list[tuple[int, list]], list]:
    """-> [(concurrency, its requests)] and the warm-up requests: new prompts for each level,
    all starting with the same shared prefix."""
    gen = torch.Generator().manual_seed(args.seed)
    prefix = torch.randint(0, vocab, (args.shared_prefix,), generator=gen).tolist()
    lens = args.prompt_len, args.output_len
    levels = []
    for i, C in enumerate(args.concurrency):
        n = args.requests[min(i, len(args.requests) - 1)]
        n = n if n > 0 else -n * C  # (-K: K x the concurrency)
        # seeded by the level's index too: two levels at one concurrency (an A/B) draw
        # different prompts, so the second does not find the first's in the prefix cache
        levels.append((C, draw_requests(n, *lens, prefix, vocab, [args.seed, C, i])))
    return levels, draw_requests(args.warmup, *lens, prefix, vocab, [args.seed, 2**31])


def params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def level(handle, probe, C: int, reqs, host_gbps: float | None) -> dict:
    """One concurrency level: its latencies, throughput, prefix hits, preemptions, batch."""
    graphs = getattr(handle.engine.runner, "decoders", {})  # CUDA-graph sets, one a bucket
    s0, g0 = handle.stats(), len(graphs)
    probe.reset()
    timings, wall = drive(handle, reqs, params, C)
    s1 = handle.stats()
    hits, prompt = s1.prefix_hit_tokens - s0.prefix_hit_tokens, s1.prompt_tokens - s0.prompt_tokens
    return {
        "mode": "engine",
        "concurrency": C,
        "requests": len(reqs),
        "prompt_tokens": sum(len(r.prompt) for r in reqs),
        **latency_summary(timings, wall),
        "prefix_hit_share": round(hits / max(prompt, 1), 4),
        "preemptions": s1.preemptions - s0.preemptions,
        "graph_captures": len(graphs) - g0,  # buckets first met here: captured in the timing
        **probe.summary(wall, host_gbps),
        "host_read_gbps": host_gbps,
    }


def run(args) -> None:
    t0 = time.perf_counter()
    model, cpu, tokenizer, close, facts = load(args)
    serving = serving_config(args)
    engine = Engine(model, tokenizer, serving)
    probe = StepProbe(engine, cpu)
    handle = EngineHandle(engine, cpu)
    base = {
        "bench": "throughput",
        "workload": args.workload,
        **facts,
        "machine": machine(args.device),
        "config": {k: str(v) if hasattr(v, "draw") else v for k, v in vars(args).items()},
        "serving": dataclasses.asdict(serving),
    }
    levels, warm = plan(args, model.config.vocab_size)
    predict = predictor(args, model.config, cpu, facts)  # hetero.predict's figures, if calibrated
    base["calibration"] = predict.rates.source if predict else None
    try:
        for r in [r for _, reqs in levels for r in reqs] + warm:  # refused before time is spent
            try:
                engine.check(r.prompt, params(r.output))
            except RequestError as e:
                raise SystemExit(f"a drawn request cannot be served: {e}") from None
        setup = {"load_s": round(time.perf_counter() - t0, 1)}
        if warm:  # compiles kernels and caches the shared prefix for every level alike
            short = [dataclasses.replace(r, output=min(r.output, 8)) for r in warm]
            t1 = time.perf_counter()
            drive(handle, short, params, min(len(warm), max(args.concurrency)))
            setup["warmup_s"] = round(time.perf_counter() - t1, 1)
        if cpu is not None and args.settle_s > 0:
            g = facts.get("gpu_experts", 0)
            setup["settle_cpu_alone_ms"] = settle_times(cpu, model.config, 1, g, args.settle_s)
        if cpu is not None and args.read_bw_gb > 0:
            setup |= host_read(cpu, args.read_bw_gb)
        print(json.dumps({**base, "mode": "setup", **setup}), flush=True)
        ref = naive(model, levels[0][1][: args.naive], args.device) if args.naive else None
        if ref:
            print(json.dumps({**base, "mode": "naive", "concurrency": 1, **ref}), flush=True)
        if cpu is not None and args.ab_rounds:
            dref = DecodeRef(model, cpu, args.device, args.ab_steps, args.ab_rounds)
            ab = batch1_ab(handle, dref, args.ab_rounds, model.config.vocab_size)
            if predict:  # beside bench/decode.py's step
                ab |= predict.batch1(statistics.median(ab["decode_ref_ms"]), dref.pos)
            print(json.dumps({**base, **ab}), flush=True)
        defers = args.defer_levels or [facts.get("defer")]
        for i, (C, reqs) in enumerate(levels):
            d = defers[i % len(defers)]  # --defer-levels 3,0: levels alternate between them
            if d is not None:
                set_defer(model, d)
            knobs = set_levels(args, i, model, handle, cpu)
            row = {**base, **level(handle, probe, C, reqs, setup.get("host_read_gbps"))}
            row |= {"defer": d, **knobs, **policy_modes(model, cpu)}
            row |= predict.level(row["output_tok_s"], C, reqs, d) if predict else {}
            if ref:
                row["naive_tok_s"] = ref["output_tok_s"]
                row["vs_naive"] = round(row["output_tok_s"] / ref["output_tok_s"], 3)
            print(json.dumps(row), flush=True)
    finally:
        handle.close()
        close()


def _dist(spec: str):
    try:
        return parse_dist(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _counts(spec: str) -> list[int]:
    """'16' or '4x' (4 x the concurrency, stored as -4), comma-separated per level."""
    try:
        out = [-int(s[:-1]) if s.endswith("x") else int(s) for s in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: write N or Kx (K x concurrency)") from None
    if any(n == 0 for n in out):
        raise argparse.ArgumentTypeError(f"{spec!r}: counts must be >= 1")
    return out


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("demo", *(w for w in WORKLOADS if w != "v3-slice")),
                   default="demo")  # fmt: skip
    p.add_argument("--concurrency", type=ints, default=[1, 4, 16, 64])
    p.add_argument(
        "--requests",
        type=_counts,
        default=[-4],
        help="a level's requests: N, or Kx = K x its concurrency (per level: 8,16,4x)",
    )
    p.add_argument("--prompt-len", type=_dist, default=parse_dist("uniform:64,512"))
    p.add_argument("--output-len", type=_dist, default=parse_dist("fixed:128"))
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    p.add_argument("--warmup", type=int, default=4, help="requests before the timed levels")
    p.add_argument("--naive", type=int, default=2, help="requests through hetero.generate (0: no)")
    s = ServingConfig()
    p.add_argument("--page-size", type=int, default=s.page_size)
    p.add_argument("--kv-cache-tokens", type=int, default=s.kv_cache_tokens)
    p.add_argument("--max-num-seqs", type=int, default=s.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=s.max_num_batched_tokens)
    p.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=s.cuda_graph_max_batch,
        help="decode steps of up to this many requests replay CUDA graphs (0: never)",
    )
    p.add_argument(
        "--deterministic", action="store_true", help="the engine's deterministic mode (its cost)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, else fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--placement", help="demo: a placement YAML (e.g. configs/demo.yaml)")
    p.add_argument("--moe-layers", type=int, default=0, help="v2-lite/v3: this many (0: all)")
    p.add_argument("--gpu-experts", default="0", help="v2-lite/v3: GPU experts a layer, or all")
    p.add_argument("--gpu-format", choices=("fp8", "bf16"), help="default: v3 fp8, v2-lite bf16")
    p.add_argument("--format", default="int4", help="CPU experts")
    p.add_argument("--attention", choices=("auto", "triton", "flashinfer", "absorbed"),
                   default="auto",
                   help="MLA: the kernels or the torch ops (issue 18's before)")  # fmt: skip
    p.add_argument("--attention-levels", type=lambda v: v.split(","),
                   help="MLA backend of each level in turn (e.g. triton,absorbed)")  # fmt: skip
    p.add_argument("--cpu-layers", type=int, default=0, help="distinct random CPU expert layers")
    p.add_argument("--defer", type=int, help="CPU experts deferred a token; default v3 3, v2 1")
    p.add_argument(
        "--defer-levels",
        type=ints,
        help="deferral of each level in turn (e.g. 3,0 with --concurrency 16,16: both at 16)",
    )
    p.add_argument(
        "--ring-levels",
        type=ints,
        help="CPU jobs of up to this many tokens on the engine's ring, each level in turn "
        "(e.g. 15,64: before and after EngineConfig.ring_tokens)",
    )
    pin = "v2-lite/v3: CPU experts page-locked, measured rates: steps of 16+ tokens split"
    p.add_argument("--pin-experts", action="store_true", help=pin)
    p.add_argument("--policy-levels", type=ints, help="with --pin-experts: the tokens from "
                   "which a step asks the policy, each level in turn (e.g. 128,16)")  # fmt: skip
    p.add_argument(
        "--ring-heavy-levels",
        type=ints,
        help="ring jobs whose busiest expert has this many tokens go to the GEMM paths, each "
        "level in turn (0: none; default the GEMM threshold, 16 with AMX)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU expert threads; 0: cores - 1")
    p.add_argument("--stream-min-tokens", type=int, default=-1, help="-1: as load_hybrid")
    p.add_argument("--settle-s", type=float, default=30)
    p.add_argument(
        "--ab-rounds",
        type=int,
        default=0,
        help="rounds of bench/decode.py's batch-1 step alternated with the engine's (0: none)",
    )
    p.add_argument("--ab-steps", type=int, default=12, help="decode steps a round")
    p.add_argument("--read-bw-gb", type=float, default=4, help="host read probe array (0: no)")
    p.add_argument("--calibration", default="cache", help="hetero.predict beside each figure: "
                   "cache (this machine's, if any), auto (measure if not), a file")  # fmt: skip
    p.add_argument("--routing-alpha", type=float, help="for the prediction (random model: 0.69)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.placement and args.workload != "demo":
        p.error("--placement is for --workload demo (v2-lite/v3 build their split themselves)")
    if args.gpu_experts != "all" and not args.gpu_experts.isdigit():
        p.error(f"--gpu-experts {args.gpu_experts!r}: a count or 'all'")
    return args


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
