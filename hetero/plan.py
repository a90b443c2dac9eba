"""Memory plan: bytes per component on the GPU and in host RAM, before any weight is read.

Computed from config.json and, when present, the names in model.safetensors.index.json (MTP
layers, FP8 scales). The byte rules are the loader's, so the plan equals the loaded sizes:
- GPU format bf16: every tensor in the model dtype, except the router's fp32
  e_score_correction_bias;
- GPU format fp8: each nn.Linear weight of self_attn, a dense mlp, the shared experts and the GPU
  experts is float8_e4m3fn (1 byte an element) + a float32 weight_scale_inv
  [ceil(out/128), ceil(in/128)]; embed_tokens, lm_head, the norms and the router stay in dtype;
- routed experts on the CPU: what pack_experts lays out (w13 + s13 + w2 + s2), CPU-resident
  experts only;
- KV cache: MLA's latent, num_layers * (kv_lora_rank + qk_rope_head_dim) values a token;
- absorbed W_UK / W_UV (MLA.absorb), where the attention wants them (runtime.absorbs): kv_b_proj
  dense in dtype a layer where VRAM allows (with the weights, the reserve and the KV cache's
  minimum), else left out and dequantized at every call.
GPU tensor sizes come from the model's own modules built on the meta device (one block of each
kind), so a new parameter in the model shows up here without a second table to keep in step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from hetero.config import ModelConfig
from hetero.cpu_experts.formats import Format
from hetero.gpu import DEQUANT_BYTES
from hetero.loader import LAYER_RE, is_fp8_checkpoint
from hetero.placement import Placement, RuntimeSettings, machine_ram_bytes, pins_experts

GIB = 1 << 30
# CUDA context (~0.5 GiB), cuBLAS/Triton workspaces, one prefill chunk's activations, rotary
# tables, allocator slack.
GPU_RESERVE_BYTES = 3 * GIB // 2
# Python + torch + CUDA's host side, pinned staging buffers, one layer streaming in at load time.
RAM_RESERVE_BYTES = 4 * GIB
KV_ROW, GPU_RESERVE_ROW, RAM_RESERVE_ROW = "KV cache", "GPU reserve", "host reserve"
ABSORBED_ROW = "absorbed W_UK/W_UV"
STAGING_ROW, CPU_EXPERTS_ROW = "prefill staging", "routed experts (CPU)"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class PlanError(ValueError):
    """A placement that does not fit the GPU or the RAM; the message carries the numbers."""


@dataclass(frozen=True)
class Row:
    name: str
    gpu_bytes: int = 0
    ram_bytes: int = 0
    detail: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    model: str  # one line about the model
    placement: str  # the placement's source
    rows: tuple[Row, ...]
    vram_bytes: int  # budgets
    ram_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int  # the KV cache: as many tokens as fit, capped by runtime.kv_cache_tokens
    kv_page_size: int  # tokens a page of the engine's KV pool (kv_tokens is a multiple of it)
    kv_tokens_needed: int  # runtime.kv_cache_tokens, or one prefill chunk when that is 0
    fits: bool
    reasons: tuple[str, ...] = ()  # why it does not fit, with the numbers
    notes: tuple[str, ...] = ()
    absorb_mla: bool = False  # whether the loader keeps W_UK / W_UV dense (MLA.absorb)

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    @property
    def gpu_weight_bytes(self) -> int:
        buffers = (KV_ROW, GPU_RESERVE_ROW, STAGING_ROW)
        return sum(r.gpu_bytes for r in self.rows if r.name not in buffers)

    @property
    def gpu_fixed_bytes(self) -> int:
        """Everything on the GPU but the KV cache."""
        return sum(r.gpu_bytes for r in self.rows if r.name != KV_ROW)

    @property
    def kv_tokens_fit(self) -> int:
        return max(0, self.vram_bytes - self.gpu_fixed_bytes) // self.kv_bytes_per_token

    @property
    def kv_pages(self) -> int:
        return self.kv_tokens // self.kv_page_size

    @property
    def gpu_total(self) -> int:
        return sum(r.gpu_bytes for r in self.rows)

    @property
    def ram_total(self) -> int:
        return sum(r.ram_bytes for r in self.rows)

    def verdict(self) -> str:
        gpu, ram = _gib(self.gpu_total), _gib(self.ram_total)
        head = f"GPU {gpu} of {_gib(self.vram_bytes)} GiB, RAM {ram} of {_gib(self.ram_bytes)} GiB"
        kv = f"KV cache {self.kv_pages} pages x {self.kv_page_size} = {self.kv_tokens} tokens"
        if self.kv_tokens_fit != self.kv_tokens:
            kv += f" ({self.kv_tokens_fit} would fit)"
        if self.fits:
            return f"FITS: {head}, {kv}"
        return f"DOES NOT FIT: {'; '.join(self.reasons)}"

    def table(self) -> str:
        lines = [f"model: {self.model}", f"placement: {self.placement}", ""]
        lines.append(f"{'component':<22} {'detail':<40} {'GPU GiB':>9} {'RAM GiB':>9}")
        for r in self.rows:
            lines.append(f"{r.name:<22} {r.detail:<40} {_cell(r.gpu_bytes)} {_cell(r.ram_bytes)}")
        lines.append("-" * 83)
        lines.append(f"{'total':<63} {_cell(self.gpu_total)} {_cell(self.ram_total)}")
        lines.append(f"{'budget':<63} {_cell(self.vram_bytes)} {_cell(self.ram_bytes)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join([*lines, self.verdict()])

    def to_dict(self) -> dict:
        return asdict(self) | {
            "gpu_total": self.gpu_total,
            "ram_total": self.ram_total,
            "kv_tokens_fit": self.kv_tokens_fit,
            "kv_pages": self.kv_pages,
            "kv_bytes": self.kv_tokens * self.kv_bytes_per_token,
        }


def plan_memory(
    config: ModelConfig,
    placement: Placement,
    vram_bytes: int,
    ram_bytes: int,
    index: dict | None = None,
    kv_dtype_bytes: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    gpu_reserve_bytes: int = GPU_RESERVE_BYTES,
    ram_reserve_bytes: int = RAM_RESERVE_BYTES,
    absorb: bool = True,  # whether the attention that runs wants W_UK / W_UV dense (absorbs)
) -> MemoryPlan:
    from hetero.model.attention import MLA

    vram_bytes, ram_bytes = int(vram_bytes), int(ram_bytes)
    rows, rt = _weight_rows(config, placement, dtype), placement.runtime
    cpu = next(i for i, r in enumerate(rows) if r.name == CPU_EXPERTS_ROW)
    if rows[cpu].ram_bytes and pins_experts(rt, rows[cpu].ram_bytes, ram_bytes):
        rows[cpu] = replace(rows[cpu], detail=rows[cpu].detail + ", page-locked")
    streams = any(len(p.gpu_experts) < config.n_routed_experts for p in placement.routed.values())
    staging = int(rt.staging_gb * GIB) if streams else 0
    staging_gpu = staging + _dequantized(config, placement, staging // 2)
    what = "2 slots for long prefill, pinned" if streams else "no CPU experts"
    if staging_gpu > staging:  # (the column is 42 characters wide)
        what = "2 pinned slots + int4 as bf16 on the GPU" if streams else "int4 as bf16 at prefill"
    rows.append(Row(STAGING_ROW, staging_gpu, staging, what))
    gpu_fixed = sum(r.gpu_bytes for r in rows) + gpu_reserve_bytes
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
    per_token *= kv_dtype_bytes
    needed = rt.kv_cache_tokens or rt.prefill_chunk
    absorbed = config.num_hidden_layers * MLA.absorbed_bytes(config, dtype) * absorb
    absorbed *= gpu_fixed + absorbed + needed * per_token <= vram_bytes  # 0: no room
    off = "no room: off" if absorb else "not needed: the kernels read kv_b_proj"
    detail = f"kv_b_proj dense, {DTYPE_NAMES.get(dtype, dtype)}" if absorbed else off
    rows.append(Row(ABSORBED_ROW, absorbed, 0, detail))
    gpu_fixed += absorbed
    fit = max(0, vram_bytes - gpu_fixed) // per_token
    kv_tokens = min(fit, rt.kv_cache_tokens) if rt.kv_cache_tokens else fit
    ps = rt.kv_page_size
    kv_tokens -= kv_tokens % ps  # whole pages
    detail = f"{kv_tokens // ps} pages x {ps} tok x {per_token / 1024:.1f} KiB"
    rows += [
        Row(KV_ROW, kv_tokens * per_token, 0, detail),
        Row(GPU_RESERVE_ROW, gpu_reserve_bytes, 0, "CUDA context, workspaces, activations"),
        Row(RAM_RESERVE_ROW, 0, ram_reserve_bytes, "Python, torch, pinned buffers"),
    ]
    reasons = []
    if gpu_fixed + needed * per_token > vram_bytes:
        kv = needed * per_token
        reasons.append(
            f"GPU needs {_size(gpu_fixed - gpu_reserve_bytes - staging_gpu)} of weights + "
            f"{_size(staging_gpu)} prefill staging + {_size(gpu_reserve_bytes)} reserve + "
            f"{_size(kv)} KV cache for {needed} tokens = {_size(gpu_fixed + kv)} > "
            f"{_size(vram_bytes)} budget"
        )
    ram_needed = sum(r.ram_bytes for r in rows)
    if ram_needed > ram_bytes:
        experts = ram_needed - ram_reserve_bytes - staging
        reasons.append(
            f"RAM needs {_size(experts)} of CPU experts + {_size(staging)} prefill staging + "
            f"{_size(ram_reserve_bytes)} reserve = {_size(ram_needed)} > {_size(ram_bytes)} budget"
        )
    return MemoryPlan(
        model=_describe(config),
        placement=placement.source,
        rows=tuple(rows),
        vram_bytes=vram_bytes,
        ram_bytes=ram_bytes,
        kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens,
        kv_page_size=ps,
        kv_tokens_needed=needed,
        fits=not reasons,
        reasons=tuple(reasons),
        notes=tuple(_notes(config, placement, index)),
        absorb_mla=absorbed > 0,
    )


def check_fits(plan: MemoryPlan) -> None:
    """Raises PlanError with the numbers when the plan does not fit (before anything loads)."""
    if not plan.fits:
        raise PlanError(
            f"{plan.placement} does not fit: {'; '.join(plan.reasons)} "
            "(`hetero plan` prints the whole table)"
        )


def gpu_expert_bytes(config: ModelConfig, fmt: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """One routed expert on the GPU: gate/up [I, H] and down [H, I] in `fmt` (fp8 | bf16), or
    packed as the CPU packs it (int4-gG)."""
    if fmt.startswith("int4"):
        return cpu_expert_bytes(config, fmt)
    H, I = config.hidden_size, config.moe_intermediate_size
    return sum(
        _tensor_bytes(config, "weight", out * inp, (out, inp), fmt, dtype)
        for out, inp in ((I, H), (I, H), (H, I))
    )


def cpu_expert_bytes(config: ModelConfig, spec: str) -> int:
    """One routed expert as pack_experts lays it out: w13 + s13 + w2 + s2 in Format `spec`."""
    return Format.parse(spec).expert_bytes(config.hidden_size, config.moe_intermediate_size)


def _tensor_bytes(config, name: str, numel: int, linear, fmt: str, dtype) -> int:
    """Bytes of one GPU tensor; `linear` is a Linear weight's (out, in), else None."""
    if name.endswith("e_score_correction_bias"):
        return 4 * numel
    if fmt == "fp8" and linear is not None:
        bo, bi = config.fp8_block or (128, 128)
        return numel + 4 * -(-linear[0] // bo) * -(-linear[1] // bi)
    return numel * dtype.itemsize


def _block_tensors(config: ModelConfig, layer: int) -> list[tuple[str, str, str, int, tuple]]:
    """(row, module, tensor name, numel, Linear (out, in) or None) of one decoder block, built on
    the meta device; routed experts are left out (counted per expert, by placement)."""
    from hetero.model.deepseek import Block
    from hetero.model.layers import RMSNorm

    with torch.device("meta"):
        block = Block(config, layer, "absorbed", "torch", resident=())  # no routed experts
    kinds = {n: type(m) for n, m in block.named_modules()}
    out = []
    for name, t in block.state_dict(keep_vars=True).items():
        module = name.rpartition(".")[0]
        if kinds[module] is RMSNorm:
            row, owner = "norms", "self_attn"  # placed with self_attn, always in dtype
        elif module.startswith("self_attn"):
            row, owner = "attention", "self_attn"
        elif module == "mlp.gate":
            row, owner = "routers", "mlp.gate"
        elif module.startswith("mlp.shared_experts."):
            row, owner = "shared experts", "mlp.shared_experts"
        else:
            row, owner = "dense MLP", "mlp"
        linear = tuple(t.shape) if kinds[module] is nn.Linear else None
        out.append((row, owner, name, t.numel(), linear))
    return out


def _dequantized(config: ModelConfig, placement: Placement, slot: int) -> int:
    """GPU bytes of int4 experts as bf16 at prefill (fused_moe_int4, DEQUANT_BYTES at most): a
    staging slot's CPU experts (2 bytes a weight for 0.5 + 2 / G), or a layer's GPU experts."""
    expert = 3 * config.hidden_size * config.moe_intermediate_size * 2  # bf16
    sizes = [0]
    for p in placement.routed.values():
        fmt = Format.parse(p.cpu_format)
        if slot and fmt.name == "int4":
            sizes.append(int(slot * 2 / (0.5 + 2 / fmt.group_size)))
        if p.gpu_experts and p.gpu_format.startswith("int4"):
            sizes.append(len(p.gpu_experts) * expert)
    return min(max(sizes), DEQUANT_BYTES)


def _weight_rows(config: ModelConfig, placement: Placement, dtype: torch.dtype) -> list[Row]:
    H, V, E = config.hidden_size, config.vocab_size, config.n_routed_experts
    dt = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    gpu: Counter[str] = Counter()
    formats: dict[str, Counter[str]] = {}  # row -> effective format -> layers (or experts)
    kinds: dict[bool, list] = {}
    for i in range(config.num_hidden_layers):
        moe = config.is_moe_layer(i)
        if moe not in kinds:
            kinds[moe] = _block_tensors(config, i)
        seen = set()
        for row, owner, name, numel, linear in kinds[moe]:
            fmt = "bf16" if row == "norms" else placement.module(f"model.layers.{i}.{owner}")[1]
            gpu[row] += _tensor_bytes(config, name, numel, linear, fmt, dtype)
            if row not in seen and row != "norms":
                formats.setdefault(row, Counter())["fp8" if fmt == "fp8" else dt] += 1
                seen.add(row)
    n_gpu, n_cpu, routed_gpu, routed_cpu = Counter(), Counter(), 0, 0
    for p in placement.routed.values():
        n = len(p.gpu_experts)
        routed_gpu += n * gpu_expert_bytes(config, p.gpu_format, dtype)
        routed_cpu += (E - n) * cpu_expert_bytes(config, p.cpu_format) if n < E else 0
        f = p.gpu_format
        n_gpu[dt if f == "bf16" else str(Format.parse(f)) if f.startswith("int4") else f] += n
        n_cpu[p.cpu_format] += E - n
    bias = " (+ fp32 bias)" if config.topk_method == "noaux_tc" else ""
    tied = config.tie_word_embeddings

    def layers(row: str) -> str:
        c = formats.get(row, Counter())
        n = c.total()
        return f"{n} layer{'s' * (n != 1)}, {_tally(c)}" if n else "none"

    return [
        Row("embed_tokens", V * H * dtype.itemsize, 0, f"{V} x {H}, {dt}"),
        Row("attention", gpu["attention"], 0, layers("attention")),
        Row("dense MLP", gpu["dense MLP"], 0, layers("dense MLP")),
        Row("routers", gpu["routers"], 0, layers("routers") + bias),
        Row("shared experts", gpu["shared experts"], 0, layers("shared experts")),
        Row("routed experts (GPU)", routed_gpu, 0, f"{n_gpu.total()} experts, {_tally(n_gpu)}"),
        Row(CPU_EXPERTS_ROW, 0, routed_cpu, f"{n_cpu.total()} experts, {_tally(n_cpu)}"),
        Row("norms", gpu["norms"] + H * dtype.itemsize, 0, f"RMSNorm weights, {dt}"),
        Row("lm_head", 0 if tied else V * H * dtype.itemsize, 0, "tied" if tied else dt),
    ]


def _notes(config: ModelConfig, placement: Placement, index: dict | None) -> list[str]:
    notes = []
    names = (index or {}).get("weight_map", {})
    fp8 = is_fp8_checkpoint(config, names)
    if index is not None:
        L = config.num_hidden_layers
        mtp = sorted({int(m.group(1)) for n in names if (m := LAYER_RE.match(n))} - set(range(L)))
        if mtp:
            notes.append(f"MTP layer(s) {', '.join(map(str, mtp))} in the checkpoint: not loaded")
        size = index.get("metadata", {}).get("total_size")
        on_disk = f", {_gib(size)} GiB" if isinstance(size, int) else ""
        kind = "FP8" if fp8 else "no FP8"
        notes.append(f"checkpoint: {len(set(names.values()))} shards{on_disk}, {kind} weights")
    used = placement.gpu_formats()
    if fp8 and "bf16" in used:
        notes.append("bf16 modules are dequantized from the checkpoint's FP8 at load time")
    if not fp8 and "fp8" in used:
        notes.append("fp8 modules are quantized from the checkpoint's bf16 at load time")
    return notes


def _describe(config: ModelConfig) -> str:
    n_moe = len(config.moe_layers)
    return (
        f"{config.model_type}, {config.num_hidden_layers} layers "
        f"({config.num_hidden_layers - n_moe} dense + {n_moe} MoE), "
        f"{config.n_routed_experts} routed experts top-{config.num_experts_per_tok}, "
        f"{config.num_parameters / 1e9:.1f}B parameters"
    )


def _tally(c: Counter) -> str:
    c = +c  # drop zero counts
    if len(c) == 1:
        return next(iter(c))
    return ", ".join(f"{k} x {n}" for k, n in c.most_common()) or "-"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.2f} MiB"


def _cell(n: int) -> str:
    return f"{_gib(n) if n else '-':>9}"


def budgets(
    runtime: RuntimeSettings, vram_gb: float | None = None, ram_gb: float | None = None
) -> tuple[int | None, int]:
    """(VRAM, RAM) bytes to plan for: the flag, else the placement's runtime setting, else this
    machine's (VRAM: CUDA device 0's, None without CUDA)."""
    vram_gb, ram_gb = vram_gb or runtime.vram_gb, ram_gb or runtime.ram_gb
    vram = int(vram_gb * GIB) if vram_gb else cuda_vram_bytes()
    return vram, int(ram_gb * GIB) if ram_gb else machine_ram_bytes()


def cuda_vram_bytes() -> int | None:
    """CUDA device 0's total memory, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory
