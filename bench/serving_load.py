"""The load side of bench/throughput.py: length distributions, the closed-loop clients, the step
probe that counts what the CPU expert engine reads, the summaries of a run, and the machine's
side of the comparison (its read bandwidth, the CPU side settled)."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.workloads import hybrid_layers, set_attention
from hetero.model.fp8 import KERNEL_MAX_TOKENS
from hetero.model.moe import RoutedRun, torch_routed_experts
from hetero.sched.hybrid import HybridExperts

DIST_FORMS = {"fixed": "fixed:N", "uniform": "uniform:LO,HI", "lognormal": "lognormal:MEAN,SIGMA"}


@dataclass(frozen=True)
class Dist:
    """Token counts: `fixed:N`; `uniform:LO,HI` (integers, both ends included); `lognormal:MEAN,
    SIGMA` (mean MEAN, SIGMA the underlying normal's), rounded, at least 1."""

    kind: str
    a: float
    b: float = 0.0

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.kind == "fixed":
            return [int(self.a)] * n
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, n).tolist()
        mu = math.log(self.a) - self.b**2 / 2  # so that the mean is `a`
        return np.maximum(1, np.rint(rng.lognormal(mu, self.b, n))).astype(int).tolist()

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)},{int(self.b)}"
        return f"lognormal:{self.a:g},{self.b:g}"


def parse_dist(spec: str) -> Dist:
    """'fixed:128', 'uniform:64,512', 'lognormal:256,0.5' -> Dist; a ValueError saying why not."""
    kind, _, rest = spec.partition(":")
    valid = ", ".join(DIST_FORMS.values())
    if kind not in DIST_FORMS:
        raise ValueError(f"{spec!r}: unknown distribution {kind!r} (valid: {valid})")
    parts = rest.split(",") if rest else []
    if len(parts) != (1 if kind == "fixed" else 2):
        raise ValueError(f"{spec!r}: write {DIST_FORMS[kind]}")
    nums = []
    for p in parts:
        try:
            nums.append(float(p) if kind == "lognormal" else int(p))
        except ValueError:
            what = "a number" if kind == "lognormal" else "an integer"
            raise ValueError(f"{spec!r}: {p!r} is not {what} ({DIST_FORMS[kind]})") from None
    if kind == "fixed" and nums[0] < 1:
        raise ValueError(f"{spec!r}: N must be >= 1")
    if kind == "uniform" and not 1 <= nums[0] <= nums[1]:
        raise ValueError(f"{spec!r}: need 1 <= LO <= HI")
    if kind == "lognormal" and not (nums[0] >= 1 and 0 <= nums[1] <= 4):
        raise ValueError(f"{spec!r}: need MEAN >= 1 and 0 <= SIGMA <= 4")
    return Dist(kind, *nums)


def percentiles(values: list[float], scale: float = 1e3) -> dict | None:
    """p50/p90/p99 of values (seconds) in ms; None when there are none."""
    if not values:
        return None
    p = np.percentile(np.asarray(values) * scale, [50, 90, 99])
    return {"p50": round(p[0], 3), "p90": round(p[1], 3), "p99": round(p[2], 3)}


class StubTokenizer:
    """The detokenizer's tokenizer for random-weight models, whose ids mean nothing: every id
    decodes to nothing (no tokenizer matches their vocabularies; this costs no time)."""

    clean_up_tokenization_spaces = False
    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


class GPUExperts:
    """Every routed expert on the GPU: the stacked FP8 kernel up to KERNEL_MAX_TOKENS tokens (as
    HybridExperts runs its GPU experts), the per-expert loop otherwise."""

    def __init__(self, experts, num_experts: int) -> None:
        from hetero.gpu.experts import StackedFP8Experts

        self.experts, self.stacked = experts, None
        if next(experts.parameters()).is_cuda and StackedFP8Experts.supports(experts):
            self.stacked = StackedFP8Experts(experts, num_experts)

    def submit(self, x, ids, weights) -> RoutedRun:
        if self.stacked is not None and x.shape[0] <= KERNEL_MAX_TOKENS:
            y = self.stacked(x, ids, weights)
        else:
            y = torch_routed_experts(self.experts, x, ids, weights)
        return RoutedRun(lambda: y)


