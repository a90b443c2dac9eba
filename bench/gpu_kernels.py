"""hetero's GPU kernels at DeepSeek-V3's shapes, each beside its naive torch baseline and the
device's limits measured in the same run (a 2 GiB device-to-device copy: GB/s = 2 bytes / time;
an 8192^3 bf16 matmul on random data; an fp8 one through torch._scaled_mm where torch has it).

  fp8     fp8_gemm (decode, W8A16, M <= 64) and fp8_gemm_w8a8 (prefill, e4m3 tensor cores, M >= 16)
          vs a bf16 matmul on the dequantized weight; torch._scaled_mm with DeepSeek's block
          scales (1x128 activations, 128x128 weights) where the installed torch supports it;
          flashinfer's SM90 block-scaled GEMM (flashinfer_w8a8) where flashinfer >= 0.6 is
  mla     mla_decode over a paged latent cache (page 64, bf16) and mla_extend (one sequence, a
          chunk after a cached prefix; also decompressed, mha_sequence) vs the torch reference
          (gather + einsum + softmax): bench/gpu_kernels_mla.py
  moe     fused_moe_fp8 / fused_moe_int4 (random packed bytes in the CPU layout) over n local
          experts of 256, ids random over all 256, vs the per-expert loop torch_routed_experts
          over the same experts as FP8 modules (and StackedFP8Experts' GEMV path at T <= 64)
  router  route() (the fp32 logits matmul + fused_route) vs Gate.torch_route

Timing: every path of a point is warmed up, then timed alternately with CUDA events around each
call, the L2 (60 MB on an H200) flushed by a 256 MB write before each, median of the repetitions.
Graph-capturable paths are replayed from a CUDA graph (as the graphed decoder runs them); the
per-expert loop and the extend reference run eagerly (the loop reads ids back to the host).
FLOP and byte counts: bench/gpu_kernels_shapes.py. JSON lines on stdout (and --out).

    python bench/gpu_kernels.py [--only fp8,mla,moe,router] [--quick] [--out FILE]
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import gpu_kernels_shapes as S  # noqa: E402
from bench.gpu_kernels_mla import mla_section  # noqa: E402

log = logging.getLogger("gpu_kernels")
E4M3 = torch.float8_e4m3fn
BF16 = torch.bfloat16


def main(argv: list[str] | None = None) -> None:
    args = S.parse_args(argv, __doc__)
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels: CUDA is not available (no GPU, or a CPU-only torch): run this "
                 "benchmark on the GPU machine")  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    plan = S.plan(args.quick)
    if args.fp8_tokens:
        plan = dataclasses.replace(plan, fp8_tokens=args.fp8_tokens)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env = {"device": torch.cuda.get_device_name(), "date": now}
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    bench = Bench(plan, flush, args)
    bench.limit = measure_limits(bench)
    bench.env = env
    S.emit({"bench": "gpu_kernels", "section": "limits", "limit": bench.limit, **env}, args.out)
    for name in args.only:
        log.info("section %s", name)
        SECTIONS[name](bench, S.v3_config())
        gc.collect()
        torch.cuda.empty_cache()


class Bench:
    """A run's settings, its timer and its output."""

    def __init__(self, plan: S.Plan, flush: torch.Tensor, args) -> None:
        self.plan, self.flush, self.args = plan, flush, args
        self.limit: dict = {}
        self.env: dict = {}
        self.gen = torch.Generator(device="cuda").manual_seed(0)

    def emit(self, *args, **kw) -> None:
        S.emit(S.record(*args, limit=self.limit, env=self.env, **kw), self.args.out)

    def time(self, paths: dict[str, tuple[Callable, bool]]) -> dict[str, float]:
        """name: (fn, graph) -> name: median ms of one call, the paths alternated call by call
        (drift hits all alike), the L2 flushed before each call."""
        runs = {k: _runner(fn, graph) for k, (fn, graph) in paths.items()}
        once = {k: self._timed([r], 1)[0][0] for k, r in runs.items()}  # warm, then sized
        left = self.plan.budget_ms / max(sum(once.values()), 1e-3)
        reps = max(3, min(self.plan.max_reps, int(left)))
        times = self._timed(list(runs.values()), reps)
        return {k: statistics.median(t) for k, t in zip(runs, times)}

    def _timed(self, runs: list[Callable], reps: int) -> list[list[float]]:
        events = [[] for _ in runs]
        for _ in range(reps):
            for run, ev in zip(runs, events):
                self.flush.zero_()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                run()
                end.record()
                ev.append((start, end))
        torch.cuda.synchronize()
        return [[s.elapsed_time(e) for s, e in ev] for ev in events]

    def randn(self, *shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=self.gen).to(dtype)


