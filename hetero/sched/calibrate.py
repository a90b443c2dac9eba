"""Measures the rates the prefill policy and `hetero plan --predict` run on, once per machine:
the host's read bandwidth and the staging gather (staging.gather_rows) with the CPU engine's
threads; pinned H2D, HBM and a dense matmul's rate where CUDA is; and, per expert format at the
model's (H, I), what one expert costs at n tokens, on the CPU through the real engine
(CPUExperts.forward: the ring for decode sizes, the GEMV / AMX / GEMM policy above) and on the
GPU through the kernels the runtime calls (streaming.group_experts for a CPU format,
`fused_moe_fp8` for FP8 GPU experts).

Experts are random bytes in the packed layout, drawn in turn from a pool larger than 3x the L3
(1 GiB at least) so that every call reads its weights from RAM, as serving does. No weight of
any checkpoint is read. Results are cached (sched/rates.py) per machine fingerprint and per
(H, I, format); `calibrate` measures only what the cache lacks.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hetero.sched.rates import (
    CACHE_VERSION,
    CalibrationError,
    ExpertCost,
    Rates,
    cached_rates,
    default_cache_path,
    engine_threads,
    fingerprint_key,
    machine_fingerprint,
    rates_from_entry,
    read_cache,
    table_key,
    valid_table,
    write_cache,
)

__all__ = ["CalibrationSize", "ExpertCost", "Rates", "calibrate", "cached_rates", "load_rates"]
log = logging.getLogger(__name__)
GIB = 1 << 30
PARTS = ("fingerprint", "host", "experts")  # of a machine's cache entry


@dataclass(frozen=True)
class CalibrationSize:
    """How much to measure. The default takes ~10-30 s a format on a 16-core host; `quick()`
    fewer points; tests pass small pools and times."""

    tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 256)  # tokens an expert, table points
    experts_a_call: int = 8  # experts of one timed call (a decode layer's k)
    pool_bytes: int = 0  # the experts drawn from; 0: max(1 GiB, 3 x L3), at most RAM / 8
    probe_bytes: int = 0  # the read and copy probes' arrays; 0: as the pool
    min_time_s: float = 0.25  # timed calls of a point add up to at least this
    max_calls: int = 40
    h2d_bytes: int = 256 << 20
    matmul: int = 8192  # the GPU's bf16 matmul probe, n x n x n

    @classmethod
    def quick(cls) -> CalibrationSize:
        return cls(tokens=(1, 4, 16, 64, 256), min_time_s=0.1, max_calls=20)


def expert_shape(config) -> tuple[int, int]:
    """(H, I) of a ModelConfig's routed experts, or an (H, I) pair as it is."""
    if isinstance(config, tuple):
        return int(config[0]), int(config[1])
    return config.hidden_size, config.moe_intermediate_size


def calibrate(
    shape,
    cpu_formats: Iterable[str] = ("int4",),
    gpu_formats: Iterable[str] = (),
    *,
    quick: bool = False,
    size: CalibrationSize | None = None,
    cache: bool | str | Path = True,
    threads: int = 0,
    fingerprint: dict | None = None,
) -> Rates:
    """Rates of this machine for experts of `shape` ((H, I) or a ModelConfig) in these CPU
    formats (and, where CUDA is, these GPU-resident formats), from the cache where it has them
    (`cache`: True = the default file, a path, or False = none), else measured now and cached.
    `threads`: the engine's (0: all cores but one, as EngineConfig)."""
    shape, cpu_formats, gpu_formats = expert_shape(shape), tuple(cpu_formats), tuple(gpu_formats)
    size = size or (CalibrationSize.quick() if quick else CalibrationSize())
    threads = engine_threads(threads)
    fp = fingerprint or machine_fingerprint(threads)
    path = default_cache_path() if cache is True else Path(cache) if cache else None
    data = read_cache(path) if path else {"version": CACHE_VERSION, "machines": {}}
    key = fingerprint_key(fp)
    entry = data["machines"].get(key)
    if not (isinstance(entry, dict) and all(isinstance(entry.get(k), dict) for k in PARTS)):
        entry = {"fingerprint": fp, "host": {}, "experts": {}}
    changed, cuda = False, _cuda()
    if "host_read_gbps" not in entry["host"]:
        log.info("calibrating this machine's bandwidths (%d threads)", threads)
        entry["host"], changed = _host_rates(size, threads, cuda), True
    experts = entry["experts"]
    for f in cpu_formats:
        if not valid_table(experts.get(table_key(shape, "cpu", f))):
            log.info("calibrating CPU experts: %s at %dx%d", f, *shape)
            experts[table_key(shape, "cpu", f)] = _cpu_table(shape, f, size, threads).to_dict()
            changed = True
    for f in dict.fromkeys((*cpu_formats, *gpu_formats)) if cuda else ():
        if not valid_table(experts.get(table_key(shape, "gpu", f))):
            table = _gpu_table(shape, f, size)
            if table is not None:
                log.info("calibrated GPU experts: %s at %dx%d", f, *shape)
                experts[table_key(shape, "gpu", f)], changed = table.to_dict(), True
    if changed and path is not None:
        data["machines"][key] = entry
        write_cache(path, data)
    rates = rates_from_entry(entry, shape, cpu_formats, gpu_formats)
    if rates is None:
        raise CalibrationError(f"{path}: this machine's entry is unusable; delete the file")
    where = f"cached in {path}" if path else "not cached"
    return replace(rates, source=f"measured now, {where}" if changed else where)


