"""A machine's measured rates (`Rates`) and the file they are cached in, as plain data: what the
prefill policy (prefill_policy.py) and the speed prediction (hetero/predict.py) read, without
torch, numba or CUDA (only `machine_fingerprint` imports them, when called). calibrate.py
measures them.

The cache (`$HETERO_CACHE_DIR/calibration.json`, else `~/.cache/hetero/calibration.json`):

    {"version": 1, "machines": {"<fingerprint key>": {
        "fingerprint": {"cpu": ..., "cores": ..., "threads": ..., "ram_gib": ..., "gpus": [...],
                        "torch": ..., "numba": ..., "kernels": ...},
        "host": {"host_read_gbps": ..., "stage_gbps": ..., "h2d_gbps": ..., ...},
        "experts": {"7168x2048 cpu:int4-g32": {"tokens": [...], "seconds": [...], "call_s": ...},
                    "7168x2048 gpu:int4-g32": {...}, "7168x2048 gpu:fp8": {...}}}}}

A machine is its fingerprint (another CPU, core count, RAM, GPU, library or kernel source is
another machine); its expert tables are keyed by (H, I, side:format), so a new shape or format
measures that table alone. An unreadable file is ignored with a warning, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

log = logging.getLogger(__name__)
CACHE_VERSION = 1
CACHE_ENV = "HETERO_CACHE_DIR"
CACHE_NAME = "calibration.json"
# the sources whose change makes measured rates stale: the kernels and their measurement
TIMED_SOURCES = ("cpu_experts/*.py", "gpu/fused_moe.py", "sched/calibrate.py")
HOST_FIELDS = ("host_read_gbps", "stage_gbps", "h2d_gbps", "hbm_gbps", "gpu_tflops", "gpu_name")


class CalibrationError(ValueError):
    """Rates that cannot serve a request (a format never measured, a file of another kind)."""


@dataclass(frozen=True)
class ExpertCost:
    """Seconds one call spends on the experts of one format: `call_s` once (a job's submit, the
    threads' wake-up, the wait), plus for each expert with tokens its seconds at its token count,
    interpolated in (`tokens`, `seconds`): linearly between points, the first point's below
    them, the last segment's slope above them (compute-bound there: cost grows with tokens)."""

    tokens: tuple[float, ...]
    seconds: tuple[float, ...]
    call_s: float = 0.0

    def __post_init__(self) -> None:
        t, s = self.tokens, self.seconds
        if not t or len(t) != len(s) or any(b <= a for a, b in zip(t, t[1:])):
            raise CalibrationError(f"expert cost: tokens {t} must rise, one seconds each ({s})")
        if any(not math.isfinite(v) or v < 0 for v in (*s, self.call_s)):
            raise CalibrationError(f"expert cost: seconds {s}, call_s {self.call_s}: not >= 0")

    def expert_s(self, n: float | np.ndarray) -> np.ndarray:
        """Seconds of one expert at n tokens (n >= 1; array in, array out)."""
        n = np.asarray(n, dtype=np.float64)
        t, s = np.asarray(self.tokens, np.float64), np.asarray(self.seconds, np.float64)
        out = np.interp(n, t, s)
        if len(t) > 1:
            slope = max(0.0, (s[-1] - s[-2]) / (t[-1] - t[-2]))
            out = np.where(n > t[-1], s[-1] + (n - t[-1]) * slope, out)
        return out

    def call(self, tokens_per_expert: Iterable[float]) -> float:
        """Seconds of one call over experts with these token counts (zeros: not used)."""
        n = np.asarray(tokens_per_expert, dtype=np.float64)
        n = n[n > 0]
        return float(self.call_s + self.expert_s(n).sum()) if n.size else 0.0

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "seconds": list(self.seconds), "call_s": self.call_s}

    @classmethod
    def from_dict(cls, d: Mapping) -> ExpertCost:
        return cls(tuple(d["tokens"]), tuple(d["seconds"]), float(d.get("call_s", 0.0)))