def _runner(fn: Callable, graph: bool) -> Callable:
    """fn itself, or the replay of a CUDA graph of one call (warmed up on a side stream first,
    so Triton compiles and cuBLAS picks its kernels outside the capture)."""
    if not graph:
        fn()
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_gbps(b: Bench) -> float:
    """A 2 GiB device-to-device copy, counting the bytes read and written."""
    src = torch.empty(2**30, dtype=BF16, device="cuda").normal_(generator=b.gen)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / b.time({"copy": (lambda: dst.copy_(src), False)})["copy"] / 1e6


def measure_limits(b: Bench) -> dict:
    hbm = copy_gbps(b)
    n = 8192
    x, w = b.randn(n, n), b.randn(n, n)
    paths = {"bf16": (lambda: x @ w, False)}
    x8, w8 = x.to(E4M3), w.to(E4M3).t().contiguous().t()  # column-major B, as cuBLAS wants
    one = torch.ones((), device="cuda")
    try:
        torch._scaled_mm(x8, w8, scale_a=one, scale_b=one, out_dtype=BF16)
        paths["fp8"] = (lambda: torch._scaled_mm(x8, w8, scale_a=one, scale_b=one,
                                                 out_dtype=BF16), False)  # fmt: skip
    except (RuntimeError, TypeError, AttributeError) as e:
        log.info("no fp8 peak: torch._scaled_mm per-tensor: %s", str(e).split("\n")[0])
    ms = b.time(paths)
    limit = {"hbm_gbps": S.sig(hbm), "bf16_tflops": S.sig(2 * n**3 / ms["bf16"] / 1e9)}
    if "fp8" in ms:
        limit["fp8_tflops"] = S.sig(2 * n**3 / ms["fp8"] / 1e9)
    return limit


# --- FP8 GEMM -----------------------------------------------------------------------------------


def scaled_mm_fn(q: torch.Tensor, s: torch.Tensor, wf: torch.Tensor) -> Callable | str:
    """torch._scaled_mm with DeepSeek's block scales, checked once against the dequantized
    weight wf; a reason string where this torch (or cuBLAS) does not support it."""
    from hetero.gpu.fp8_prefill import quantize_act

    wt, st = q.t(), s.t()  # [K, N] column-major, [K/128, N/128]

    def fn(x: torch.Tensor) -> torch.Tensor:
        M = x.shape[0]
        xp = F.pad(x, (0, 0, 0, -M % 4)) if M % 4 else x  # cuBLAS wants M scales % 4
        xq, xs = quantize_act(xp)
        xs = xs.t().contiguous().t()  # 1x128 scales outer-dim-major
        return torch._scaled_mm(xq, wt, scale_a=xs, scale_b=st, out_dtype=x.dtype)[:M]

    x = torch.randn(16, q.shape[1], device="cuda", dtype=BF16)
    try:
        err = S.rel_err(fn(x), x.float() @ wf.T)
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        return "unsupported: " + str(e).split("\n")[0][:200]
    return fn if err < 0.1 else f"unsupported: wrong result (rel err {err})"


def flashinfer_fn(q: torch.Tensor, s: torch.Tensor, wf: torch.Tensor) -> tuple | str:
    """flashinfer's SM90 block-scaled FP8 GEMM (hetero.gpu.fp8_prefill.flashinfer_w8a8), checked
    once against the dequantized weight wf, and whether it replays from a CUDA graph; a reason
    string where it does not run here (no flashinfer >= 0.6, not a Hopper, the shape)."""
    from hetero.gpu.fp8_prefill import flashinfer_w8a8

    def fn(x: torch.Tensor) -> torch.Tensor:
        return flashinfer_w8a8(x, q, s, (128, 128))

    x = torch.randn(64, q.shape[1], device="cuda", dtype=BF16)
    try:
        y = fn(x)
        if y is None:
            return "unsupported: flashinfer lacks fp8_blockscale_gemm_sm90, or not a Hopper"
        err = S.rel_err(y, x.float() @ wf.T)
    except (RuntimeError, TypeError, ValueError) as e:
        return "unsupported: " + str(e).split("\n")[0][:200]
    if err >= 0.1:
        return f"unsupported: wrong result (rel err {err})"
    try:  # (its workspace is allocated a call: see whether capture takes it)
        _runner(lambda: fn(x), True)
        return fn, True
    except RuntimeError as e:
        log.warning("flashinfer's FP8 GEMM timed eagerly: no CUDA graph (%s)", str(e)[:200])
        return fn, False