def load_rates(
    spec: str, shape, cpu_formats: Iterable[str], gpu_formats: Iterable[str] = (), threads: int = 0
) -> Rates:
    """`--calibration auto`: this machine's cached rates, else measured now (a log line says
    so). A FILE: a calibration cache (this machine's entry, else its only machine's) or one
    Rates as JSON (Rates.to_dict), e.g. copied from the GPU machine."""
    shape, cpu_formats, gpu_formats = expert_shape(shape), tuple(cpu_formats), tuple(gpu_formats)
    if spec == "auto":
        rates = cached_rates(shape, cpu_formats, gpu_formats, threads=threads)
        if rates is not None:
            log.info("calibration: %s", rates.source)
            return rates
        log.info(
            "no calibration of this machine for %s experts of %dx%d: measuring now (once; "
            "cached in %s)", ", ".join(cpu_formats) or "no CPU", *shape, default_cache_path(),
        )  # fmt: skip
        return calibrate(shape, cpu_formats, gpu_formats, threads=threads)
    import json

    try:
        data = json.loads(Path(spec).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(f"--calibration {spec}: not a readable JSON file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("machines"), dict):
        return _from_cache_file(spec, data, shape, cpu_formats, gpu_formats, threads)
    try:
        rates = Rates.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"--calibration {spec}: not a calibration ({e})") from None
    if tuple(rates.shape) != shape:
        raise CalibrationError(
            f"--calibration {spec}: measured on {rates.shape[0]}x{rates.shape[1]} experts, the "
            f"model's are {shape[0]}x{shape[1]}"
        )
    for f in cpu_formats:
        rates.cpu_cost(f)  # (raises, naming what is there)
    return replace(rates, source=spec)


def _from_cache_file(spec, data, shape, cpu_formats, gpu_formats, threads) -> Rates:
    machines = data["machines"]
    own = machines.get(fingerprint_key(machine_fingerprint(engine_threads(threads))))
    entries = [own] if own else list(machines.values())
    found = [r for e in entries if (r := rates_from_entry(e, shape, cpu_formats, gpu_formats))]
    if len(found) != 1:
        what = f"{', '.join(cpu_formats)} experts of {shape[0]}x{shape[1]}"
        many = "; ".join(r.machine for r in found)
        raise CalibrationError(
            f"--calibration {spec}: {len(found)} machines have {what}"
            + (f" ({many}): keep one" if found else "")
        )
    return replace(found[0], source=spec)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _l3_bytes() -> int:
    """The host's total L3 (each distinct cache once), or 64 MiB where sysfs does not say."""
    units, seen = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}, {}
    for d in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (d / "level").read_text().strip() != "3":
                continue
            size = (d / "size").read_text().strip()  # e.g. "32768K"
            n = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
            seen[(d / "shared_cpu_list").read_text().strip()] = n
        except (OSError, ValueError):
            continue
    return sum(seen.values()) or 64 << 20


