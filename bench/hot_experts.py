"""GPU hit rate of the routed experts: the static profile's top-N set against the live set
HotExperts keeps (hetero.sched.hot_experts), on held-out prompts of the shipped demo model, on
the CPU. One JSON line per policy on stdout, after a `setup` line.

    python bench/hot_experts.py --gpu-experts 4 --configs 1:1,4:1,16:1,4:2

The prompts are chunks of the demo's held-out Python files (training.json; this interpreter's
copies). Files alternate between the two halves: the profile half is run as `hetero
profile-experts` runs it and gives each MoE layer its N most chosen experts; the held-out half is
run file by file (one batch of `--per-file` chunks each, greedy), its routing recorded step by
step, and replayed through the policy: `static` (max_swaps 0: the profile's set throughout) and
one line per `--configs` entry `every:max_swaps`. The hit rate is the share of routed (token,
slot) pairs whose expert was on the GPU when the step ran: `hit_rate` over all steps, `decode`
over decode steps only (the prefill steps' many tokens read most experts anyway), per layer
too. `copied_mb`: the packed bytes the swaps would copy to the GPU (int4-g32).

`--live`: the same held-out half run again on the hybrid model (int4 on the CPU engine and on
the "GPU", this host) with HotExperts swapping for real between steps (the first `--configs`
entry): its measured hit rate, the replay of its own routing (equal by construction: the check),
and its greedy tokens against the static hybrid's (every expert is the same int4 wherever it
runs, so they match but for fp32 rounding near a tie)."""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetero.config import ModelConfig  # noqa: E402
from hetero.cpu_experts.formats import Format  # noqa: E402
from hetero.generate import SamplingParams, stream  # noqa: E402
from hetero.sched.hot_experts import (  # noqa: E402
    HotConfig,
    HotExperts,
    LiveSet,
    hit_rate,
    replay,
    summarize,
)
from hetero.sched.profile import profile_experts  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "hetero" / "demo"


def prompt_files(tokenizer, prompt_len: int, per_file: int) -> list[list[list[int]]]:
    """Each held-out file that this Python has: `per_file` chunks of `prompt_len` tokens."""
    names = json.loads((DEMO / "training.json").read_text())["corpus"]["heldout_files"]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in names:
        if not (stdlib / name).is_file():
            continue
        ids = tokenizer.encode((stdlib / name).read_text(errors="replace"))
        if len(ids) < prompt_len * per_file:
            continue
        step = len(ids) // per_file
        out.append([ids[i * step : i * step + prompt_len] for i in range(per_file)])
    return out


@torch.inference_mode()
def record(model, files, max_tokens: int, between=lambda: None):
    """Runs each file's chunks as one batch; -> (steps: [{layer: ids [T, k]}], decode flags,
    the tokens generated)."""
    moe = model.config.moe_layers
    steps: list[dict[int, np.ndarray]] = []

    def hook(L):
        def keep(module, inputs, output) -> None:
            if L == moe[0]:
                steps.append({})
            steps[-1][L] = output[1].cpu().numpy()

        return keep

    handles = [model.model.layers[L].mlp.gate.register_forward_hook(hook(L)) for L in moe]
    tokens, decode = [], []
    try:
        for prompts in files:
            n0 = len(steps)
            out = [[] for _ in prompts]
            for step in stream(model, prompts, SamplingParams(max_tokens=max_tokens)):
                between()
                for i, t in step:
                    out[i].append(t)
            tokens.append(out)
            decode += [False] + [True] * (len(steps) - n0 - 1)  # (whole prompts in one step)
    finally:
        for h in handles:
            h.remove()
    return steps, decode, tokens


def by_phase(steps, decode, start, E: int, config: HotConfig) -> dict:
    """replay(), with the decode steps' hits booked apart as well."""
    live = {L: LiveSet(r, E, config) for L, r in start.items()}
    hits = {L: [0, 0] for L in start}  # decode steps: hits, routes
    for n, (step, dec) in enumerate(zip(steps, decode), 1):
        for L, ids in step.items():
            c = np.bincount(ids.reshape(-1), minlength=E)
            if dec:
                hits[L][0] += int(c[live[L].resident].sum())
                hits[L][1] += int(c.sum())
            live[L].add(c)
        if n % config.every == 0:
            for s in live.values():
                s.swap_point()
    out = summarize(live)
    assert out == summarize(replay(steps, start, E, config))  # (the library's replay)
    out["decode"] = hit_rate(sum(h for h, _ in hits.values()), sum(r for _, r in hits.values()))
    out["decode_layers"] = {L: hit_rate(*h) for L, h in hits.items()}
    return out