def fp8_section(b: Bench, c) -> None:
    shapes = S.fp8_shapes(c)
    for name in b.plan.fp8_shapes:
        fp8_shape(b, name, *shapes[name])
        torch.cuda.empty_cache()


def fp8_shape(b: Bench, name: str, N: int, K: int) -> None:
    from hetero.gpu.fp8_gemm import fp8_gemm
    from hetero.gpu.fp8_prefill import fp8_gemm_w8a8
    from hetero.gpu.fp8_small import counters_for, fp8_small
    from hetero.model.fp8 import block_dequantize

    q, s = S.fp8_weight(b.gen, N, K)
    wf = block_dequantize(q, s, (128, 128))  # [N, K] fp32: the reference
    dense = wf.to(BF16)
    counters = counters_for(N, q.device)
    fns = {"fp8_gemm": lambda x: fp8_gemm(x, q, s),
           "fp8_small": lambda x: fp8_small(x, q, s, counters),
           "fp8_gemm_w8a8": lambda x: fp8_gemm_w8a8(x, q, s)}  # fmt: skip
    scaled = scaled_mm_fn(q, s, wf)
    if callable(scaled):
        fns["torch._scaled_mm"] = scaled
    else:
        S.emit({"bench": "gpu_kernels", "section": "fp8", "shape": name, "N": N, "K": K,
                "kernel": "torch._scaled_mm", "status": scaled, **b.env}, b.args.out)  # fmt: skip
    fi = flashinfer_fn(q, s, wf)
    graphed = {k: True for k in fns} | {"torch._scaled_mm": True}
    if isinstance(fi, str):
        S.emit({"bench": "gpu_kernels", "section": "fp8", "shape": name, "N": N, "K": K,
                "kernel": "flashinfer_w8a8", "status": fi, **b.env}, b.args.out)  # fmt: skip
    else:
        fns["flashinfer_w8a8"], graphed["flashinfer_w8a8"] = fi
    for M in b.plan.fp8_tokens:
        x = b.randn(M, K)
        kernels = S.fp8_kernels(M) + (["torch._scaled_mm"] if callable(scaled) else [])
        kernels += ["flashinfer_w8a8"] if "flashinfer_w8a8" in fns else []
        paths = {k: (lambda f=fns[k]: f(x), graphed[k]) for k in kernels}
        paths["bf16"] = (lambda: F.linear(x, dense), True)
        ms = b.time(paths)
        want = x.float() @ wf.T
        flops = S.gemm_flops(M, N, K)
        nbytes = S.gemm_bytes(M, N, K, S.fp8_weight_bytes(N, K))
        base_floor, _ = S.roofline_ms(flops, S.gemm_bytes(M, N, K, 2 * N * K), b.limit)
        for k in kernels:
            b.emit("fp8", {"shape": name, "N": N, "K": K, "M": M}, k, ms[k],
                   "bf16_matmul_dequantized", ms["bf16"], flops, nbytes,
                   fp8=k != "fp8_gemm", rel_err=S.rel_err(fns[k](x), want),
                   baseline_frac_of_limit=S.sig(base_floor / ms["bf16"], 3))  # fmt: skip


# --- fused MoE ----------------------------------------------------------------------------------


def fp8_experts(b: Bench, n: int, H: int, I: int) -> nn.ModuleDict:
    """n routed experts as the model holds GPU ones: MLPs of FP8Linear (random weights)."""
    from hetero.model.fp8 import FP8Linear
    from hetero.model.layers import MLP

    experts = nn.ModuleDict()
    for e in range(n):
        with torch.device("meta"):
            m = MLP(H, I)
        for name, (o, i) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            with torch.device("cuda"):
                lin = FP8Linear(i, o)
            lin.weight.data, lin.weight_scale_inv.data = S.fp8_weight(b.gen, o, i)
            setattr(m, name, lin)
        experts[str(e)] = m
    return experts


def moe_section(b: Bench, c) -> None:
    from hetero.gpu.experts import StackedFP8Experts

    H, I, E = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts
    for n in b.plan.moe_local:
        experts = fp8_experts(b, n, H, I)
        stacked = StackedFP8Experts(experts, E)  # the modules become views of its stacks
        packs = {f: S.int4_arrays(b.gen, n, H, I, int(f.split("-g")[1]))
                 for f in b.plan.moe_formats if f != "fp8"}  # fmt: skip
        for T in b.plan.moe_tokens:
            moe_point(b, c, experts, stacked, packs, T)
        del experts, stacked, packs
        gc.collect()
        torch.cuda.empty_cache()


