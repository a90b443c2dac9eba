"""Variants of a cached numba kernel module, for the benches that time or check a kernel with a
part changed (amx_ablate, amx_layout, cpu_vector_micro): its source with text replaced, written
uncached to a scratch folder and imported. Each replacement must find its text (once, unless
`every`), so a kernel edit that moves it fails loudly, not as a variant that silently equals the
kernel (tests/test_bench_cpu.py builds every bench's variants)."""

from __future__ import annotations

import functools
import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType


def rewrite(text: str, old: str, new: str, every: bool = False) -> str:
    """text with `old` -> `new`: exactly one occurrence, or (`every`) all of at least one."""
    n = text.count(old)
    assert n == 1 or (every and n > 0), f"the kernel has {old!r} {n} times"
    return text.replace(old, new)


def source(module: ModuleType, rewrites=()) -> str:
    """`module`'s source, uncached, with each (old, new) of `rewrites` applied once."""
    text = Path(module.__file__).read_text().replace('"cache": True', '"cache": False')
    for old, new in rewrites:
        text = rewrite(text, old, new)
    return text


@functools.cache
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="kernel_variants_"))
    sys.path.insert(0, str(folder))
    return folder


def load(name: str, text: str) -> ModuleType:
    """The module `name` made of `text` (a new name for each variant: imports are cached)."""
    (_folder() / f"{name}.py").write_text(text)
    return importlib.import_module(name)
