"""What a placement costs in quality: perplexity on text files, and the mean KL divergence and
greedy agreement of its next-token distributions against the model's plain reference run (all
weights on one device in bf16, routed experts as torch modules, nothing deferred).

Every candidate sees the same token windows in the same batches as the reference, in lockstep,
so no distribution is ever stored: per batch the reference runs once, then each candidate.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetero.config import ModelConfig
from hetero.model import ForwardBatch, Transformer
from hetero.placement import Placement, PlacementError, parse_placement
from hetero.sched.hybrid import HybridExperts

log = logging.getLogger(__name__)
EXPERTS = r"'\.mlp\.experts$'"


def standard_placements(config: ModelConfig) -> dict[str, Placement]:
    """The docs table's rows: each CPU expert format, deferral d = 1, 2 of the top-k (on bf16
    experts, so only deferral differs from the reference), and FP8 non-expert weights. Rows the
    model cannot take (a group size that does not divide its sizes) are left out."""

    def placement(experts: str, gpu: str = "bf16") -> Placement | None:
        rules = f"  - {{match: {EXPERTS}, device: cpu, {experts}}}\n"
        rules += f"  - {{device: gpu, format: {gpu}}}\n"
        try:
            return parse_placement("rules:\n" + rules, config, "<eval>")
        except PlacementError as e:
            log.info("eval: skipping %r: %s", experts, e)
            return None

    formats = ("bf16", "int8", "int8-g128", "int4", "int4-g64", "int4-g128")
    rows = {f"{f} experts": placement(f"format: {f}") for f in formats}
    for d in (1, 2):
        if d < config.num_experts_per_tok:
            rows[f"deferral d={d} (bf16 experts)"] = placement(f"format: bf16, deferred: {d}")
    rows["fp8 non-experts (bf16 experts)"] = placement("format: bf16", gpu="fp8")
    return {name: p for name, p in rows.items() if p is not None}


def token_windows(tokenizer, files: Iterable[str | Path], context: int) -> list[list[int]]:
    """Each file's tokens (with BOS, as the model saw text in training) cut into windows of at
    most `context` tokens; a window predicts its own tokens 1..n-1."""
    windows = []
    for file in files:
        ids = tokenizer.encode(Path(file).read_text(encoding="utf-8"))
        windows += [ids[i : i + context] for i in range(0, len(ids), context)]
    return [w for w in windows if len(w) >= 2]


@dataclass
class Tally:
    """Sums over predicted tokens; `result()` turns them into the reported figures."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, logp: torch.Tensor, ref_logp: torch.Tensor, targets: torch.Tensor) -> None:
        """logp, ref_logp [n, V] log-probabilities for targets [n]."""
        self.tokens += targets.numel()
        self.nll -= logp.gather(1, targets[:, None]).sum().item()
        self.kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        self.agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()

    def result(self) -> dict:
        n = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "perplexity": math.exp(self.nll / n),
            "kl_mean": self.kl / n,
            "greedy_agreement": self.agree / n,
            **self.extra,
        }


@torch.inference_mode()
def window_logprobs(model: Transformer, windows: list[list[int]]) -> list[torch.Tensor]:
    """One prefill of the windows together -> per window log-probs [n - 1, V] (fp32, CPU) of
    the tokens it predicts."""
    device = model.lm_head.weight.device
    lens = [len(w) for w in windows]
    cache = model.new_cache(len(windows), max(lens))
    batch = ForwardBatch.build(list(range(len(windows))), lens, lens, device)
    ids = torch.tensor([t for w in windows for t in w], device=device)
    logp = model(ids, batch, cache).float().log_softmax(-1).cpu()  # [T, V]
    out, start = [], 0
    for n in lens:
        out.append(logp[start : start + n - 1])
        start += n
    return out


def evaluate(
    reference: Transformer,
    candidates: Mapping[str, Transformer],
    windows: list[list[int]],
    batch_size: int = 8,
    progress=None,
) -> dict[str, dict]:
    """{"reference": ..., name: ...} -> tokens, perplexity, kl_mean, greedy_agreement.

    Deferring candidates defer per token, as at batch 1, in windows of any length
    (HybridExperts.share_deferral, defer_max_tokens): in a window of many tokens nearly every
    expert is read for some token, so shared deferral would defer almost nothing and hide the
    cost a decoding user pays."""
    for model in candidates.values():
        for module in model.modules():
            if isinstance(getattr(module, "routed", None), HybridExperts):
                module.routed.share_deferral = False
                module.routed.defer_max_tokens = sys.maxsize
    tallies = {"reference": Tally(), **{name: Tally() for name in candidates}}
    starts = range(0, len(windows), batch_size)
    for i in progress(starts) if progress else starts:
        chunk = windows[i : i + batch_size]
        targets = [torch.tensor(w[1:]) for w in chunk]
        ref = window_logprobs(reference, chunk)
        for r, t in zip(ref, targets):
            tallies["reference"].add(r, r, t)
        for name, model in candidates.items():
            for lp, r, t in zip(window_logprobs(model, chunk), ref, targets):
                tallies[name].add(lp, r, t)
    results = {name: t.result() for name, t in tallies.items()}
    base = results["reference"]["perplexity"]
    for r in results.values():
        r["perplexity_change"] = r["perplexity"] / base - 1
    return results


def table(results: dict[str, dict]) -> str:
    """A markdown table of `evaluate`'s results."""
    lines = [
        "| configuration | perplexity | vs reference | mean KL (nats) | greedy agreement |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['perplexity']:.3f} | {100 * r['perplexity_change']:+.2f}% "
            f"| {r['kl_mean']:.5f} | {100 * r['greedy_agreement']:.2f}% |"
        )
    n = next(iter(results.values()))["tokens"]
    return "\n".join(lines) + f"\n\n{n} predicted tokens."
