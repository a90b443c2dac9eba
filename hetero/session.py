"""A model behind a serving engine, as the commands load it (`hetero serve`, `generate`, `chat`):
the checkpoint (default: the shipped demo model), its tokenizer, the placement, and the engine's
KV pool sized by the memory plan."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import NamedTuple

from hetero.loader import CheckpointError

log = logging.getLogger("hetero")


class UsageError(ValueError):
    """A command-line value hetero cannot use (argparse cannot check it alone)."""


def default_model_dir() -> Path:
    """The shipped demo model; without it (a checkout before the weights landed), a small random
    checkpoint hetero writes itself once."""
    from hetero.demo import demo_dir
    from hetero.testing import write_tiny_v3

    if (shipped := demo_dir()) is not None:
        return shipped

    cache = Path(os.environ.get("HETERO_CACHE", Path.home() / ".cache" / "hetero"))
    path = cache / "tiny-v3"
    if not (path / "config.json").exists():
        log.info(
            "no --model given: writing a small random DeepSeek-V3-style checkpoint to %s", path
        )
        tmp = cache / f".tiny-v3.{os.getpid()}"
        write_tiny_v3(tmp)
        tmp.rename(path)  # atomic: a half-written directory is never taken for a checkpoint
    return path


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())
        raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({why})") from None


class Session(NamedTuple):
    engine: object  # hetero.engine.Engine
    close: object  # stops the CPU expert engine
    tokenizer: object
    params: object  # SamplingParams from the command line
    cpu_engine: object  # CPUExperts, None without


def load_session(
    args: argparse.Namespace,
    progress: bool,
    kv_tokens: int | None = None,
    max_num_seqs: int = 64,
    deterministic: bool = False,
    max_num_batched_tokens: int | None = None,
    hot_experts_every: int = 0,
) -> Session:
    """The model as load_placed places it behind a serving engine whose KV pool holds `kv_tokens`
    (default: what the memory plan leaves room for, at most the model's context)."""
    import torch

    from hetero.config import ModelConfig
    from hetero.engine.engine import Engine, ServingConfig

    model_dir = Path(args.model) if args.model else default_model_dir()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = getattr(torch, args.dtype if args.dtype != "auto" else auto)
    config = ModelConfig.from_hf(model_dir)  # a bad config.json is the error to show first
    tokenizer = load_tokenizer(model_dir)
    loaded = load_placed(args, model_dir, device, dtype, progress)
    stop = set(config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})
    tokens = kv_tokens or min(loaded.kv_tokens or 1, config.max_position_embeddings)
    serving = ServingConfig(
        page_size=min(loaded.kv_page_size, tokens),
        kv_cache_tokens=tokens,
        max_num_batched_tokens=max_num_batched_tokens
        or loaded.prefill_chunk
        or ServingConfig.max_num_batched_tokens,
        cuda_graph_max_batch=ServingConfig.cuda_graph_max_batch if args.cuda_graphs else 0,
        max_num_seqs=max_num_seqs,
        deterministic=deterministic,
        hot_experts_every=hot_experts_every,
    )
    engine = Engine(loaded.model, tokenizer, serving, eos_ids=tuple(sorted(stop)))
    return Session(engine, loaded.close, tokenizer, sampling_params(args), loaded.cpu_engine)


def sampling_params(args: argparse.Namespace):
    from hetero.engine.params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)  # fmt: skip


def load_placed(args: argparse.Namespace, model_dir: Path, device: str, dtype, progress: bool):
    """The model as `hetero.sched.runtime.load_for_device` places it (a `Loaded`)."""
    from hetero.sched.runtime import HybridOptions, load_for_device

    opts = HybridOptions(
        device=device, dtype=dtype, attention=args.attention, store=args.store, progress=progress
    )
    return load_for_device(model_dir, args.placement, opts, getattr(args, "profile", None))