def moe_point(b: Bench, c, experts: nn.ModuleDict, st, packs: dict, T: int) -> None:
    """One T: each format's fused kernel, the per-expert loop, StackedFP8Experts at T <= 64."""
    from hetero.gpu.fused_moe import DEQUANT_PAIRS, fused_moe_fp8, fused_moe_int4
    from hetero.model.fp8 import KERNEL_MAX_TOKENS
    from hetero.model.moe import torch_routed_experts

    H, I, E, k = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok
    local = st.local
    x, weights = b.randn(T, H), torch.rand(T, k, device="cuda", generator=b.gen)
    ids = torch.rand(T, E, device="cuda", generator=b.gen).topk(k, dim=-1).indices  # [T, k]
    here = local[ids] >= 0  # [T, k]
    pairs, touched = int(here.sum()), int(ids[here].unique().numel())
    loop_ids = ids.masked_fill(~here, -1)  # the loop's modules are only the local experts
    fns = {f: (lambda p=p, G=int(f[6:]): fused_moe_int4(x, ids, weights, local, *p, G))
           for f, p in packs.items()}  # fmt: skip
    if "fp8" in b.plan.moe_formats:
        fns["fp8"] = lambda: fused_moe_fp8(x, ids, weights, local, st.w13, st.s13, st.w2, st.s2,
                                           st.block)  # fmt: skip
    # int4 from DEQUANT_PAIRS pairs an expert: dequantize + dense tiles, eager (as prefill runs
    # it; a graph capture keeps the packed kernels)
    dense = ids.numel() >= DEQUANT_PAIRS * len(experts)
    paths = {f: (fn, not (dense and f.startswith("int4"))) for f, fn in fns.items()}
    paths["loop"] = (lambda: torch_routed_experts(experts, x, loop_ids, weights), False)
    if T <= KERNEL_MAX_TOKENS:
        paths["stacked"] = (lambda: st(x, ids, weights), True)
    ms = b.time(paths)
    want = torch_routed_experts(experts, x, loop_ids, weights)
    name = lambda f: "fused_moe_" + f.split("-")[0] + (" (dequant)" if paths[f][1] is False else "")
    for f in fns:
        extra = {}
        if f == "fp8":
            extra["rel_err"] = S.rel_err(fns[f](), want) if pairs else None
            if "stacked" in ms:
                extra.update(
                    stacked_ms=S.sig(ms["stacked"]), vs_stacked=S.sig(ms["stacked"] / ms[f])
                )
        nbytes = touched * S.expert_bytes(f, H, I) + 4 * T * H
        b.emit("moe", {"format": f, "local_experts": len(experts), "T": T, "k": k,
                       "local_pairs": pairs, "touched_experts": touched},
               name(f), ms[f], "torch_routed_experts_fp8", ms["loop"],
               S.moe_flops(pairs, H, I), nbytes, **extra)  # fmt: skip


# --- router -------------------------------------------------------------------------------------


def router_section(b: Bench, c) -> None:
    from hetero.gpu.router import fused_route, route
    from hetero.model.moe import Gate

    H, E, k = c.hidden_size, c.n_routed_experts, c.num_experts_per_tok
    with torch.device("cuda"):
        gate = Gate(c)
    gate.weight.data = b.randn(E, H) / H**0.5  # bf16, as the model holds it
    gate.e_score_correction_bias.copy_(0.01 * b.randn(E, dtype=torch.float32))
    bias = gate.e_score_correction_bias
    for T in b.plan.router_tokens:
        x = b.randn(T, H)
        logits = F.linear(x.float(), gate.weight.float())
        paths = {"route": (lambda: route(gate, x), True),
                 "fused_only": (lambda: fused_route(logits, c, bias), True),
                 "torch": (lambda: gate.torch_route(x), True)}  # fmt: skip
        ms = b.time(paths)
        i1, i2 = route(gate, x)[1].sort(-1).values, gate.torch_route(x)[1].sort(-1).values
        same = float((i1 == i2).all(-1).float().mean())  # tokens routed to the same experts
        b.emit("router", {"T": T, "E": E, "k": k}, "route (fp32 matmul + fused_route)",
               ms["route"], "Gate.torch_route", ms["torch"], 2 * T * E * H,
               S.router_bytes(T, E, H, k), fused_route_only_ms=S.sig(ms["fused_only"]),
               same_ids=same)  # fmt: skip


SECTIONS: dict[str, Callable[[Bench, object], None]] = {
    "fp8": fp8_section,
    "mla": mla_section,
    "moe": moe_section,
    "router": router_section,
}
assert tuple(SECTIONS) == S.SECTIONS

if __name__ == "__main__":
    main()
