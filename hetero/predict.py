"""The speed to expect before loading: batch-1 decode, decode at a concurrency, and prefill at
given prompt lengths, from config.json, the placement and a calibration (sched/calibrate.py) —
no weight is read. `hetero plan --predict` prints it. The model, its constants and where each
came from: docs/predict.md.

One decode step is a sum over layers. A MoE layer with CPU experts runs as the runtime overlaps
it (DESIGN.md, "One decode step"): the GPU's attention and router (g_a), then the CPU's job
while the GPU runs the shared and GPU experts (g_s); with deferral the CPU's d lowest-weighted
experts of a token (c1) run while the GPU computes the next layer's g_a, so in steady state

    layer = max(g_a + g_s, c0 + max(c1, g_a)) + hand-off        (c0 + c1: the CPU's job)

which is g_a + max(g_s, c0 + c1) without deferral and never more with it. GPU times are the
layer's weight (and KV) bytes over HBM plus a fixed cost a layer; CPU times the calibrated cost
of each used expert at its token count. A prefill chunk runs its layers one after another: the
GPU's linear layers and MLA attention from FLOPs, then the routed experts by the prefill policy's
`split` (CPU, streamed to the GPU, or both) on the expected tokens per expert.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np

from hetero.config import ModelConfig
from hetero.model.attention import MHA_MIN_TOKENS
from hetero.placement import Placement, pins_experts
from hetero.sched.prefill_policy import split
from hetero.sched.rates import CalibrationError, Rates


@dataclass(frozen=True)
class CostModel:
    """The step model's constants (docs/predict.md says where each comes from)."""

    # fixed GPU time of a decoder layer in a CUDA-graph decode step (launches, small kernels):
    # V3's GPU side alone: 9.95-10.16 ms a step at batch 1 with graphs over the paged Triton
    # path, 4.35 ms of it its bytes at HBM speed (H200 2026-12-04, *-gpu_step_kernels.md and
    # *-session12.md)
    gpu_layer_s: float = 0.095e-3
    gpu_eager_layer_s: float = 1.2e-3  # the same without graphs (prefill, big batches): 3x, est.
    attention_share: float = 0.75  # of a MoE layer's GPU time, before the router (est.)
    # a CPU layer's cost outside the engine's call: its result's copy, the caller's wait (V3
    # batch 1: step / CPU alone 1.03, 2026-11-24)
    handoff_s: float = 25e-6
    step_s: float = 0.5e-3  # a step's embedding, sampling and scheduling (est.)
    # prefill attention / dense bf16 matmul, H200 2026-12-03 (gpu_kernels-run2): the absorbed
    # extend kernel 73-91 of 794 TFLOPS; the decompressed form (flash, 256+ new tokens) 159-293
    attention_efficiency: float = 0.11
    mha_efficiency: float = 0.3
    linear_efficiency: float = 0.7  # prefill GEMMs / dense bf16 matmul (est.)
    # a step's c tokens pick experts as c ** alpha independent tokens would: 1 for a trained
    # router's balanced choices; random-weight benchmark models measured ~0.69 (docs/predict.md)
    routing_alpha: float = 1.0
    decode_context: int = 1024  # tokens of KV a sequence reads at decode
    assumed_hbm_gbps: float = 3000.0  # without a GPU in the calibration (an H100-class card)
    assumed_gpu_tflops: float = 600.0
    staged: bool = True  # streamed experts are gathered into pinned slots (sched/streaming.py)
    # the prefill stream's share of the calibrated pinned H2D rate, one V3 layer's experts at
    # 8K tokens: gathered into pinned slots 0.65-0.75 (H200 2026-12-03, the copy engine idle
    # between groups); straight from page-locked experts (pin_experts) 0.94-0.96 (2026-12-04)
    stream_efficiency: float = 0.7
    direct_stream_efficiency: float = 0.95


class DecodeRow(NamedTuple):
    concurrency: int
    step_ms: float
    tok_s: float  # all sequences together: concurrency / step
    cpu_busy: float  # the CPU engine's share of the step
    cpu_experts: float  # CPU experts a MoE layer reads a step
    deferred: bool


class PrefillRow(NamedTuple):
    prompt_tokens: int
    chunks: int
    seconds: float
    tok_s: float
    modes: dict  # routed-expert decisions over (chunk, MoE layer): cpu / split / gpu


@dataclass(frozen=True)
class Prediction:
    model: str
    placement: str
    calibration: str
    machine: str
    decode: tuple[DecodeRow, ...]
    prefill: tuple[PrefillRow, ...]
    notes: tuple[str, ...] = ()
    cost_model: CostModel = field(default_factory=CostModel)

    @property
    def decode_tok_s(self) -> float:
        """Batch-1 decode."""
        return next(r.tok_s for r in self.decode if r.concurrency == 1)

    def table(self) -> str:
        lines = [f"speed prediction: {self.model}", f"calibration: {self.calibration}"]
        lines += [f"machine: {self.machine}", ""]
        lines.append(
            f"{'decode':<9}{'batch':>6}{'step ms':>10}{'tok/s':>9}{'CPU busy':>10}"
            f"{'CPU experts/layer':>19}{'deferral':>10}"
        )
        for r in self.decode:
            lines.append(
                f"{'':<9}{r.concurrency:>6}{r.step_ms:>10.1f}{r.tok_s:>9.2f}{r.cpu_busy:>10.2f}"
                f"{r.cpu_experts:>19.1f}{'yes' if r.deferred else 'no':>10}"
            )
        lines.append(
            f"{'prefill':<9}{'prompt':>6}{'chunks':>10}{'seconds':>9}{'tok/s':>10}"
            f"{'experts cpu/split/gpu':>29}"
        )
        for r in self.prefill:
            modes = "/".join(str(r.modes.get(m, 0)) for m in ("cpu", "split", "gpu"))
            lines.append(
                f"{'':<9}{r.prompt_tokens:>6}{r.chunks:>10}{r.seconds:>9.1f}{r.tok_s:>10.1f}"
                f"{modes:>29}"
            )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "placement": self.placement,
            "calibration": self.calibration,
            "machine": self.machine,
            "decode_tok_s": self.decode_tok_s,
            "decode": [r._asdict() for r in self.decode],
            "prefill": [r._asdict() for r in self.prefill],
            "notes": list(self.notes),
            "cost_model": asdict(self.cost_model),
        }


def predict(
    config: ModelConfig,
    placement: Placement,
    rates: Rates,
    concurrency: tuple[int, ...] = (1, 16, 64),
    prompt_lengths: tuple[int, ...] = (512, 8192, 32768),
    model: CostModel | None = None,
) -> Prediction:
    """Batch 1 is always predicted (a row of concurrency 1), the rest as asked."""
    s = Steps(config, placement, rates, model or CostModel())
    decode = tuple(s.decode_row(c) for c in sorted({1, *concurrency}))
    prefill = tuple(s.prefill_row(n) for n in prompt_lengths)
    return Prediction(
        model=s.description,
        placement=placement.source,
        calibration=rates.source or "given rates",
        machine=rates.machine or "-",
        decode=decode,
        prefill=prefill,
        notes=tuple(s.notes()),
        cost_model=s.model,
    )


class Serving(NamedTuple):
    tok_s: float  # output tokens a second, prefill included
    tpot_s: float  # a decode step at this concurrency
    ttft_s: float  # the first round's prefill


def predict_serving(
    config: ModelConfig,
    placement: Placement,
    rates: Rates,
    concurrency: int,
    requests: int,
    prompt_tokens: float,
    output_tokens: float,
    max_batched_tokens: int,
    model: CostModel | None = None,
) -> Serving:
    """A closed loop of `requests` requests, `concurrency` at a time, each prefilling
    `prompt_tokens` new tokens (the prefix cache's hits left out) and then decoding
    `output_tokens` (the first comes with the prefill): rounds of prefill steps of up to
    `max_batched_tokens` tokens, then decode steps of `concurrency` sequences."""
    s = Steps(config, placement, rates, model or CostModel())
    rounds = math.ceil(requests / concurrency)
    new, prefill = concurrency * prompt_tokens, 0.0
    while new > 0:
        T = min(new, max_batched_tokens)
        prefill += s.prefill_chunk(int(T), 0, max(1, int(prompt_tokens)))[0]
        new -= T
    step = float(s.decode_step(concurrency)[0])
    wall = rounds * (prefill + max(0.0, output_tokens - 1) * step)
    return Serving(requests * output_tokens / wall, step, prefill)


def routes(tokens: int, k: int, E: int, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """How many of `tokens` tokens pick one given expert of E when each picks k at random:
    (token counts, their probabilities), Binomial(tokens, k/E). With alpha < 1 the tokens choose
    as tokens ** alpha independent ones would, each standing for tokens ** (1 - alpha) tokens
    (correlated routing: fewer experts, more tokens each)."""
    t, p = max(1, round(tokens**alpha)), min(1.0, k / E)
    n = np.arange(t + 1)
    if p >= 1.0:
        return n * (tokens / t), (n == t).astype(np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log((t - n[1:] + 1) / n[1:]))])
    pmf = np.exp(log_choose + n * math.log(p) + (t - n) * math.log1p(-p))
    return n * (tokens / t), pmf / pmf.sum()


def expected_counts(tokens: int, k: int, E: int, n: int, alpha: float = 1.0) -> np.ndarray:
    """Tokens per expert [n] for n of a layer's E experts, ascending: the quantiles of `routes`
    at (i + 0.5) / n, a typical chunk's counts (what the prefill policy sees)."""
    if n == 0 or tokens <= 0:
        return np.zeros(n)
    values, pmf = routes(tokens, k, E, alpha)
    cdf = np.cumsum(pmf)
    return values[np.minimum(np.searchsorted(cdf, (np.arange(n) + 0.5) / n), len(values) - 1)]


def expected_call(cost, tokens: int, k: int, E: int, n: int, alpha: float) -> tuple[float, float]:
    """(the expected seconds of one call over n of E experts at `tokens` tokens, the expected
    experts with tokens): exact over the binomial, where quantiles would round (8 x 236 / 256
    CPU experts at batch 1 are 7.4, not 7)."""
    if n == 0 or tokens <= 0:
        return 0.0, 0.0
    values, pmf = routes(tokens, k, E, alpha)
    used = n * (1 - pmf[0])
    seconds = n * float((pmf[1:] * cost.expert_s(values[1:])).sum())
    return cost.call_s * (1 - pmf[0] ** n) + seconds, used


class Steps:
    """The step model of one model, placement and calibration."""

    def __init__(self, config: ModelConfig, placement: Placement, rates: Rates, model: CostModel):
        from hetero.plan import CPU_EXPERTS_ROW, cpu_expert_bytes, gpu_expert_bytes, plan_memory
        from hetero.sched.hybrid import DEFER_MAX_TOKENS, DIRECT_POLICY_MIN_TOKENS

        self.c, self.p, self.rates, self.model = config, placement, rates, model
        self.defer_max, self.direct_min = DEFER_MAX_TOKENS, DIRECT_POLICY_MIN_TOKENS
        big = 1 << 50
        plan = plan_memory(config, placement, big, big)
        self.description = plan.model
        n_moe = len(config.moe_layers)
        n_dense = config.num_hidden_layers - n_moe
        L, row = config.num_hidden_layers, lambda name: plan.row(name).gpu_bytes
        self.attn_bytes = (row("attention") + row("norms")) / L
        self.moe_bytes = (row("routers") + row("shared experts")) / max(n_moe, 1)
        self.dense_bytes = row("dense MLP") / max(n_dense, 1)
        self.head_bytes = row("lm_head") or row("embed_tokens")
        attn, shared, _ = config.layer_param_counts()
        self.attn_params, self.moe_params = attn, shared
        self.dense_params = 3 * config.hidden_size * config.intermediate_size
        self.kv_bytes = 2 * (config.kv_lora_rank + config.qk_rope_head_dim)  # a token a layer
        self.hbm = (rates.hbm_gbps or model.assumed_hbm_gbps) * 1e9
        self.flops = (rates.gpu_tflops or model.assumed_gpu_tflops) * 1e12
        # MoE layers by what decides their cost: (CPU format, GPU experts, GPU format, deferral)
        self.groups = Counter(
            (e.cpu_format, len(e.gpu_experts), e.gpu_format, e.deferred)
            for e in (placement.experts(i) for i in config.moe_layers)
        )
        E = config.n_routed_experts
        self.cpu_bytes = {f: cpu_expert_bytes(config, f) for f, g, *_ in self.groups if g < E}
        self.gpu_bytes = {gf: gpu_expert_bytes(config, gf) for _, g, gf, _ in self.groups if g}
        self.n_moe, self.n_dense = n_moe, n_dense
        self.slot_bytes = int(placement.runtime.staging_gb * (1 << 30)) // 2  # (runtime.py)
        self.pinned = pins_experts(placement.runtime, plan.row(CPU_EXPERTS_ROW).ram_bytes)
        eff = model.direct_stream_efficiency if self.pinned else model.stream_efficiency
        self.stream_efficiency = eff  # the policy's rates at the stream's measured share of H2D
        self.stream_rates = dataclasses.replace(rates, h2d_gbps=rates.h2d_gbps * eff)
        shape = config.hidden_size, config.moe_intermediate_size
        if self.cpu_bytes and tuple(rates.shape) != shape:
            raise CalibrationError(
                f"the calibration measured {rates.shape[0]}x{rates.shape[1]} experts, this "
                f"model's are {shape[0]}x{shape[1]} (calibrate for this model)"
            )

    def counts(self, tokens: int, n: int) -> np.ndarray:
        c = self.c
        return expected_counts(tokens, c.num_experts_per_tok, c.n_routed_experts, n,
                               self.model.routing_alpha)  # fmt: skip

    def decode_step(self, batch: int) -> tuple[float, float, float]:
        """(seconds, CPU engine seconds, CPU experts a MoE layer) of one decode step."""
        m, E, k = self.model, self.c.n_routed_experts, self.c.num_experts_per_tok
        graphs = batch <= self.p.runtime.cuda_graph_max_batch
        fixed = m.gpu_layer_s if graphs else m.gpu_eager_layer_s
        kv = batch * m.decode_context * self.kv_bytes
        g_dense = fixed + (self.attn_bytes + self.dense_bytes + kv) / self.hbm
        total, busy, experts = self.n_dense * g_dense, 0.0, 0.0
        for (fmt, g, gfmt, d), layers in self.groups.items():
            gpu = fixed + (self.attn_bytes + self.moe_bytes + kv) / self.hbm
            alpha, cost = m.routing_alpha, self.rates.cpu_cost(fmt) if g < E else None
            used_gpu = g * (1 - routes(batch, k, E, alpha)[1][0])
            g_a = m.attention_share * gpu
            g_s = gpu - g_a + used_gpu * self.gpu_bytes.get(gfmt, 0) / self.hbm
            cpu, used = expected_call(cost, batch, k, E, E - g, alpha) if cost else (0.0, 0.0)
            on_cpu = cpu  # with page-locked experts the GPU streams a large step's busiest
            if cpu and self.pinned and batch >= self.direct_min and self.rates.has_gpu:
                n = self.counts(batch, E - g)
                s = split(self.stream_rates, fmt, n, self.cpu_bytes[fmt], False, self.slot_bytes)
                cpu, on_cpu, used = s.seconds, s.cpu_s, float(((n > 0) & s.on_cpu).sum())
            if cpu == 0.0:
                layer = g_a + g_s
            else:
                # the deferred part: each token's d lowest-weighted slots, less the experts
                # another token's first part reads anyway (shared reads, kernels.split_parts)
                share = d / k * (1 - (k - d) / E) ** (batch - 1) if batch <= self.defer_max else 0
                c1 = share * (cpu - cost.call_s)
                layer = max(g_a + g_s, cpu - c1 + max(c1, g_a)) + m.handoff_s
            total += layers * layer
            busy += layers * on_cpu
            experts += layers * used / self.n_moe
        total += self.head_bytes / self.hbm + m.step_s
        return total, busy, experts

    def decode_row(self, batch: int) -> DecodeRow:
        step, busy, experts = (float(v) for v in self.decode_step(batch))
        deferred = batch <= self.defer_max and any(d for *_, d in self.groups)
        row = (batch, step * 1e3, batch / step, busy / step, float(experts), bool(deferred))
        return DecodeRow(*row)

    def prefill_chunk(self, T: int, start: int, prompt: int = 0) -> tuple[float, Counter]:
        """(seconds, expert decisions by mode) of a chunk of T tokens of one prompt after
        `start` others, or (`prompt` > 0) of T / prompt whole prompts batched together."""
        m, c, E = self.model, self.c, self.c.n_routed_experts
        eff_lin = self.flops * m.linear_efficiency
        # (query, key) pairs, causal
        pairs = T * (prompt + 1) / 2 if prompt else T * start + T * (T + 1) / 2
        h, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
        if (prompt or T) >= MHA_MIN_TOKENS:  # decompressed: the context's K/V, then flash
            ctx = T if prompt else start + T
            decompress = (c.qk_nope_head_dim + c.v_head_dim) * ctx * c.kv_lora_rank
            attn = 2 * h * ((qk + c.v_head_dim) * pairs + decompress)
            eff_attn = self.flops * m.mha_efficiency
        else:  # absorbed: latent-space scores and values
            attn = 2 * h * (2 * c.kv_lora_rank + c.qk_rope_head_dim) * pairs
            eff_attn = self.flops * m.attention_efficiency
        kv = (start + T) * self.kv_bytes

        def gpu(nbytes: float, params: float) -> float:
            return m.gpu_eager_layer_s + max(nbytes / self.hbm, 2 * T * params / eff_lin)

        dense = gpu(self.attn_bytes + self.dense_bytes + kv, self.attn_params + self.dense_params)
        total, modes = self.n_dense * (dense + attn / eff_attn), Counter()
        moe = gpu(self.attn_bytes + self.moe_bytes + kv, self.attn_params + self.moe_params)
        moe += attn / eff_attn
        for (fmt, g, gfmt, _), layers in self.groups.items():
            experts = 0.0
            if g < E:
                counts, nbytes = self.counts(T, E - g), self.cpu_bytes[fmt]
                staged = m.staged and not self.pinned  # (pin_experts: no gather)
                s = split(self.stream_rates, fmt, counts, nbytes, staged, self.slot_bytes)
                experts, modes[s.mode] = s.seconds, modes[s.mode] + layers
            if g:
                experts = max(experts, self._gpu_experts(gfmt, self.counts(T, g), eff_lin))
            total += layers * (moe + experts + m.handoff_s)
        return total + self.head_bytes / self.hbm + m.step_s, modes

    def _gpu_experts(self, fmt: str, counts: np.ndarray, rate: float) -> float:
        cost = self.rates.gpu_cost(fmt)
        if cost is not None:
            return cost.call(counts)
        H, I = self.c.hidden_size, self.c.moe_intermediate_size
        used = (counts > 0).sum()
        return max(used * self.gpu_bytes[fmt] / self.hbm, 6 * H * I * counts.sum() / rate)

    def prefill_row(self, prompt: int) -> PrefillRow:
        chunk = self.p.runtime.prefill_chunk or prompt
        seconds, modes, start = 0.0, Counter(), 0
        while start < prompt:
            T = min(chunk, prompt - start)
            s, m = self.prefill_chunk(T, start)
            seconds, modes, start = seconds + s, modes + m, start + T
        chunks = math.ceil(prompt / chunk) if prompt else 0
        return PrefillRow(prompt, chunks, seconds, prompt / seconds if seconds else 0.0,
                          dict(modes))  # fmt: skip

    def notes(self) -> list[str]:
        r, m, out = self.rates, self.model, []
        if r.hbm_gbps is None or r.gpu_tflops is None:
            out.append(
                f"no GPU in the calibration: GPU side assumed ({m.assumed_hbm_gbps:.0f} GB/s "
                f"HBM, {m.assumed_gpu_tflops:.0f} TFLOP/s bf16), no streamed prefill"
            )
        out.append(
            f"decode steps only (no prefill between them), {m.decode_context} tokens of context "
            f"a sequence; routing as {'independent' if m.routing_alpha == 1 else 'correlated'} "
            f"tokens (alpha {m.routing_alpha:g})"
        )
        if r.has_gpu:
            out.append(
                f"streamed prefill at {self.stream_efficiency:.0%} of the calibrated pinned H2D "
                f"({r.h2d_gbps * self.stream_efficiency:.0f} of {r.h2d_gbps:.0f} GB/s, experts "
                f"{'page-locked' if self.pinned else 'gathered into pinned slots'}), as measured"
            )
        return out
