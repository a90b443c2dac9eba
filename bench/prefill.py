"""Prefill on the GPU machine: one DeepSeek-V3 MoE layer's CPU experts streamed at PCIe speed,
then the whole V3 depth's time to first token for long prompts, then once over HTTP.

    python bench/prefill.py --lengths 512,2048,8192,32768 --cpu-layers 4
    python bench/prefill.py --only layer --layer-tokens 512,2048,8192

JSON lines (stdout):
- `h2d`: pinned host -> device GB/s of a 1 GiB copy in this run: the limit streaming is held to;
- `layer`: one layer's CPU experts for T tokens (ids random over all 256 experts): `staged`
  (only the routed experts, in groups through the bounded double-buffered staging), `direct`
  (the same groups copied straight from the page-locked arrays, no gather), `whole`
  (the packed layer through one buffer, the previous path) and, up to --cpu-max-tokens, the CPU
  engine; bytes sent, GB/s and its fraction of the `h2d` line;
- `depth`: an N-token prompt through the serving engine on the whole V3 depth (random weights,
  FP8 non-expert modules, Triton MLA, the MoE layers' CPU experts in turn from --cpu-layers
  distinct random layers so that they come from RAM): TTFT, prefill tok/s, the chunks' steps;
- `http`: the longest prompt up to 8K once through `/v1/completions` of the server's app.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.cpu_moe import random_layer  # noqa: E402
from bench.serving_load import StubTokenizer, machine  # noqa: E402
from bench.workloads import random_model, set_fp8_prefill, set_mode, slice_config  # noqa: E402
from hetero.config import ModelConfig  # noqa: E402
from hetero.cpu_experts.engine import CPUExperts, EngineConfig  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402
from hetero.cpu_experts.staging import GroupStaging, register_host  # noqa: E402
from hetero.sched.hybrid import HybridExperts  # noqa: E402

GIB = 1 << 30


def h2d_gbps(size: int = GIB, repeats: int = 5) -> float:
    """Best pinned host -> device copy bandwidth of `size` bytes."""
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return size / best / 1e9


def timed(fn, repeats: int = 3) -> float:
    """Best seconds of fn() over `repeats` calls, synchronized."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def layer_rows(args, h2d: float, base: dict) -> None:
    config = ModelConfig.from_hf(slice_config("v3-slice", 1))
    H, I = config.hidden_size, config.moe_intermediate_size
    E, k = config.n_routed_experts, config.num_experts_per_tok
    slot = int(args.staging_gb * GIB) // 2
    for spec in args.formats.split(","):
        fmt = Format.parse(spec)
        engine = CPUExperts({1: random_layer(fmt, H, I, E, seed=1)}, EngineConfig())
        staging = GroupStaging(slot, "cuda")
        paths = {
            "staged": HybridExperts(
                torch.nn.ModuleDict(),
                layer=1,
                engine=engine,
                num_experts=E,
                stream_min_tokens=1,
                staging=staging,
            ),  # fmt: skip
            "whole": HybridExperts(
                torch.nn.ModuleDict(), layer=1, engine=engine, num_experts=E, stream_min_tokens=1
            ),  # fmt: skip
        }
        if args.pin_experts:  # the layer page-locked in place: copied without the gather
            register_host([engine.layers[1]])
            paths["direct"] = HybridExperts(
                torch.nn.ModuleDict(), layer=1, engine=engine, num_experts=E, stream_min_tokens=1,
                staging=GroupStaging(slot, "cuda", direct=True),
            )  # fmt: skip
        for T in args.layer_tokens:
            g = torch.Generator().manual_seed(T)
            x = torch.randn(T, H, generator=g).to("cuda", torch.bfloat16)
            ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices.to("cuda")
            w = torch.rand(T, k, generator=g).to("cuda")
            per = engine.layers[1].expert_bytes()
            routed = ids.unique().numel() * per
            sent = {"staged": routed, "direct": routed, "whole": E * per}  # what crosses
            row = {**base, "bench": "prefill_layer", "format": str(fmt), "tokens": T,
                   "h2d_gbps": round(h2d, 1)}  # fmt: skip
            for name, routed in paths.items():
                s = timed(lambda r=routed: r.submit(x, ids, w).result())
                gbps = sent[name] / s / 1e9
                out = {**row, "path": name, "ms": round(s * 1e3, 1), "bytes_sent": sent[name],
                       "gbps": round(gbps, 1), "frac_of_h2d": round(gbps / h2d, 3)}  # fmt: skip
                print(json.dumps(out), flush=True)
            if T <= args.cpu_max_tokens:
                xc, ic, wc = x.float().cpu(), ids.cpu(), w.cpu()
                s = timed(lambda: engine.forward(1, xc, ic, wc), repeats=2)
                print(json.dumps({**row, "path": "cpu", "ms": round(s * 1e3, 1)}), flush=True)
        engine.close()


