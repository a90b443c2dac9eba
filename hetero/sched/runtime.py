"""Loads a checkpoint as the placement says: GPU modules on `device`, the routed experts of each
MoE layer split between GPU-resident modules and the CPU engine (packed from the checkpoint, or
memory-mapped from a store written by `hetero convert`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from hetero.config import ModelConfig
from hetero.cpu_experts.engine import CPUExperts, EngineConfig
from hetero.cpu_experts.formats import Format, PackedExperts
from hetero.cpu_experts.staging import (
    GroupStaging,
    HostRegistration,
    own_pages,
    register_host,
    unique_arrays,
)
from hetero.cpu_experts.store import ExpertStore, StoreError, pack_layer
from hetero.gpu.packed_experts import PackedGPUExperts
from hetero.loader import Checkpoint, is_fp8_checkpoint, load_weights
from hetero.model import Transformer
from hetero.model.fp8 import to_fp8
from hetero.placement import (
    ExpertPlacement,
    Placement,
    RuntimeSettings,
    default_placement,
    load_placement,
    parse_placement,
    pins_experts,
)
from hetero.registry import ROUTED_EXPERTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HybridOptions:
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.bfloat16
    attention: str = "auto"  # (triton and flashinfer's decode where it pays: attention._resolve)
    store: str | Path | None = None  # a `hetero convert` store; None: pack at load
    overlap: bool = True  # False: the CPU experts finish before the GPU starts (a baseline)
    gemm_min_tokens: int = EngineConfig.gemm_min_tokens
    gemm_min_tokens_q8: int = EngineConfig.gemm_min_tokens_q8
    gemm_min_tokens_amx: int = EngineConfig.gemm_min_tokens_amx
    amx: bool = EngineConfig.amx
    int8_activations: bool = EngineConfig.int8_activations
    # CUDA: batches this long stream the CPU experts to the GPU instead (0: never; None: by the
    # CPU, `default_stream_min_tokens`)
    stream_min_tokens: int | None = None
    # CUDA: measured rates for the prefill policy (hetero.sched.calibrate): "auto" (this
    # machine's cache, else measured once now), a file, or None (stream_min_tokens decides)
    calibration: str | None = "auto"
    progress: bool = True


def default_stream_min_tokens(tiles: bool) -> int:
    """From how many tokens a V3 layer's CPU experts are faster streamed to the GPU (~0.45 s a
    layer at any length on the H100 machine) than computed on the CPU. Without AMX tiles the
    CPU crossed at ~450 tokens. With them (`tiles`: CPUExperts.uses_amx) it took 0.29-0.41 s
    at 1024 tokens (int4-g32), so the crossover is estimated at ~1500: 2048 tokens were not
    measured (bench/results/2026-11-23-h100x1-cpu_moe.md)."""
    return 1536 if tiles else 512


@dataclass
class Hybrid:
    """The loaded model and the CPU engine it calls; `close()` stops the engine's thread and
    unlocks the experts' pages (runtime.pin_experts)."""

    model: Transformer
    engine: CPUExperts | None
    placement: Placement
    pinned: HostRegistration | None = None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.pinned is not None:
            self.pinned.release()
            self.pinned = None