@dataclass(frozen=True)
class Rates:
    """What calibrate() measured on one machine, for experts of shape (H, I).

    `cpu`: the CPU engine's cost per CPU format (keys as str(Format), e.g. "int4-g32");
    `gpu`: the GPU's cost for experts already in its memory, per format: a CPU format (the
    streamed path computes from the packed bytes) or a GPU-resident one ("fp8"). Without CUDA
    `h2d_gbps` is 0, `hbm_gbps` / `gpu_tflops` None and `gpu` empty."""

    shape: tuple[int, int]
    host_read_gbps: float  # the host's read bandwidth with the engine's threads
    stage_gbps: float = 0.0  # copying into a pinned staging buffer with those threads (0: none)
    h2d_gbps: float = 0.0  # pinned host -> GPU (0: no GPU)
    hbm_gbps: float | None = None  # GPU memory, a device-to-device copy's read + write
    gpu_tflops: float | None = None  # a dense bf16 matmul
    gpu_name: str | None = None
    cpu: Mapping[str, ExpertCost] = field(default_factory=dict)
    gpu: Mapping[str, ExpertCost] = field(default_factory=dict)
    threads: int = 0
    machine: str = ""  # one line: CPU, cores, RAM, GPU
    source: str = ""  # where these came from: measured now, the cache file, a given file

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpu", MappingProxyType(dict(self.cpu)))
        object.__setattr__(self, "gpu", MappingProxyType(dict(self.gpu)))

    @property
    def has_gpu(self) -> bool:
        return self.h2d_gbps > 0

    def cpu_cost(self, fmt: str) -> ExpertCost:
        return _cost(self.cpu, "CPU", fmt, self)

    def gpu_cost(self, fmt: str) -> ExpertCost | None:
        """The GPU's cost table for `fmt`, None where it was not measured (or no GPU)."""
        return self.gpu.get(fmt) or self.gpu.get(format_key(fmt))

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            **{k: getattr(self, k) for k in HOST_FIELDS},
            "threads": self.threads,
            "machine": self.machine,
            "source": self.source,
            "cpu": {k: v.to_dict() for k, v in self.cpu.items()},
            "gpu": {k: v.to_dict() for k, v in self.gpu.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Rates:
        host = {k: d.get(k) for k in HOST_FIELDS if d.get(k) is not None}
        return cls(
            shape=tuple(d["shape"]),
            **host,
            cpu={k: ExpertCost.from_dict(v) for k, v in d.get("cpu", {}).items()},
            gpu={k: ExpertCost.from_dict(v) for k, v in d.get("gpu", {}).items()},
            threads=int(d.get("threads", 0)),
            machine=str(d.get("machine", "")),
            source=str(d.get("source", "")),
        )


def _cost(table: Mapping[str, ExpertCost], side: str, fmt: str, rates: Rates) -> ExpertCost:
    if fmt in table:  # (a canonical name: no parsing, no import)
        return table[fmt]
    key = format_key(fmt)
    if key not in table:
        H, I = rates.shape
        have = ", ".join(sorted(table)) or "none"
        raise CalibrationError(
            f"the calibration ({rates.source or 'given rates'}) has no {side} cost for {key} "
            f"experts of {H}x{I} (it has: {have}); `hetero plan --predict --calibration auto` "
            "measures them on this machine"
        )
    return table[key]


def format_key(fmt: str) -> str:
    """A format's canonical name: CPU specs as Format prints them ("int4" -> "int4-g32"),
    GPU-only ones ("fp8") as they are."""
    from hetero.cpu_experts.formats import FORMATS, Format

    return str(Format.parse(fmt)) if fmt.partition("-")[0] in FORMATS else fmt


def table_key(shape: tuple[int, int], side: str, fmt: str) -> str:
    """An expert table's key in the cache: "7168x2048 cpu:int4-g32"."""
    return f"{shape[0]}x{shape[1]} {side}:{format_key(fmt)}"


def fingerprint_key(fingerprint: Mapping) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_path() -> Path:
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "hetero") / CACHE_NAME