def line(name: str, config: HotConfig | None, result: dict, expert_bytes: int) -> dict:
    r4 = lambda v: round(v, 4)  # noqa: E731
    return {
        "policy": name,
        **(
            {
                "every": config.every,
                "max_swaps": config.max_swaps,
                "decay": config.decay,
                "min_gain": config.min_gain,
            }
            if config
            else {}
        ),  # fmt: skip
        "hit_rate": r4(result["hit_rate"]),
        "decode": r4(result["decode"]),
        "layers": {str(L): r4(v) for L, v in result["layers"].items()},
        "decode_layers": {str(L): r4(v) for L, v in result["decode_layers"].items()},
        "routes": result["routes"],
        "swaps": result["swaps"],
        "copied_mb": round(result["swaps"] * expert_bytes / 1e6, 2),
    }


def live_check(files, profile: dict, n: int, config: HotConfig, max_tokens: int) -> dict:
    """The held-out half on the int4 hybrid, HotExperts swapping between steps, against the
    static hybrid."""
    from hetero.placement import parse_placement
    from hetero.sched.runtime import HybridOptions, load_hybrid

    mc = ModelConfig.from_hf(DEMO)
    text = (
        "rules:\n"
        "  - {match: '\\.mlp\\.experts$', device: cpu, format: int4,"
        f" gpu_experts: {{hottest: {n}}}, gpu_format: int4}}\n"
        "  - {device: gpu}\n"
    )
    placement = parse_placement(text, mc, "<bench>", profile)
    opts = HybridOptions(dtype=torch.float32, progress=False)
    start = {L: placement.experts(L).gpu_experts for L in mc.moe_layers}
    runs = {}
    for name in ("static", "live"):
        hybrid = load_hybrid(DEMO, placement, opts)
        try:
            hot = HotExperts(hybrid.model, config if name == "live" else HotConfig(max_swaps=0))
            steps, _, tokens = record(hybrid.model, files, max_tokens, hot.step_done)
            runs[name] = (steps, tokens, hot.summary())
        finally:
            hybrid.close()
    steps, tokens, measured = runs["live"]
    replayed = summarize(replay(steps, start, mc.n_routed_experts, config))
    same = sum(a == b for f, g in zip(tokens, runs["static"][1]) for a, b in zip(f, g))
    return {
        "policy": "live-check",
        "heldout_files": len(files),
        "every": config.every,
        "max_swaps": config.max_swaps,
        "measured_hit_rate": round(measured["hit_rate"], 4),
        "replayed_hit_rate": round(replayed["hit_rate"], 4),
        "static_hit_rate": round(runs["static"][2]["hit_rate"], 4),
        "swaps": measured["swaps"],
        "sequences_equal": f"{same}/{sum(len(f) for f in tokens)}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-experts", type=int, default=4, help="N of each layer's experts")
    ap.add_argument("--configs", default="1:1,4:1,16:1,4:2", help="every:max_swaps, ...")
    ap.add_argument("--decay", type=float, default=HotConfig.decay)
    ap.add_argument("--min-gain", type=float, default=HotConfig.min_gain)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--per-file", type=int, default=4, help="chunks a file: one batch")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--live-files", type=int, default=4, help="held-out files for --live")
    ap.add_argument("--live", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from hetero.loader import load_model
    from hetero.placement import profile_from_json

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    model = load_model(DEMO, device="cpu", dtype=torch.float32, progress=False)
    mc = model.config
    files = prompt_files(tokenizer, args.prompt_len, args.per_file)
    train, held = files[0::2], files[1::2]
    data = profile_experts(model, [p for f in train for p in f], args.max_tokens, args.per_file)
    t_profile = time.perf_counter() - t0
    profile = profile_from_json(data, "<profile half>")
    start = {L: profile.hottest(L, args.gpu_experts) for L in mc.moe_layers}
    steps, decode, _ = record(model, held, args.max_tokens)
    expert_bytes = Format.parse("int4").expert_bytes(mc.hidden_size, mc.moe_intermediate_size)
    print(json.dumps({
        "setup": "demo", "moe_layers": len(mc.moe_layers), "experts": mc.n_routed_experts,
        "top_k": mc.num_experts_per_tok, "gpu_experts": args.gpu_experts,
        "profile_files": len(train), "heldout_files": len(held), "per_file": args.per_file,
        "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "steps": len(steps),
        "decode_steps": sum(decode), "profile_tokens": data["tokens"],
        "threads": torch.get_num_threads(), "profile_s": round(t_profile, 2),
        "record_s": round(time.perf_counter() - t0 - t_profile, 2),
    }), flush=True)  # fmt: skip
    E = mc.n_routed_experts
    static = by_phase(steps, decode, start, E, HotConfig(max_swaps=0))
    print(json.dumps(line("static", None, static, expert_bytes)), flush=True)
    configs = []
    for spec in args.configs.split(","):
        every, swaps = (int(v) for v in spec.split(":"))
        configs.append(HotConfig(every, swaps, args.decay, args.min_gain))
        result = by_phase(steps, decode, start, E, configs[-1])
        print(json.dumps(line("live", configs[-1], result, expert_bytes)), flush=True)
    if args.live:
        few = held[: args.live_files]
        held_out = live_check(few, data, args.gpu_experts, configs[0], args.max_tokens)
        print(json.dumps(held_out), flush=True)


if __name__ == "__main__":
    main()