def load_hybrid(
    path: str | Path, placement: Placement | None = None, options: HybridOptions | None = None
) -> Hybrid:
    opts = options or HybridOptions()
    config = ModelConfig.from_hf(path)
    ckpt = Checkpoint(path, config.fp8_block or (128, 128))
    fp8 = is_fp8_checkpoint(config, ckpt.tensors)
    placement = placement or default_placement(config, fp8_checkpoint=fp8)
    on_gpu = {L: placement.experts(L).gpu_experts for L in config.moe_layers}
    packed_gpu = {L for L in on_gpu if placement.experts(L).gpu_format.startswith("int4")}
    resident = {L: () if L in packed_gpu else on_gpu[L] for L in config.moe_layers}  # modules
    with torch.device("meta"):
        model = Transformer(config, attention=opts.attention, resident=resident)
    to_fp8(model, partial(is_fp8_module, placement), config.fp8_block or (128, 128))
    load_weights(model, ckpt, config, opts.device, opts.dtype, opts.progress, elsewhere=_routed)
    model.model.rotary.to_empty(device=opts.device)
    E = config.n_routed_experts
    cpu_layers = {L: placement.experts(L) for L in config.moe_layers if len(on_gpu[L]) < E}
    gpu_packed = {
        L: PackedGPUExperts(
            pack_layer(ckpt, config, L, Format.parse(placement.experts(L).gpu_format), on_gpu[L]),
            on_gpu[L],
            E,
            opts.device,
        )  # fmt: skip
        for L in tqdm(sorted(packed_gpu), "packing GPU experts", disable=not opts.progress)
        if on_gpu[L]
    }
    engine, cuda, pin = None, torch.device(opts.device).type == "cuda", False
    if cpu_layers:
        packed = _cpu_experts(path, ckpt, config, cpu_layers, opts)
        nbytes = sum(a.nbytes for a in unique_arrays(list(packed.values())))
        pin = cuda and pins_experts(placement.runtime, nbytes)
        if pin:  # the pages to lock hold nothing else
            packed = own_pages(packed)
        engine_config = EngineConfig(
            threads=placement.runtime.cpu_threads,
            gemm_min_tokens=opts.gemm_min_tokens,
            gemm_min_tokens_q8=opts.gemm_min_tokens_q8,
            gemm_min_tokens_amx=opts.gemm_min_tokens_amx,
            amx=opts.amx,
            int8_activations=opts.int8_activations,
        )
        engine = CPUExperts(packed, engine_config)
    staging = rates = pinned = None
    if cpu_layers and cuda:  # long prefill streams
        slot = int(placement.runtime.staging_gb * (1 << 30)) // 2
        pinned = _pin(engine, placement.runtime, nbytes) if pin else None
        staging = GroupStaging(slot, opts.device, direct=pinned is not None)
        rates = _rates(opts, config, {p.cpu_format for p in cpu_layers.values()}, placement)
    for L in config.moe_layers:
        moe = model.model.layers[L].mlp
        if L not in cpu_layers and L in gpu_packed:
            moe.routed = gpu_packed[L]
        if L in cpu_layers:
            moe.routed = ROUTED_EXPERTS.get("hybrid")(
                moe.experts,
                layer=L,
                engine=engine,
                num_experts=E,
                cpu_rows=None if opts.store is not None else cpu_layers[L].cpu_experts(E),
                deferred=cpu_layers[L].deferred,
                overlap=opts.overlap,
                stream_min_tokens=(
                    default_stream_min_tokens(engine.uses_amx(L))
                    if opts.stream_min_tokens is None
                    else opts.stream_min_tokens
                ),
                gpu=gpu_packed.get(L),
                staging=staging,
                rates=rates,
            )
    return Hybrid(model.eval(), engine, placement, pinned)


def _pin(engine: CPUExperts, runtime, nbytes: int) -> HostRegistration | None:
    """Page-locks the engine's experts (`nbytes` of arrays) in place (runtime.pin_experts said
    so: true, or auto and they fit its share of the RAM budget); None where that fails under
    auto, which leaves them as they were, with a warning: long prefill then gathers what it
    streams."""
    log.info("page-locking %.1f GiB of CPU experts (runtime.pin_experts: %s)", nbytes / (1 << 30),
             "auto; false skips it" if runtime.pin_experts is None else "true")  # fmt: skip
    t0 = time.perf_counter()
    try:
        pinned = register_host(list(engine.layers.values()))
    except RuntimeError as e:
        if runtime.pin_experts:
            raise RuntimeError(f"{e}: set runtime.pin_experts: false") from None
        log.warning("%s: continuing without page-locked experts (runtime.pin_experts)", e)
        return None
    log.info("page-locked %.1f GiB of CPU experts in %.1f s (runtime.pin_experts)",
             pinned.nbytes / (1 << 30), time.perf_counter() - t0)  # fmt: skip
    return pinned


def _rates(opts: HybridOptions, config, formats: set[str], placement: Placement):
    """The prefill policy's measured rates, or None (a warning says why) where they cannot be
    had: the fixed stream_min_tokens threshold decides then."""
    if opts.calibration is None:
        return None
    from hetero.sched.calibrate import load_rates
    from hetero.sched.rates import CalibrationError

    try:
        return load_rates(opts.calibration, config, sorted(formats),
                          threads=placement.runtime.cpu_threads)  # fmt: skip
    except (CalibrationError, OSError) as e:
        log.warning("prefill policy without measured rates (%s): the fixed stream_min_tokens "
                    "threshold decides", e)  # fmt: skip
        return None


def is_fp8_module(placement: Placement, name: str) -> bool:
    """Whether the Linear layers directly under module `name` are FP8 by the placement: a GPU
    expert by its layer's gpu_format, anything else by its placement entry (modules that are
    not placement modules hold no Linear of their own)."""
    if ".mlp.experts." in name:
        return placement.experts(int(name.split(".")[2])).gpu_format == "fp8"
    return placement.modules.get(name, ("", ""))[1] == "fp8"


class Loaded(NamedTuple):
    model: Transformer
    close: Callable[[], None]  # stops the CPU engine's thread, if any
    prefill_chunk: int  # tokens a step (the placement's), 0: no limit
    kv_tokens: int  # the KV cache the memory plan leaves room for
    kv_page_size: int
    cpu_engine: CPUExperts | None


