"""Train hetero's demo model: a small DeepSeek-V3 (MLA, sigmoid group-limited routing with the
auxiliary-loss-free bias, one shared expert) on the Python standard library's own source.

    python tools/train_demo.py --out DIR            # the shipped model: ~3 minutes on an H100
    python tools/train_demo.py --tiny --out DIR     # a few hundred K parameters, for tests

The model is transformers' own DeepseekV3ForCausalLM; the result is a plain HF checkpoint (BF16
model.safetensors, config.json, tokenizer, training.json with the data, settings and results).
The tokenizer follows the corpus, data order and initialization --seed; on the CPU two runs are
byte-identical (on CUDA, atomic adds in backward passes make the last bits differ).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
from transformers import DeepseekV3ForCausalLM

# Runnable from a plain checkout: this folder (demo_corpus) and the repository (hetero).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import demo_corpus as dc  # noqa: E402
from demo_model import TINY, RoutingBias, Settings, add_dropout, model_config, routers, save  # noqa: E402

from hetero.config import ModelConfig  # noqa: E402
from hetero.testing.tokenizer import train_tokenizer  # noqa: E402

log = logging.getLogger("train_demo")

TIMING_STEPS = 60  # the speed is measured over steps 10..TIMING_STEPS
FINISH_RESERVE = 0.08  # of --minutes kept for evaluation, saving and completions
PROMPTS = ("def __init__(self", "import ")
CHAT_REQUEST = "Return the absolute path of a file."


def lr_at(s: Settings, step: int, progress: float) -> float:
    """Linear warmup by steps, then cosine down to min_lr_ratio over `progress` in [0, 1]."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * cosine)


def optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on the (1-D) norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def heldout_nll(model, ids: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple[float, int]:
    """Mean next-token NLL over the targets of (ids, labels) [N, T], and their number."""
    was_training, device = model.training, model.device
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch):
        x, y = ids[i : i + batch].to(device), labels[i : i + batch].to(device)
        with autocast(device):
            logits = model(input_ids=x, use_cache=False).logits
        part, n = dc.next_token_nll(logits, y)
        total, count = total + part, count + n
    model.train(was_training)
    return total / max(1, count), count


def train(model, docs, heldout, s: Settings, args, deadline: float, result: dict) -> None:
    """The loop. Its length (the lr schedule's horizon) is `s.epochs` of data, or --max-steps if
    fewer; after TIMING_STEPS it is cut to what fits before the deadline at the measured speed,
    so a slow device still ends its schedule. The deadline itself is a hard stop."""
    device = model.device
    opt = optimizer(model, s)
    balance = RoutingBias(model, s.bias_update_speed)
    model.train()
    rows = sum(len(d.ids) for d in docs) // s.context
    horizon = max(1, int(s.epochs * (rows // s.batch_size)))
    horizon = min(horizon, args.max_steps or horizon)
    log.info("schedule: %d steps of %d x %d tokens", horizon, s.batch_size, s.context)
    start = last_log = time.monotonic()
    tokens, last_tokens, steps, window, losses, curve = 0, 0, 0, [], [], []
    imbalances: deque[torch.Tensor] = deque(maxlen=50)
    for step, (epoch, x, y) in enumerate(dc.batches(docs, s.context, s.batch_size, args.seed)):
        now = time.monotonic()
        if step >= horizon or now >= deadline:
            break
        if step == 10:
            timing_start = now
        if step == TIMING_STEPS:
            per_step = (now - timing_start) / (TIMING_STEPS - 10)
            fit = step + int(0.95 * (deadline - now) / per_step)
            if fit < horizon:
                log.info("schedule: %d steps fit in the time left, not %d", fit, horizon)
                horizon = fit
        for group in opt.param_groups:
            group["lr"] = lr_at(s, step, step / horizon)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            loss = model(input_ids=x, labels=y, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        imbalances.append(balance.update())
        window.append(loss.detach())
        tokens, steps = tokens + x.numel(), steps + 1
        if (step + 1) % s.log_every == 0:
            losses.append(float(torch.stack(window).mean()))
            window.clear()
            now = time.monotonic()
            rate, last_log, last_tokens = (tokens - last_tokens) / (now - last_log), now, tokens
            point = {"step": step + 1, "loss": round(losses[-1], 4), "tokens": tokens}
            if s.eval_every and (step + 1) % s.eval_every == 0:
                point["heldout_loss"] = round(heldout_nll(model, *heldout, 64)[0], 4)
            curve.append(point)
            log.info(
                "step %d epoch %d loss %.4f%s lr %.2e  %.0f tok/s  load max/mean %.2f  %.0fs",
                step + 1, epoch, losses[-1],
                f" heldout {point['heldout_loss']:.4f}" if "heldout_loss" in point else "",
                opt.param_groups[0]["lr"], rate, float(imbalances[-1]), now - start,
            )  # fmt: skip
    if not steps:
        raise SystemExit("no training step fit in --minutes")
    if window:  # the steps after the last log point
        losses.append(float(torch.stack(window).mean()))
    seconds = time.monotonic() - start
    result.update(steps=steps, tokens_seen=tokens, loss_curve=curve)
    result.update(epochs=round(tokens / (rows * s.context), 3), train_seconds=round(seconds, 1))
    result["tokens_per_second"] = round(tokens / seconds)
    result["train_loss_first"] = losses[0]
    result["train_loss_final"] = sum(losses[-3:]) / len(losses[-3:])
    result["load_max_over_mean_final"] = round(float(torch.stack(list(imbalances)).mean()), 3)


@torch.no_grad()
def completions(model, out: Path, max_new_tokens: int) -> dict[str, str]:
    """Greedy continuations of two code prompts and one chat request."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_REQUEST}], tokenize=False, add_generation_prompt=True
    )
    result = {}
    for prompt, text, special in [(p, p, True) for p in PROMPTS] + [(CHAT_REQUEST, chat, False)]:
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=special).to(model.device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new = tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        result[prompt] = new if prompt == CHAT_REQUEST else prompt + new
        log.info("completion of %r:\n%s", prompt, result[prompt])
    return result


def with_overrides(s: Settings, pairs: list[str]) -> Settings:
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in Settings.__dataclass_fields__:
            raise SystemExit(f"--set {pair}: no setting {key!r} (settings: {', '.join(asdict(s))})")
        changes[key] = type(getattr(s, key))(value)
    return replace(s, **changes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget, all included")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a few hundred K parameters, for tests")
    p.add_argument("--limit-files", type=int, default=0, help="use this many training files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. lr=1e-3")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Trains, saves to --out, evaluates the saved checkpoint; returns training.json's dict."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.monotonic()
    s = with_overrides(TINY if args.tiny else Settings(), args.set)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")
    args.out.mkdir(parents=True, exist_ok=True)

    corpus = dc.load_corpus(limit_files=args.limit_files or None)
    tokenizer = train_tokenizer(s.vocab_size, (corpus.texts[f] for f in corpus.train))
    docs, data_stats = dc.training_documents(tokenizer, corpus, s.chat_fraction, args.seed)
    held_docs = dc.plain_documents(tokenizer, [corpus.texts[f] for f in corpus.heldout])
    heldout = dc.pack(held_docs, s.context, pad_last=True)
    log.info("corpus %s", corpus.describe())
    log.info("data %s, prepared in %.1fs", data_stats, time.monotonic() - t0)

    torch.manual_seed(args.seed)
    config = model_config(s)
    model = DeepseekV3ForCausalLM(config).to(device)
    add_dropout(model, s.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters on %s", n_params / 1e6, device)
    result = {
        "seed": args.seed,
        "corpus": corpus.describe() | {"heldout_files": list(corpus.heldout)},
        "train_files": list(corpus.train),
        "data": data_stats,
        "settings": asdict(s),
        "parameters": n_params,
        "activated_parameters": ModelConfig.from_hf(config.to_dict()).num_activated_parameters,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    deadline = t0 + args.minutes * 60 * (1 - FINISH_RESERVE)
    train(model, docs, heldout, s, args, deadline, result)
    save(model, args.out, tokenizer)
    del model

    trained = DeepseekV3ForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device)
    nll, count = heldout_nll(trained, *heldout, 64)
    bigram = dc.bigram_perplexity(docs, *heldout, s.vocab_size)
    result["heldout"] = {
        "tokens": count,
        "loss": round(nll, 4),
        "perplexity": round(math.exp(nll), 3),
        "bigram_perplexity": round(bigram, 3),
        "bigram_k": dc.BIGRAM_K,
        "ratio_to_bigram": round(math.exp(nll) / bigram, 4),
    }
    log.info("held-out: %s", result["heldout"])
    result["completions"] = completions(trained, args.out, s.completion_tokens)
    biases = [g.e_score_correction_bias for g in routers(trained)]
    result["routing_bias_abs_max"] = round(max(float(b.abs().max()) for b in biases), 4)
    result["wall_seconds"] = round(time.monotonic() - t0, 1)
    (args.out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s in %.0fs", args.out, result["wall_seconds"])
    return result


if __name__ == "__main__":
    main()