@dataclass(frozen=True)
class Req:
    prompt: list[int]
    output: int  # max_tokens (ignore_eos: exactly this many)


def draw_requests(n, prompt_len: Dist, output_len: Dist, prefix: list[int], vocab, seed) -> list:
    """n requests: the shared prefix, then random ids up to the drawn length (at least one)."""
    rng = np.random.default_rng(seed)
    lens, outs = prompt_len.draw(rng, n), output_len.draw(rng, n)
    bodies = [rng.integers(0, vocab, max(1, p - len(prefix))).tolist() for p in lens]
    return [Req(prefix + b, o) for b, o in zip(bodies, outs)]


@dataclass
class Timing:
    submitted: float
    stamps: list[float] = field(default_factory=list)  # arrival of each output with tokens
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.submitted

    @property
    def e2e(self) -> float:
        return self.stamps[-1] - self.submitted

    @property
    def tpot(self) -> float | None:
        return (self.stamps[-1] - self.stamps[0]) / (self.tokens - 1) if self.tokens > 1 else None


async def _drive(handle, reqs: list[Req], params, concurrency: int) -> list[Timing]:
    loop = asyncio.get_running_loop()
    order, timings = iter(range(len(reqs))), [None] * len(reqs)

    async def client() -> None:  # closed loop: the next request when this one finishes
        for i in order:  # (one iterator shared by the clients: each index goes to one)
            t = timings[i] = Timing(time.perf_counter())
            rid = handle.submit(reqs[i].prompt, params(reqs[i].output), loop=loop)
            async for out in handle.stream(rid):
                if out.token_ids:
                    t.stamps.append(time.perf_counter())
                    t.tokens += len(out.token_ids)
                if out.finished and out.finish_reason != "length":
                    raise RuntimeError(f"request {i} ended {out.finish_reason}: {out.error}")

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings


def drive(handle, reqs: list[Req], params, concurrency: int) -> tuple[list[Timing], float]:
    """Runs reqs with `concurrency` in flight; -> their timings and the wall time."""
    t0 = time.perf_counter()
    timings = asyncio.run(_drive(handle, reqs, params, concurrency))
    return timings, time.perf_counter() - t0


class StepProbe:
    """Per engine step: requests and tokens, and (routed experts on the CPU engine) the bytes of
    the unique CPU experts each MoE layer's tokens route to, against the engine's busy time.

    It wraps the runner's `run` and each HybridExperts' `submit` (recording the router's ids
    [T, k] on their device); after the forward, one scatter counts every layer's unique experts
    and one sync reads the total (the sampler syncs right after anyway). Experts streamed to the
    GPU (long prefill, the policy's split) add nothing: the CPU did not read them."""

    def __init__(self, engine, cpu) -> None:
        self.cpu, self.active, self.ids = cpu, False, []
        masks, nbytes = [], []
        for block in engine.model.model.layers if cpu is not None else ():
            h = getattr(block.mlp, "routed", None)
            if isinstance(h, HybridExperts):
                packed = cpu.layers[h.layer]
                masks.append(torch.from_numpy(h.rows_np >= 0))  # [E] experts the CPU computes
                nbytes.append(sum(a.nbytes for a in packed.arrays().values()) / packed.num_experts)
                block.mlp.routed = _Observed(h, len(masks) - 1, self)
        self.masks = torch.stack(masks) if masks else None  # [M, E]
        self.nbytes = torch.tensor(nbytes, dtype=torch.float64)  # [M] bytes of one expert
        self.expert_bytes = max(nbytes, default=0)
        run = engine.runner.run
        engine.runner.run = lambda work: self._run(run, work)
        self.reset()

    def reset(self) -> None:
        self.steps = self.requests = self.tokens = self.decode_steps = 0
        self.bytes = self.busy = self.decode_bytes = self.decode_busy = 0.0

    def _run(self, run, work):
        busy0 = self.cpu.stats.busy_s if self.cpu is not None else 0.0
        self.ids.clear()
        self.active = True
        try:
            logits = run(work)
        finally:
            self.active = False
        nbytes = self._unique_bytes()
        busy = self.cpu.stats.busy_s - busy0 if self.cpu is not None else 0.0
        self.steps += 1
        self.requests += len(work)
        self.tokens += sum(w.n for w in work)
        self.bytes += nbytes
        self.busy += busy
        if all(w.n == 1 for w in work):  # a decode-only step
            self.decode_steps += 1
            self.decode_bytes += nbytes
            self.decode_busy += busy
        return logits

    @torch.inference_mode()
    def _unique_bytes(self) -> float:
        if not self.ids:
            return 0.0
        dev = self.ids[0][1].device
        if self.masks.device != dev:
            self.masks, self.nbytes = self.masks.to(dev), self.nbytes.to(dev)
        # [M, E] experts each layer's tokens chose this step (several forwards a step in the
        # deterministic mode, one a request: their ids differ in length)
        seen = torch.zeros_like(self.masks)
        for slot, ids, on_cpu in self.ids:
            hit = torch.zeros_like(seen[slot]).scatter_(0, ids.flatten(), True)  # [E]
            seen[slot] |= hit if on_cpu is None else hit & on_cpu.to(dev)
        counts = (seen & self.masks).sum(1)  # [M] unique CPU experts a layer
        return float((counts * self.nbytes).sum())

    def summary(self, wall: float, host_gbps: float | None) -> dict:
        out = {
            "steps": self.steps,
            "mean_batch": round(self.requests / max(self.steps, 1), 2),
            "mean_step_tokens": round(self.tokens / max(self.steps, 1), 1),
            "decode_steps": self.decode_steps,
        }
        if self.cpu is None:
            return out
        gbps = self.bytes / self.busy / 1e9 if self.busy else None
        dec = self.decode_bytes / self.decode_busy / 1e9 if self.decode_busy else None
        share = lambda g: round(g / host_gbps, 3) if g and host_gbps else None  # noqa: E731
        return out | {
            "cpu_busy": round(self.busy / wall, 3),
            "cpu_expert_mb": round(self.expert_bytes / 2**20, 3),
            "cpu_unique_gb": round(self.bytes / 1e9, 3),
            "cpu_read_gbps": gbps and round(gbps, 2),
            "read_share": share(gbps),
            "cpu_read_gbps_decode": dec and round(dec, 2),
            "read_share_decode": share(dec),
        }


class _Observed:
    """A HybridExperts whose engine-bound ids the probe records while a step runs."""

    def __init__(self, inner: HybridExperts, slot: int, probe: StepProbe) -> None:
        self.inner, self.slot, self.probe = inner, slot, probe

    def submit(self, x, ids, weights) -> RoutedRun:
        h = self.inner
        run = h.submit(x, ids, weights)
        s, on_cpu = h.last_split, None  # s: the policy's split of this step, if it asked
        if s is not None:  # the experts the CPU computed: [E] bool
            on_cpu = torch.from_numpy((h.rows_np >= 0) & s.on_cpu[np.maximum(h.rows_np, 0)])
        streamed = x.is_cuda and 0 < h.stream_min_tokens <= x.shape[0]
        if self.probe.active and (s is not None or not streamed):
            self.probe.ids.append((self.slot, ids, on_cpu))
        return run


