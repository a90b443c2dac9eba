"""`hetero serve | generate | chat | convert | plan | profile-experts | eval`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hetero.config import ConfigError
from hetero.cpu_experts.store import StoreError
from hetero.loader import CheckpointError
from hetero.placement import PlacementError
from hetero.plan import PlanError
from hetero.registry import MLA_ATTENTION
from hetero.session import (
    UsageError,
    default_model_dir,
    load_placed,
    load_session,
    load_tokenizer,
    sampling_params,
)

log = logging.getLogger("hetero")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def cmd_generate(args: argparse.Namespace) -> int:
    from hetero.config import ModelConfig
    from hetero.engine.engine import RequestError

    model_dir = Path(args.model) if args.model else default_model_dir()
    context = ModelConfig.from_hf(model_dir).max_position_embeddings
    tokenizer = load_tokenizer(model_dir)
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    need = len(prompt_ids) + args.max_tokens  # the KV pool this one request needs
    if need > context:  # before any weight is read
        raise UsageError(
            f"this model's context is {context} tokens; the prompt has {len(prompt_ids)} and "
            f"--max-tokens asks for {args.max_tokens} more ({need} in all)"
        )
    engine, close, tokenizer, params, _ = load_session(args, progress=not args.json, kv_tokens=need)
    try:
        engine.add_request(prompt_ids, params)
        output_ids, text = [], ""
        while engine.has_work:
            for out in engine.step():
                output_ids += out.token_ids
                text += out.text
    except RequestError as e:
        raise UsageError(str(e)) from None
    finally:
        close()
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "output_ids": output_ids, "text": text}))
    else:
        print(text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from hetero.chat import chat_loop, remote_chat_loop

    if args.url:  # a running server: nothing loads here
        print(f"hetero chat: {args.url}; replies up to {args.max_tokens} tokens")
        remote_chat_loop(args.url, sampling_params(args), args.api_key, system=args.system)
        return 0

    engine, close, tokenizer, params, _ = load_session(args, progress=True)
    n = sum(p.numel() for p in engine.model.parameters()) / 1e6
    where = f"{args.model or 'the built-in model'}, {n:.1f}M parameters on the device"
    print(f"hetero chat: {where}; replies up to {params.max_tokens} tokens")
    try:
        chat_loop(engine, tokenizer, params, system=args.system)
    finally:
        close()
    return 0


def cmd_profile_experts(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from hetero.sched.profile import profile_experts, read_prompts

    model_dir = Path(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        prompts = read_prompts(args.prompts)
    except (OSError, ValueError) as e:
        raise UsageError(f"--prompts: {e}") from None
    model, closer, *_ = load_placed(args, model_dir, device, dtype, progress=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = [tokenizer.encode(p) for p in prompts]
        profile = profile_experts(model, ids, args.max_tokens)
    finally:
        closer()
    profile = {"model": str(model_dir.resolve()), **profile}
    Path(args.out).write_text(json.dumps(profile) + "\n")
    n = len(profile["layers"])
    print(f"{args.out}: {profile['tokens']} tokens, expert counts of {n} MoE layers")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from hetero.config import ModelConfig
    from hetero.eval import evaluate, standard_placements, table, token_windows
    from hetero.loader import load_model
    from hetero.placement import load_placement
    from hetero.sched.runtime import HybridOptions, load_hybrid

    model_dir = Path(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    config = ModelConfig.from_hf(model_dir)
    placements = {p: load_placement(p, config) for p in args.placement or ()}
    if args.sweep or not placements:
        placements |= standard_placements(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        windows = token_windows(tokenizer, args.text, args.context)[: args.max_windows]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--text: {e}") from None
    if not windows:
        raise UsageError("--text: no window of at least 2 tokens")
    reference = load_model(model_dir, device=device, dtype=dtype, progress=False)
    opts = HybridOptions(device=device, dtype=dtype, progress=False)
    hybrids = {name: load_hybrid(model_dir, p, opts) for name, p in placements.items()}
    try:
        candidates = {name: h.model for name, h in hybrids.items()}
        results = evaluate(reference, candidates, windows, args.batch_size, tqdm)
    finally:
        for h in hybrids.values():
            h.close()
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from hetero.config import ModelConfig
    from hetero.cpu_experts.formats import Format
    from hetero.cpu_experts.store import ExpertStore, convert

    try:
        fmt = Format.parse(args.cpu_format)
        if args.group_size is not None:
            if "-g" in args.cpu_format and args.group_size != fmt.group_size:
                raise ValueError(f"its group size differs from --group-size {args.group_size}")
            fmt = Format(fmt.name, args.group_size)
    except ValueError as e:
        raise UsageError(f"--cpu-format {args.cpu_format!r}: {e}") from None
    out = convert(args.model, args.out, fmt, progress=True)
    store = ExpertStore.open(out, ModelConfig.from_hf(args.model), args.model)
    print(f"{out}: {len(store.layers)} MoE layers as {fmt}, {store.nbytes / 2**30:.2f} GiB")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from hetero.config import ModelConfig
    from hetero.loader import read_index
    from hetero.placement import RuntimeSettings, load_placement
    from hetero.plan import GIB, budgets
    from hetero.sched.runtime import HybridOptions, absorbs, choose_placement

    for flag, value in (("--vram", args.vram), ("--ram", args.ram)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} {value}: expected GiB > 0")
    if args.profile and not args.placement:
        raise UsageError("--profile needs --placement (the default placement uses no profile)")
    config = ModelConfig.from_hf(args.model)
    index = read_index(args.model)
    placement = load_placement(args.placement, config, args.profile) if args.placement else None
    vram, ram = budgets(placement.runtime if placement else RuntimeSettings(), args.vram, args.ram)
    notes = []
    if vram is None:
        vram = 24 * GIB
        notes.append("no CUDA device here and no --vram: a 24 GiB GPU is assumed")
    # what generate/chat would load: the given placement, the whole model, or the default
    absorb = absorbs(HybridOptions.attention, True)  # (serve's default attention on a GPU)
    chosen, plan, _ = choose_placement(
        config, index, placement, True, vram, ram, torch.bfloat16, absorb
    )
    plan = replace(plan, notes=(*plan.notes, *notes))
    prediction = _predict(args, config, chosen) if args.predict else None
    if args.json:
        out = plan.to_dict() | ({"prediction": prediction.to_dict()} if prediction else {})
        print(json.dumps(out, indent=2))
    else:
        print(plan.table() + (f"\n\n{prediction.table()}" if prediction else ""))
    return 0 if plan.fits else 1


def _predict(args: argparse.Namespace, config, placement):
    """`hetero plan --predict`: the speed to expect, from the calibration (docs/predict.md)."""
    from hetero.predict import predict
    from hetero.sched.calibrate import load_rates
    from hetero.sched.rates import CalibrationError

    E = config.n_routed_experts
    routed = placement.routed.values()
    cpu = sorted({p.cpu_format for p in routed if len(p.gpu_experts) < E})
    gpu = sorted({p.gpu_format for p in routed if p.gpu_experts})
    try:
        rates = load_rates(args.calibration, config, cpu, gpu, placement.runtime.cpu_threads)
    except CalibrationError as e:
        raise UsageError(str(e)) from None
    return predict(config, placement, rates, args.concurrency, args.prompt_lengths)


def _int_list(spec: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in spec.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected integers like 1,16,64") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected integers >= 1")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero", description="DeepSeek MoE inference, CPU experts + GPU"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete one prompt and print the text")
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    g.add_argument(
        "--json", action="store_true", help="print {prompt_ids, output_ids, text} as JSON"
    )
    _model_args(g, max_tokens=32, temperature=0.0)
    h = sub.add_parser("chat", help="talk to the model in the terminal")
    h.add_argument("--system", help="a system message to start the conversation with")
    h.add_argument("--url", help="talk to a running server (hetero serve) instead of loading")
    h.add_argument("--api-key", default=os.environ.get("HETERO_API_KEY"), help="for --url")
    _model_args(h, max_tokens=256, temperature=0.7)
    _placement_args(h)
    h.set_defaults(func=cmd_chat)
    _placement_args(g)
    g.set_defaults(func=cmd_generate)
    f = sub.add_parser("profile-experts", help="count each MoE layer's expert choices on prompts")
    f.add_argument("--model", required=True, help="HF checkpoint directory")
    f.add_argument("--prompts", required=True, help="text file (a prompt a line) or .jsonl")
    f.add_argument("--out", required=True, help="the profile JSON to write")
    f.add_argument("--max-tokens", type=int, default=16, help="greedy tokens after each prompt")
    f.add_argument("--device", help="cpu, cuda ... (default: cuda when present)")
    f.add_argument("--attention", choices=sorted(MLA_ATTENTION.backends), default="absorbed")
    _placement_args(f)
    f.set_defaults(func=cmd_profile_experts)
    e = sub.add_parser(
        "eval", help="perplexity, KL and greedy agreement of placements against the reference"
    )
    e.add_argument("--model", required=True, help="HF checkpoint directory")
    e.add_argument("--text", nargs="+", required=True, help="text files to score")
    e.add_argument("--placement", action="append", help="a placement YAML to score (repeatable)")
    e.add_argument(
        "--sweep",
        action="store_true",
        help="also (default: only) the standard rows: formats, deferral d=1,2, fp8 non-experts",
    )
    e.add_argument("--context", type=int, default=512, help="tokens a window")
    e.add_argument("--max-windows", type=int, help="score at most this many windows")
    e.add_argument("--batch-size", type=int, default=8, help="windows a forward pass")
    e.add_argument("--device", help="cpu, cuda ... (default: cuda when present)")
    e.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("convert", help="pack a checkpoint's routed experts for the CPU, once")
    c.add_argument("--model", required=True, help="HF checkpoint directory")
    c.add_argument("--out", required=True, help="the expert store directory to write")
    c.add_argument(
        "--cpu-format", required=True, help="int4 | int8 | bf16, or with a group: int4-g64"
    )
    c.add_argument("--group-size", type=int, help="scale group along K (int4: 32, 64, 128)")
    c.set_defaults(func=cmd_convert)
    p = sub.add_parser(
        "plan", help="GPU and RAM bytes per component of a placement; exit 1 if it does not fit"
    )
    p.add_argument("--model", required=True, help="checkpoint directory (config.json is enough)")
    p.add_argument("--placement", help="placement YAML (default: derived from the model and VRAM)")
    p.add_argument("--profile", help="expert profile JSON (for gpu_experts: {hottest: N})")
    p.add_argument(
        "--vram", type=float, help="GPU GiB (default: CUDA device 0's total, else 24 assumed)"
    )
    p.add_argument("--ram", type=float, help="host RAM GiB (default: this machine's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--predict",
        action="store_true",
        help="also predict decode and prefill tok/s from a calibration (docs/predict.md)",
    )
    p.add_argument(
        "--calibration",
        default="auto",
        help="for --predict: a calibration JSON file, or auto (this machine's cache, else "
        "measured now, ~10-30 s a format)",
    )
    p.add_argument(
        "--concurrency", type=_int_list, default=(1, 16, 64), help="for --predict: 1,16,64"
    )
    p.add_argument(
        "--prompt-lengths",
        type=_int_list,
        default=(512, 8192, 32768),
        help="for --predict: prompt tokens, 512,8192,32768",
    )
    p.set_defaults(func=cmd_plan)
    from hetero.server.serve import add_parser

    add_parser(sub, _model_args, _placement_args)
    return parser


def _model_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument(
        "--model", help="HF checkpoint directory (default: the demo model in hetero/demo/)"
    )
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0 if temperature == 0 else 0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument(
        "--attention", choices=sorted(MLA_ATTENTION.backends), default="auto",
        help="MLA: triton = the kernels on a CUDA paged cache, the absorbed torch form "
        "elsewhere; auto = triton, and flashinfer's decode where installed and faster",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graphs", action="store_true", help="decode steps from per-layer CUDA graphs"
    )


def _placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--placement",
        help="placement YAML: routed experts on the CPU engine (default: all on "
        "--device, the reference path)",
    )
    p.add_argument("--store", help="expert store written by `hetero convert` (default: pack now)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, StoreError, UsageError, PlacementError, PlanError) as e:
        print(f"hetero: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or scoring: no traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
