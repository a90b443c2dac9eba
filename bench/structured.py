"""What structured output (hetero/engine/grammar.py) costs a decode step: the demo model, B
requests decoding at once, with and without a grammar each. One JSON line per (batch, grammar)
on stdout, after a `setup` line.

    python bench/structured.py --batch 1,8 --tokens 48 --rounds 3

Per decode step (steps where all B requests decode; medians over `--rounds` interleaved runs):
`step_ms` the whole step, `sample_ms` the sampler (with a grammar: filling the token bitmask
of each row in xgrammar, copying it, masking the logits), `post_ms` postprocessing (with a
grammar: each matcher accepting its token), `mask_ms` the bitmask fill alone, and per token
`ms_per_token` = step_ms / B. The baseline is the same step without a grammar
(`grammar: null`): `overhead_ms` and `overhead_share` compare with it; `share_of_step` is
the grammar's own work (fill + accept) as a share of the step, the part a faster sampler
could never remove. Requests use ignore_eos and greedy decoding; a grammar request still ends
when its grammar does, so its steps are counted only while the whole batch decodes."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hetero.engine.engine import Engine, ServingConfig  # noqa: E402
from hetero.engine.grammar import GrammarSpec  # noqa: E402
from hetero.engine.params import SamplingParams  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "hetero" / "demo"
PROMPT = "def parse(path):\n    "
# an object a model fills for many tokens: free strings, numbers, a list
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "path": {"type": "string"},
        "size": {"type": "integer"},
        "lines": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "path", "size", "lines"],
}
GRAMMARS = {
    "none": None,
    "json_object": GrammarSpec("json_object"),
    "json_schema": GrammarSpec("json_schema", json.dumps(SCHEMA)),
}


class Timed:
    """Wraps an engine method; keeps the seconds of each call."""

    def __init__(self, fn) -> None:
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        return out


def one_run(model, tok, B: int, spec: GrammarSpec | None, tokens: int) -> dict[str, list[float]]:
    """B requests (distinct prompts) decoding `tokens` tokens; -> each part's seconds per
    decode step with the whole batch decoding."""
    engine = Engine(model, tok, ServingConfig(page_size=16, kv_cache_tokens=8192), eos_ids=(1,))
    parts = {name: Timed(getattr(engine, name)) for name in ("sample", "postprocess")}
    for name, timed in parts.items():
        setattr(engine, name, timed)
    mask = Timed(engine.grammars.mask)
    engine.grammars.mask = mask
    ids = tok.encode(PROMPT, add_special_tokens=False)
    for b in range(B):
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, grammar=spec)
        engine.add_request(ids[: len(ids) - b % 3] + [100 + b], params)
    got = defaultdict(list)
    while engine.has_work:
        full = len(engine.scheduler.running) == B and not any(
            r.is_prefilling for r in engine.scheduler.running
        )
        t0 = time.perf_counter()
        engine.step()
        if full:
            got["step"].append(time.perf_counter() - t0)
            got["sample"].append(parts["sample"].times[-1])
            got["post"].append(parts["postprocess"].times[-1])
            got["mask"].append(mask.times[-1])
    return got


def ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 4) if xs else float("nan")


def run(args) -> None:
    from transformers import AutoTokenizer

    from hetero.loader import load_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = load_model(DEMO, device="cpu", dtype=dtype, progress=False)
    tok = AutoTokenizer.from_pretrained(DEMO)
    setup = {"bench": "structured", "mode": "setup", "model": "demo", "device": "cpu",
             "dtype": args.dtype, "threads": torch.get_num_threads(), "tokens": args.tokens,
             "rounds": args.rounds, "vocab": model.config.vocab_size}  # fmt: skip
    print(json.dumps(setup), flush=True)
    names = [g for g in args.grammars.split(",") if g]
    for B in args.batch:
        for name in names:  # warm-up: compiles each grammar once, settles the allocator
            one_run(model, tok, B, GRAMMARS[name], 4)
        runs = defaultdict(lambda: defaultdict(list))
        for _ in range(args.rounds):  # interleaved, so drift in the machine hits all alike
            for name in names:
                for part, xs in one_run(model, tok, B, GRAMMARS[name], args.tokens).items():
                    runs[name][part] += xs
        base = {part: ms(xs) for part, xs in runs["none"].items()} if "none" in runs else {}
        for name in names:
            row = {part: ms(xs) for part, xs in runs[name].items()}
            line = {"bench": "structured", "batch": B,
                    "grammar": None if name == "none" else name,
                    "steps": len(runs[name]["step"]), "step_ms": row["step"],
                    "ms_per_token": round(row["step"] / B, 4), "sample_ms": row["sample"],
                    "post_ms": row["post"], "mask_ms": row["mask"]}  # fmt: skip
            if base and name != "none":
                over = row["step"] - base["step"]
                line |= {"overhead_ms": round(over, 4),
                         "overhead_share": round(over / base["step"], 4),
                         "sample_overhead_ms": round(row["sample"] - base["sample"], 4),
                         "post_overhead_ms": round(row["post"] - base["post"], 4),
                         "share_of_step": round((row["mask"] + row["post"] - base["post"])
                                                / row["step"], 4)}  # fmt: skip
            print(json.dumps(line), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--tokens", type=int, default=48, help="output tokens a request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--grammars", default="none,json_object,json_schema",
                   help=f"comma-separated, of {', '.join(GRAMMARS)}")  # fmt: skip
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if bad := [g for g in args.grammars.split(",") if g and g not in GRAMMARS]:
        p.error(f"--grammars: {bad[0]!r} is not one of {', '.join(GRAMMARS)}")
    return args


if __name__ == "__main__":
    run(parse_args())