def prediction(args, config, rates):
    """n -> hetero.predict's seconds for an n-token prompt in this run's set-up (CPU experts in
    args.format, the rest FP8 on the GPU, its chunk, staging and pinning); None without rates."""
    if rates is None or not rates.has_gpu:
        return None
    from hetero.placement import parse_placement
    from hetero.predict import predict

    pin = str(args.pin_experts).lower()
    text = (f"rules:\n  - {{match: '\\.mlp\\.experts$', device: cpu, format: {args.format}}}\n"
            f"  - {{device: gpu, format: fp8}}\nruntime: {{prefill_chunk: {args.chunk}, "
            f"staging_gb: {args.staging_gb}, pin_experts: {pin}}}\n")  # fmt: skip
    placement = parse_placement(text, config)
    return lambda n: predict(config, placement, rates, (1,), (n,)).prefill[0].seconds


def depth_rows(args, base: dict) -> None:
    from hetero.engine.engine import Engine, ServingConfig
    from hetero.engine.params import SamplingParams

    config = ModelConfig.from_hf(slice_config("v3", None))
    model = random_model(config, "cuda", torch.bfloat16, fp8=True)
    fmt, moe = Format.parse(args.format), config.moe_layers
    H, I, E = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    distinct = [random_layer(fmt, H, I, E, seed=L) for L in moe[: args.cpu_layers]]
    cpu = CPUExperts({L: distinct[i % len(distinct)] for i, L in enumerate(moe)}, EngineConfig())
    set_mode(model, config, cpu, "overlap")
    staging = GroupStaging(int(args.staging_gb * GIB) // 2, "cuda", direct=args.pin_experts)
    if args.pin_experts:
        register_host(distinct)
    rates = None
    if args.calibration != "none":  # the prefill policy (else the fixed threshold)
        from hetero.sched.calibrate import load_rates

        rates = load_rates(args.calibration, config, [str(fmt)])
    routeds = [model.model.layers[L].mlp.routed for L in moe]
    for routed in routeds:
        routed.stream_min_tokens, routed.staging, routed.rates = (
            args.stream_min_tokens,
            staging,
            rates,
        )
    longest = max(args.lengths)
    serving = ServingConfig(page_size=64, kv_cache_tokens=longest + 1024, max_num_seqs=4,
                            max_num_batched_tokens=args.chunk, cuda_graph_max_batch=0,
                            max_model_len=longest + 64)  # fmt: skip
    engine = Engine(model, StubTokenizer(), serving)
    V = config.vocab_size
    facts = {**base, "bench": "prefill_depth", "format": str(fmt), "cpu_layers": args.cpu_layers,
             "chunk": args.chunk, "stream_min_tokens": args.stream_min_tokens,
             "staging_gb": args.staging_gb, "pin_experts": args.pin_experts,
             "calibration": rates.source if rates else None}  # fmt: skip
    if rates is not None:  # what `hetero plan --predict --calibration FILE` would be given
        facts["rates"] = rates.to_dict()
    predicted = prediction(args, config, rates)

    def ttft(n: int, seed: int, gemms: tuple[str, ...] | None = None) -> tuple[float, int]:
        if gemms is not None:
            set_fp8_prefill(model, gemms)
        for r in routeds:
            r.modes.clear()
        prompt = torch.randint(2, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        steps, t0 = 0, time.perf_counter()
        engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        while engine.has_work:
            engine.step()
            steps += 1
        torch.cuda.synchronize()
        return time.perf_counter() - t0, steps

    orders = args.fp8_gemms or [None]  # (None: FP8Linear's default PREFILL_GEMMS)
    for gemms in orders:  # warm: kernels compiled (flashinfer's by nvcc), buffers allocated
        ttft(min(args.chunk, 512), seed=0, gemms=gemms)
    for n in args.lengths:
        for gemms in orders:  # alternated a length at a time: one VM's drift hits all alike
            s, steps = ttft(n, seed=n, gemms=gemms)
            modes = sum((r.modes for r in routeds), Counter())  # the policy's choices
            row = {**facts, "tokens": n, "ttft_s": round(s, 2), "steps": steps, "modes": modes}
            if gemms is not None:
                row["fp8_gemms"] = ",".join(gemms)
            if predicted is not None:
                p = predicted(n)
                row |= {"predicted_s": round(p, 2), "vs_predicted": round(s / p, 3)}
            print(json.dumps(row | {"prefill_tok_s": round(n / s, 1)}), flush=True)
    if args.profile:  # where a long prompt's time goes: the top ops, CPU and GPU
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with profile(activities=acts) as prof:
            ttft(args.profile_tokens, seed=1)
        table = prof.key_averages()
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        for key in ("cuda_time_total", "cpu_time_total"):
            text = table.table(sort_by=key, row_limit=40)
            (Path(args.profile) / f"prefill_{args.profile_tokens}_{key}.txt").write_text(text)
    if args.http:  # (the server's packages: only here)
        import httpx

        from bench.serving_http import serve
        from hetero.engine.handle import EngineHandle

        handle = EngineHandle(engine, cpu)
        server, url = serve(handle, StubTokenizer(), engine.max_model_len)
        n = max([m for m in args.lengths if m <= 8192] or [min(args.lengths)])
        prompt = torch.randint(2, V, (n,), generator=torch.Generator().manual_seed(7)).tolist()
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body, timeout=None)
        s = time.perf_counter() - t0
        row = {**facts, "bench": "prefill_http", "tokens": n, "status": r.status_code}
        print(json.dumps(row | {"ttft_s": round(s, 2), "prefill_tok_s": round(n / s, 1)}))
        server.should_exit = True
        handle.close()
    cpu.close()


def gemm_order(s: str) -> tuple[str, ...]:
    """An --fp8-gemms order: "flashinfer,cublas" -> ("flashinfer", "cublas", "triton"), the
    FP8Linear GEMMs in the order tried, the Triton kernel (which takes any shape) last where not
    named."""
    from hetero.gpu.fp8_prefill import ROUTES

    names = tuple(n for n in s.split(",") if n)
    if not names or any(n not in ROUTES for n in names):
        raise argparse.ArgumentTypeError(f"{s!r}: FP8 GEMMs are {', '.join(ROUTES)}")
    return names if "triton" in names else (*names, "triton")


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("layer", "depth"), help="one part (default: both)")
    p.add_argument("--formats", default="int4,int4-g128,int8", help="layer: CPU formats")
    p.add_argument("--layer-tokens", type=ints, default=[512, 2048, 8192])
    p.add_argument("--cpu-max-tokens", type=int, default=2048, help="layer: CPU engine up to T")
    p.add_argument("--format", default="int4", help="depth: the CPU experts' format")
    p.add_argument("--lengths", type=ints, default=[512, 2048, 8192, 32768])
    p.add_argument("--cpu-layers", type=int, default=4, help="depth: distinct CPU expert layers")
    p.add_argument("--chunk", type=int, default=2048, help="depth: prefill tokens a step")
    p.add_argument("--stream-min-tokens", type=int, default=1024,
                   help="depth: chunks of at least this many tokens stream")  # fmt: skip
    p.add_argument("--staging-gb", type=float, default=1.0)
    p.add_argument("--fp8-gemms", type=gemm_order, nargs="+", metavar="ORDER",
                   help="depth: each a comma list of FP8 GEMMs for the prompt's projections "
                   "(flashinfer, cublas, triton), timed alternately (default: "
                   "PREFILL_GEMMS)")  # fmt: skip
    p.add_argument("--http", action="store_true", help="depth: also once over HTTP")
    p.add_argument("--pin-experts", action="store_true",
                   help="experts page-locked, copied without gather (layer: + direct)")  # fmt: skip
    p.add_argument("--profile", metavar="DIR",
                   help="depth: one more prompt under torch.profiler, top ops to DIR")  # fmt: skip
    p.add_argument("--profile-tokens", type=int, default=8192)
    p.add_argument("--calibration", default="auto",
                   help="depth: the policy's rates: auto, FILE or none")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/prefill.py measures streaming to a GPU: no CUDA device here")
    h2d = h2d_gbps()
    base = {"machine": machine("cuda"), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({**base, "bench": "h2d", "gbps": round(h2d, 1)}), flush=True)
    if args.only in (None, "layer"):
        layer_rows(args, h2d, base)
    if args.only in (None, "depth"):
        depth_rows(args, base)


if __name__ == "__main__":
    main()
