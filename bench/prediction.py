"""hetero.predict's figures for a bench/throughput.py run, printed beside what it measures: the
run's model, its CPU/GPU split and deferral as a placement, this machine's calibration (the
cache by default: a bench never calibrates unless told to) and the run's workload."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from bench.serving_load import Req
from hetero.placement import Placement, load_placement, parse_placement

# Random-weight routers route a step's tokens together: the V3 workload read ~50 unique experts
# a layer at 16 tokens and ~109 at 64 (2026-12-03-h200-serve_v3_c.jsonl, decode read rates),
# what 16 ** 0.69 and 64 ** 0.69 independent tokens pick. A trained router: 1.
RANDOM_ROUTING_ALPHA = 0.69


@dataclass(frozen=True)
class Predictor:
    """predictor(concurrency, requests, defer) -> hetero.predict.Serving for this run's model,
    split and workload (the requests' mean prompt and output lengths)."""

    args: Any
    config: Any
    facts: dict
    rates: Any  # hetero.sched.rates.Rates
    alpha: float  # CostModel.routing_alpha

    def __call__(self, concurrency: int, reqs: list, defer: int | None):
        from hetero.predict import CostModel, predict_serving

        prompt = float(np.mean([len(r.prompt) for r in reqs]))
        out = float(np.mean([r.output for r in reqs]))
        model = CostModel(routing_alpha=self.alpha, decode_context=int(prompt + out / 2))
        new = max(1.0, prompt - self.args.shared_prefix)  # (the shared prefix is cached by then)
        p = placement(self.args, self.config, self.facts, defer)
        return predict_serving(self.config, p, self.rates, concurrency, len(reqs), new, out,
                               self.args.max_num_batched_tokens, model)  # fmt: skip

    def level(self, measured_tok_s: float, concurrency: int, reqs: list, defer) -> dict:
        """A throughput level's prediction, beside its measured output tok/s."""
        served = self(concurrency, reqs, defer)
        return {
            "predicted_tok_s": round(served.tok_s, 2),
            "vs_predicted": round(measured_tok_s / served.tok_s, 3),
            "predicted_tpot_ms": round(served.tpot_s * 1e3, 1),
        }

    def batch1(self, measured_ms: float, context: int) -> dict:
        """A batch-1 decode step at `context` tokens, beside its measured ms."""
        one = [Req([0] * context, self.args.ab_steps)]
        ms = self(1, one, self.facts.get("defer")).tpot_s * 1e3
        return {"predicted_ms": round(ms, 2), "vs_predicted": round(measured_ms / ms, 3)}


def predictor(args, config, cpu, facts: dict) -> Predictor | None:
    """This run's Predictor, or None: no CPU engine, `--calibration none`, or (the default,
    `cache`) nothing cached for this machine."""
    if cpu is None or args.calibration == "none":
        return None
    from hetero.sched.calibrate import load_rates
    from hetero.sched.rates import cached_rates

    base, E = placement(args, config, facts, None), config.n_routed_experts
    cpu_f = sorted({p.cpu_format for p in base.routed.values() if len(p.gpu_experts) < E})
    gpu_f = sorted({p.gpu_format for p in base.routed.values() if p.gpu_experts})
    shape = config.hidden_size, config.moe_intermediate_size
    if args.calibration == "cache":
        rates = cached_rates(shape, cpu_f, gpu_f, threads=args.threads)
    else:
        rates = load_rates(args.calibration, config, cpu_f, gpu_f, args.threads)
    if rates is None:
        return None
    alpha = args.routing_alpha or (1.0 if args.workload == "demo" else RANDOM_ROUTING_ALPHA)
    return Predictor(args, config, facts, rates, alpha)


def placement(args, config, facts: dict, defer: int | None) -> Placement:
    """The run's split as a placement: the demo's YAML, or v3/v2-lite's experts as load() puts
    them; `defer` replaces the deferral (None: the run's)."""
    runtime = (
        f"runtime: {{cuda_graph_max_batch: {args.cuda_graph_max_batch}, "
        f"prefill_chunk: {args.max_num_batched_tokens}, cpu_threads: {args.threads}, "
        f"pin_experts: {str(getattr(args, 'pin_experts', False)).lower()}}}\n"
    )
    if args.workload == "demo":
        p = load_placement(args.placement, config)
    else:
        d = facts.get("defer", 0) if defer is None else defer
        text = (
            f"rules:\n  - {{match: '\\.mlp\\.experts$', device: cpu, format: {facts['format']}, "
            f"gpu_experts: {facts['gpu_experts']}, gpu_format: {facts['gpu_format']}, "
            f"deferred: {d}}}\n  - {{device: gpu, format: {facts['gpu_format']}}}\n"
        )
        return parse_placement(text + runtime, config, f"<{args.workload} bench>")
    if defer is None:
        return p
    routed = {L: dataclasses.replace(e, deferred=defer) for L, e in p.routed.items()}
    return dataclasses.replace(p, routed=MappingProxyType(routed))