def load_for_device(
    path: str | Path,
    placement_file: str | Path | None,
    options: HybridOptions,
    profile: str | Path | None = None,
) -> Loaded:
    """What `hetero generate/chat/serve` load, as `choose_placement` decides, after checking
    the memory plan (before any weight is read)."""
    from hetero.loader import load_model, read_index
    from hetero.plan import budgets, check_fits

    config, index, opts = ModelConfig.from_hf(path), read_index(path), options
    if opts.attention == "flashinfer":  # an optional package: say so before reading anything
        from hetero.gpu.flashinfer_mla import MISSING, available
        from hetero.session import UsageError

        if not available():
            raise UsageError(MISSING)
    given = load_placement(placement_file, config, profile) if placement_file else None
    vram, ram = budgets(given.runtime if given else RuntimeSettings())
    on_gpu = str(opts.device).startswith("cuda")
    vram = vram if on_gpu else ram  # on the CPU the "GPU" side is this host's memory too
    absorb = absorbs(opts.attention, on_gpu)
    placement, plan, hybrid = choose_placement(
        config, index, given, on_gpu, vram, ram, opts.dtype, absorb
    )
    check_fits(plan)
    if opts.progress:  # (the commands that show progress show what they are about to load)
        log.info("memory plan:\n%s", plan.table())
    if not hybrid:
        model = load_model(
            path, device=opts.device, dtype=opts.dtype, attention=opts.attention,
            progress=opts.progress,
        )  # fmt: skip
        _prepare_gpu(model, plan, opts)
        return Loaded(model, lambda: None, 0, plan.kv_tokens, plan.kv_page_size, None)
    loaded = load_hybrid(path, placement, opts)
    _prepare_gpu(loaded.model, plan, opts)
    chunk = placement.runtime.prefill_chunk
    return Loaded(
        loaded.model, loaded.close, chunk, plan.kv_tokens, plan.kv_page_size, loaded.engine
    )


def absorbs(attention: str, on_gpu: bool) -> bool:
    """Whether W_UK / W_UV are worth keeping dense: where the absorbed torch form runs
    ("absorbed"; the kernels' backends off the GPU). On the GPU the kernels read them from
    kv_b_proj's FP8 blocks (hetero.gpu.mla_absorb) as fast as from the copies, which add
    1.9 GiB on V3 and 1 GB to each step's reads (H200, 2026-12-04, V3's GPU side graphed:
    9.91 against 9.99 ms at batch 1, 22.16 against 22.23 at 32 x 4K); "naive" multiplies by
    kv_b_proj itself."""
    return attention == "absorbed" or (not on_gpu and attention != "naive")


def _prepare_gpu(model: Transformer, plan, opts: HybridOptions) -> None:
    """W_UK / W_UV kept dense where the plan made room for them (`absorbs`); the FP8
    matrices that share an input fused (no memory added)."""
    if plan.absorb_mla:
        model.absorb_attention()
    model.fuse_projections()


def choose_placement(
    config, index, given, on_gpu: bool, vram: int, ram: int, dtype, absorb: bool = True
):
    """-> (placement, its memory plan, whether it needs the hybrid runtime); `absorb`: the
    plan's (`absorbs`). A given placement is used as it is. Without one: the whole model on
    the device (the plain model) when that plan fits, else on a GPU the default placement,
    routed experts on the CPU."""
    from hetero.plan import plan_memory

    def plan_for(placement):
        return plan_memory(config, placement, vram, ram, index, dtype=dtype, absorb=absorb)

    if given is not None:
        return given, plan_for(given), True
    whole = parse_placement("rules:\n  - {device: gpu}\n", config, "<all on the device>")
    plan = plan_for(whole)
    if plan.fits or not on_gpu:
        return whole, plan, False
    fp8 = is_fp8_checkpoint(config, (index or {}).get("weight_map", {}))
    placement = default_placement(config, vram, fp8)
    log.info("the model does not fit the GPU whole: default placement, routed experts on the CPU")
    return placement, plan_for(placement), True


def _routed(name: str) -> bool:
    """Routed-expert tensors are the CPU engine's (packed separately), not the model's."""
    return ".mlp.experts." in name


def _cpu_experts(
    path: str | Path,
    ckpt: Checkpoint,
    config: ModelConfig,
    layers: dict[int, ExpertPlacement],
    opts: HybridOptions,
) -> dict[int, PackedExperts]:
    """The CPU experts of each layer in their format: packed at load (only the CPU's, rows in
    expert order), or a store's memory map of all of them (pages of GPU experts never touched)."""
    E = config.n_routed_experts
    if opts.store is not None:
        store = ExpertStore.open(opts.store, config, path)
        out = {}
        for L, p in layers.items():
            spec = p.cpu_format
            out[L] = store.layer(L)
            if out[L].fmt != Format.parse(spec):
                raise StoreError(
                    f"{opts.store}: layer {L} is stored as {out[L].fmt}, the placement asks for "
                    f"{spec} (convert again with --cpu-format {spec})"
                )
        return out
    bar = tqdm(layers.items(), desc="packing experts", unit="layer", disable=not opts.progress)
    return {
        L: pack_layer(ckpt, config, L, Format.parse(p.cpu_format), p.cpu_experts(E)) for L, p in bar
    }