def _pool_bytes(size: CalibrationSize) -> int:
    if size.pool_bytes:
        return size.pool_bytes
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(max(GIB, 3 * _l3_bytes()), ram // 8)


def _best(fn: Callable[[], float], n: int) -> float:
    fn()  # (warm-up)
    return min(fn() for _ in range(n))


def _host_rates(size: CalibrationSize, threads: int, cuda: bool) -> dict:
    import numba
    import torch

    from hetero.cpu_experts.staging import gather_rows

    nbytes = size.probe_bytes or _pool_bytes(size)
    src = np.full(nbytes // 4, 1.0, np.float32)  # (written: every page is real)
    row = min(8 << 20, nbytes)  # the gather's rows: expert-sized, in a shuffled order
    rows = np.random.default_rng(0).permutation(nbytes // row)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).numpy()
    saved = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    try:
        t = torch.from_numpy(src)
        read = _best(lambda: _seconds(lambda: t.sum()), 5)
        u8 = src.view(np.uint8)[: rows.size * row].reshape(rows.size, row)
        out8 = dst[: u8.size].reshape(u8.shape)
        copy = _best(lambda: _seconds(lambda: gather_rows(u8, rows, out8)), 3)
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])
    out = {"host_read_gbps": src.nbytes / read / 1e9, "stage_gbps": u8.nbytes / copy / 1e9}
    if not cuda:
        return out | {"h2d_gbps": 0.0}
    dev = torch.device("cuda")
    host = torch.empty(size.h2d_bytes, dtype=torch.uint8, pin_memory=True)
    a = torch.empty(GIB // 2, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    m = torch.randn(size.matmul, size.matmul, device=dev, dtype=torch.bfloat16)
    h2d = _best(lambda: _cuda_seconds(lambda: host.to(dev, non_blocking=True)), 5)
    hbm = _best(lambda: _cuda_seconds(lambda: b.copy_(a)), 5)
    mm = _best(lambda: _cuda_seconds(lambda: m @ m), 3)
    return out | {
        "h2d_gbps": host.nbytes / h2d / 1e9,
        "hbm_gbps": 2 * a.nbytes / hbm / 1e9,
        "gpu_tflops": 2 * size.matmul**3 / mm / 1e12,
        "gpu_name": torch.cuda.get_device_name(0),
    }


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cuda_seconds(fn: Callable[[], object], device="cuda") -> float:
    """fn's seconds on `device`, its queued work included (CUDA: synchronized around it)."""
    import torch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _table(run: Callable[[int, int], float], size: CalibrationSize) -> ExpertCost:
    """run(n, m): seconds of one call of m experts at n tokens each -> the cost table. A call's
    fixed cost comes from 1 against M experts at 1 token; the rest is per expert."""
    M = size.experts_a_call

    def median(n: int, m: int) -> float:
        run(n, m)  # (a first call at a new size compiles, allocates, fills caches)
        times, spent = [], 0.0
        while len(times) < 3 or (spent < size.min_time_s and len(times) < size.max_calls):
            times.append(run(n, m))
            spent += times[-1]
        return float(np.median(times))

    one, many = median(1, 1), median(1, M)
    per = (many - one) / (M - 1) if M > 1 else many
    call_s = max(0.0, one - per) if per > 0 else 0.0
    seconds = [max(0.0, ((many if n == 1 else median(n, M)) - call_s) / M) for n in size.tokens]
    return ExpertCost(tuple(float(n) for n in size.tokens), tuple(seconds), call_s)


def _cpu_table(shape, fmt: str, size: CalibrationSize, threads: int) -> ExpertCost:
    import torch

    from hetero.cpu_experts.engine import CPUExperts
    from hetero.cpu_experts.formats import Format
    from hetero.cpu_experts.jobs import EngineConfig

    (H, I), f = shape, Format.parse(fmt)
    E = max(4 * size.experts_a_call, math.ceil(_pool_bytes(size) / f.expert_bytes(H, I)))
    engine = CPUExperts({0: random_layer(f, H, I, E)}, EngineConfig(threads=threads))
    gen, turn = torch.Generator().manual_seed(0), [0]

    def run(n: int, m: int) -> float:
        ids = (turn[0] + torch.arange(m)) % E  # the next experts of the pool, for every token
        turn[0] += m
        x, ids = torch.randn(n, H, generator=gen), ids.repeat(n, 1)  # [n, H], [n, m]
        w = torch.full((n, m), 1.0 / m)
        return _seconds(lambda: engine.forward(0, x, ids, w))

    try:
        return _table(run, size)
    finally:
        engine.close()


def _gpu_table(shape, fmt: str, size: CalibrationSize, device="cuda") -> ExpertCost | None:
    """The GPU's cost for experts of `fmt` in its memory: a CPU format as streamed prefill
    computes a staged group (streaming.group_experts: fused int4 / int8, else dequantized),
    "fp8" through fused_moe_fp8; None for other GPU formats (the prediction then falls back to
    bytes and FLOPs). (`device` "cpu": the same calls on the host, for tests.)"""
    import torch

    from hetero.cpu_experts.formats import FORMATS, Format, as_tensor

    (H, I), M, dev = shape, 2 * size.experts_a_call, torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    if fmt == "fp8":
        from hetero.gpu.fused_moe import fused_moe_fp8

        e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16
        w13 = (torch.randn(M, 2 * I, H, device=dev, dtype=bf16, generator=gen) * 0.05).to(e4m3)
        w2 = (torch.randn(M, H, I, device=dev, dtype=bf16, generator=gen) * 0.05).to(e4m3)
        s13 = torch.ones(M, -(-2 * I // 128), -(-H // 128), device=dev)
        s2 = torch.ones(M, -(-H // 128), -(-I // 128), device=dev)
        local = torch.arange(M, dtype=torch.int32, device=dev)
        fn = lambda x, ids, w: fused_moe_fp8(x, ids, w, local, w13, s13, w2, s2)  # noqa: E731
    elif fmt.partition("-")[0] in FORMATS:
        from hetero.sched.streaming import group_experts

        layer = random_layer(Format.parse(fmt), H, I, M)
        arrays = [as_tensor(a).to(dev) for a in layer.arrays().values()]
        local = torch.arange(M, dtype=torch.int32, device=dev)
        fn = lambda x, ids, w: group_experts(layer, x, ids, w, local, arrays)  # noqa: E731
    else:
        return None

    def run(n: int, m: int) -> float:
        x = torch.randn(n, H, device=dev, dtype=torch.bfloat16, generator=gen)
        ids = torch.randperm(M, device=dev, generator=gen)[:m].repeat(n, 1)
        w = torch.full((n, m), 1.0 / m, device=dev)
        return _cuda_seconds(lambda: fn(x, ids, w), dev)

    return _table(run, size)


def random_layer(fmt, H: int, I: int, E: int, seed: int = 0):
    """A PackedExperts of E random experts (any bytes; bf16 weights and all scales finite and
    small), filled a few MB of random bytes at a time: fast, and every page is written."""
    from hetero.cpu_experts.formats import PackedExperts

    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, 4 << 20, dtype=np.uint8)
    if fmt.name == "bf16":
        block = ((block.view(np.uint16) & 0x80FF) | 0x3B80).view(np.uint8)  # |w| ~ 2^-8

    def filled(shape, dtype) -> np.ndarray:
        a = np.empty(shape, dtype)
        flat = a.reshape(-1).view(np.uint8)
        for i in range(0, flat.size, block.size):
            flat[i : i + block.size] = block[: flat.size - i]
        return a

    if fmt.name == "bf16":
        w13, w2 = filled((E, I, 2, H), np.uint16), filled((E, H, I), np.uint16)
        return PackedExperts(fmt, w13, np.zeros((E, I, 2, 0), np.float32), w2,
                             np.zeros((E, H, 0), np.float32))  # fmt: skip
    int8 = fmt.name == "int8"
    w13 = filled((E, I, 2, H if int8 else H // 2), np.int8 if int8 else np.uint8)
    w2 = filled((E, H, I if int8 else I // 2), np.int8 if int8 else np.uint8)
    scale, dtype = (1e-4, np.float32) if int8 else (0x3A80, np.uint16)  # (bf16 bits: ~1e-3)
    s13 = np.full((E, I, 2, fmt.groups(H)), scale, dtype)
    s2 = np.full((E, H, fmt.groups(I)), scale, dtype)
    return PackedExperts(fmt, w13, s13, w2, s2)