def set_levels(args, i: int, model, handle, cpu) -> dict:
    """Level i's settings of the alternating --*-levels options (A/B in one process), applied;
    -> the row's record of them."""
    pick = lambda v: v[i % len(v)] if v else None  # noqa: E731
    out = {}
    if args.attention_levels:  # --attention-levels triton,absorbed
        out["attention"] = pick(args.attention_levels)
        set_attention(model, handle, out["attention"])
    if cpu is None:
        return out
    if args.ring_levels:  # --ring-levels 15,64: the ring's A/B
        cpu.ring_limit = pick(args.ring_levels)
    if args.ring_heavy_levels:
        cpu.ring_heavy = pick(args.ring_heavy_levels)
    routed = [h for h in hybrid_layers(model) if h.rates is not None]
    if args.policy_levels and routed:  # --policy-levels 128,16 (with --pin-experts)
        for h in routed:
            h.policy_min_tokens = pick(args.policy_levels)
        out["policy_min_tokens"] = pick(args.policy_levels)
    for h in routed:
        h.modes.clear()
    return out | {"ring_limit": cpu.ring_limit, "ring_heavy": cpu.ring_heavy}


def policy_modes(model, cpu) -> dict:
    """The policy's choices (layer-steps) since set_levels, where the layers ask it."""
    routed = [h for h in hybrid_layers(model) if h.rates is not None] if cpu is not None else []
    return {"policy_modes": dict(sum((h.modes for h in routed), Counter()))} if routed else {}


def latency_summary(timings: list[Timing], wall: float) -> dict:
    tokens = sum(t.tokens for t in timings)
    return {
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "output_tok_s": round(tokens / wall, 2),
        "req_s": round(len(timings) / wall, 3),
        "ttft_ms": percentiles([t.ttft for t in timings]),
        "tpot_ms": percentiles([t.tpot for t in timings if t.tpot is not None]),
        "e2e_ms": percentiles([t.e2e for t in timings]),
    }


def host_read(cpu, gb: float) -> dict:
    """The host's read bandwidth (GB/s) with the CPU engine's thread count: cpu_moe's readers."""
    import numba

    from bench.cpu_moe import read_bandwidth

    numba.set_num_threads(cpu.threads)
    torch.set_num_threads(cpu.threads)
    probes = read_bandwidth(gb)
    return {"host_read_gbps": max(probes.values()), "host_read_probes": probes}


def machine(device: str) -> dict:
    cuda = device.startswith("cuda")
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cpus": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def time_cpu_alone(engine, config, B: int, steps: int, gpu_experts: int) -> float:
    """ms of a step's CPU experts with nothing else running: each MoE layer's B tokens on
    top-k experts drawn afresh, those below `gpu_experts` left to the GPU (what the engine
    computes in a step, host to host)."""
    from bench.cpu_moe import draw_routing

    gen = torch.Generator().manual_seed(B + 1)
    H, E, k = config.hidden_size, config.n_routed_experts, config.num_experts_per_tok
    ms = []
    for _ in range(steps + 1):
        calls = [(L, torch.randn(B, H, generator=gen), *draw_routing(B, E, k, gen))
                 for L in config.moe_layers]  # fmt: skip
        calls = [(L, x, ids.masked_fill(ids < gpu_experts, -1), w) for L, x, ids, w in calls]
        t0 = time.perf_counter()
        for L, x, ids, w in calls:
            engine.forward(L, x, ids, w)
        ms.append((time.perf_counter() - t0) * 1e3)
    return round(sorted(ms[1:])[steps // 2], 3)


def settle_times(engine, config, B: int, gpu_experts: int, limit_s: float) -> list[float]:
    """The CPU side alone, again and again until two times in a row agree within 5% (at most
    `limit_s`): a fresh VM's memory got faster over its first minutes (the whole-depth run's
    first round was 1.5-2x slower than its second), and the timed modes should not pay for it."""
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        times.append(time_cpu_alone(engine, config, B, 4, gpu_experts))
        if len(times) > 2 and abs(times[-1] - times[-2]) <= 0.05 * times[-2]:
            break
    return times
