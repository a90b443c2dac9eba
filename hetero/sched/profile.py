"""Expert profiles: how often the router of each MoE layer picks each expert on some prompts.
Placement can then keep a layer's hottest experts on the GPU (`gpu_experts: {hottest: N}`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hetero.generate import SamplingParams, generate
from hetero.model import Transformer


def read_prompts(path: str | Path) -> list[str]:
    """A text file, one prompt per line (blank lines skipped), or JSON lines each with a
    "prompt" or "text" field."""
    path = Path(path)
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                prompts.append(record["prompt"] if "prompt" in record else record["text"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"{path}:{n}: expected a JSON object with 'prompt' or 'text'"
                ) from None
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


@torch.inference_mode()
def profile_experts(
    model: Transformer, prompts: list[list[int]], max_tokens: int = 16, batch_size: int = 8
) -> dict:
    """Runs the prompts (prefill + `max_tokens` greedy steps, `batch_size` at a time) and counts
    the router's choices: {"tokens": N, "layers": {"L": [count per expert]}} (JSON-ready)."""
    config = model.config
    E = config.n_routed_experts
    counts = {L: torch.zeros(E, dtype=torch.long) for L in config.moe_layers}
    seen = [0]

    def hook(layer: int):
        def record(module, inputs, output) -> None:
            ids = output[1]  # Gate returns (weights [T, k], ids [T, k])
            counts[layer] += torch.bincount(ids.flatten().cpu(), minlength=E)
            if layer == config.moe_layers[0]:
                seen[0] += ids.shape[0]

        return record

    handles = [
        model.model.layers[L].mlp.gate.register_forward_hook(hook(L)) for L in config.moe_layers
    ]
    try:
        params = SamplingParams(max_tokens=max_tokens)
        for i in range(0, len(prompts), batch_size):
            generate(model, prompts[i : i + batch_size], params)
    finally:
        for h in handles:
            h.remove()
    return {"tokens": seen[0], "layers": {str(L): c.tolist() for L, c in counts.items()}}