def read_cache(path: Path) -> dict:
    """The cache's contents, or an empty cache where the file is missing or unreadable (a
    warning says why; the next calibration rewrites it)."""
    empty = {"version": CACHE_VERSION, "machines": {}}
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return empty
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: not a readable calibration cache (%s); ignoring it", path, e)
        return empty
    ok = isinstance(data, dict) and isinstance(data.get("machines"), dict)
    if not ok or data.get("version") != CACHE_VERSION:
        log.warning("%s: not a version-%d calibration cache; ignoring it", path, CACHE_VERSION)
        return empty
    return data


def write_cache(path: Path, data: dict) -> None:
    """Written whole to a temporary file, then renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def rates_from_entry(
    entry: Mapping, shape: tuple[int, int], cpu_formats: Iterable[str], gpu_formats: Iterable[str]
) -> Rates | None:
    """The cached entry of one machine as Rates for these formats at `shape`, or None where a
    CPU table is missing (GPU tables are only there where CUDA was; a missing one is left out).
    A malformed entry counts as missing."""
    try:
        host = {k: entry["host"][k] for k in HOST_FIELDS if entry["host"].get(k) is not None}
        experts = entry["experts"]
        cpu = {}
        for f in cpu_formats:
            key = table_key(shape, "cpu", f)
            if key not in experts:
                return None
            cpu[format_key(f)] = ExpertCost.from_dict(experts[key])
        gpu = {}
        for f in {*cpu_formats, *gpu_formats}:
            key = table_key(shape, "gpu", f)
            if key in experts:
                gpu[format_key(f)] = ExpertCost.from_dict(experts[key])
        fp = entry["fingerprint"]
        return Rates(
            shape=tuple(shape), **host, cpu=cpu, gpu=gpu, threads=int(fp.get("threads", 0)),
            machine=describe_machine(fp),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        log.warning("a calibration cache entry is malformed (%s); measuring again", e)
        return None


def describe_machine(fp: Mapping) -> str:
    gpus = fp.get("gpus") or []
    gpu = f", {len(gpus)} x {gpus[0]}" if gpus else ", no GPU"
    return (
        f"{fp.get('cpu', '?')}, {fp.get('cores', '?')} cores ({fp.get('threads', '?')} engine "
        f"threads), {fp.get('ram_gib', '?')} GiB RAM{gpu}"
    )


def valid_table(table) -> bool:
    try:
        ExpertCost.from_dict(table)
        return True
    except (KeyError, TypeError, ValueError):
        return False


def cached_rates(
    shape: tuple[int, int],
    cpu_formats: Iterable[str],
    gpu_formats: Iterable[str] = (),
    path: str | Path | None = None,
    threads: int = 0,
) -> Rates | None:
    """This machine's cached rates for these formats, or None: never measures."""
    path = Path(path) if path else default_cache_path()
    fp = machine_fingerprint(engine_threads(threads))
    entry = read_cache(path)["machines"].get(fingerprint_key(fp))
    shape = int(shape[0]), int(shape[1])
    rates = entry and rates_from_entry(entry, shape, cpu_formats, gpu_formats)
    return replace(rates, source=f"cached in {path}") if rates else None


def engine_threads(threads: int = 0) -> int:
    """The CPU engine's thread count for a `cpu_threads` setting, as CPUExperts resolves it."""
    import numba

    from hetero.cpu_experts.jobs import EngineConfig

    return min(EngineConfig(threads=threads).num_threads(), numba.config.NUMBA_NUM_THREADS)


def machine_fingerprint(threads: int) -> dict:
    """What makes measured rates this machine's: CPU, cores, engine threads, RAM, GPUs, the
    libraries and the kernel sources."""
    import numba
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "threads": threads,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "gpus": gpus if torch.cuda.is_available() else [],
        "torch": torch.__version__,
        "numba": numba.__version__,
        "kernels": _sources_digest(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sources_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pattern in TIMED_SOURCES:
        for p in sorted(root.glob(pattern)):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:12]
