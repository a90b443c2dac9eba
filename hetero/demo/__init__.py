"""The demo model shipped in the package (trained by tools/train_demo.py, see docs/demo_model.md):
the default of `hetero chat`, `generate` and `serve` when no model is given."""

from __future__ import annotations

from pathlib import Path

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def demo_dir() -> Path | None:
    """This folder when it holds the whole checkpoint, else None (a source tree without it)."""
    here = Path(__file__).resolve().parent
    return here if all((here / f).exists() for f in FILES) else None
