"""Placement: which module runs on which device, in which format — a YAML file made frozen data.

Rules are tried in order against every module name below; the first that matches decides.

    model.embed_tokens, lm_head, model.norm
    model.layers.{i}.self_attn                (with the layer's two RMSNorms)
    model.layers.{i}.mlp                      (a dense layer's MLP)
    model.layers.{i}.mlp.gate                 (an MoE layer's router)
    model.layers.{i}.mlp.shared_experts
    model.layers.{i}.mlp.experts              (the routed experts: the only module the CPU runs)

Every error names the file, the line and the key (`configs/x.yaml:12: rules[2].format: ...`), so
line numbers come from yaml.compose's nodes: yaml.safe_load would lose them. See docs/placement.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from hetero.config import ModelConfig
from hetero.loader import LAYER_RE
from hetero.placement_yaml import (
    DEFAULT_CPU_FORMAT,
    GPU_FORMATS,
    PlacementError,
    Rule,
    default_gpu_format,
    parse_file,
)

# fp8 applies to nn.Linear weights only; these stay in the model dtype whatever their rule says.
DTYPE_ONLY = re.compile(r"^(model\.embed_tokens|lm_head|model\.norm)$|\.mlp\.gate$")
EXPERTS_SUFFIX = ".mlp.experts"
EXPERTS_REGEX = r"\.mlp\.experts$"
DEFAULT_KV_TOKENS = 32768  # what default_placement keeps room for before GPU experts


@dataclass(frozen=True)
class RuntimeSettings:
    cpu_threads: int = 0  # CPU expert threads; 0 = all cores but one
    vram_gb: float | None = None  # GiB of GPU memory to plan for; None = the GPU's total
    ram_gb: float | None = None  # GiB of host RAM; None = this machine's
    kv_cache_tokens: int = 0  # latent KV cache size in tokens; 0 = as many as fit
    kv_page_size: int = 64  # tokens a KV page (the serving engine's pool hands out pages)
    cuda_graph_max_batch: int = 16  # largest decode batch captured in a CUDA graph; 0 = none
    prefill_chunk: int = 2048  # tokens per prefill step
    # long prefill streams CPU experts to the GPU through two slots of staging_gb / 2, on the
    # GPU and pinned in host RAM each (hetero.cpu_experts.staging)
    staging_gb: float = 1.0
    # page-lock the CPU experts in place at load (cudaHostRegister) so the experts the GPU takes
    # (long prefill, and serving steps of 16+ tokens: hetero.sched.hybrid) cross PCIe straight
    # from RAM, no gather into the staging's host slots; None (auto): where CUDA is, if they
    # take at most PIN_AUTO_RAM_SHARE of the RAM budget (`pins_experts`)
    pin_experts: bool | None = None


PIN_AUTO_RAM_SHARE = 0.75  # runtime.pin_experts auto: the most of the RAM budget it locks


def pins_experts(runtime: RuntimeSettings, expert_bytes: int, ram_bytes: int | None = None) -> bool:
    """runtime.pin_experts resolved for CPU experts of `expert_bytes`: as set, or (None: auto)
    when they take at most PIN_AUTO_RAM_SHARE of the RAM budget (`ram_bytes`; default
    runtime.ram_gb, else this machine's). (Whether CUDA is there is the caller's to check.)"""
    if runtime.pin_experts is not None:
        return runtime.pin_experts
    if ram_bytes is None:
        ram_bytes = int(runtime.ram_gb * (1 << 30)) if runtime.ram_gb else machine_ram_bytes()
    return expert_bytes <= PIN_AUTO_RAM_SHARE * ram_bytes


def machine_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class ExpertPlacement:
    """The routed experts of one MoE layer."""

    cpu_format: str  # Format spec, e.g. "int4" (meaningless if all experts are on the GPU)
    gpu_experts: tuple[int, ...]  # sorted expert ids resident on the GPU
    gpu_format: str  # "fp8" | "bf16" | "int4[-gG]" (the CPU's packed int4, kept on the GPU)
    deferred: int  # of a token's k experts, the d lowest-weighted run one layer late

    def cpu_experts(self, num_experts: int) -> tuple[int, ...]:
        gpu = set(self.gpu_experts)
        return tuple(e for e in range(num_experts) if e not in gpu)


@dataclass(frozen=True)
class ExpertProfile:
    """How often each expert was chosen, from a JSON file (see read_profile)."""

    source: str
    layers: Mapping[int, tuple[int, ...]]  # MoE layer -> [n_routed_experts] counts
    tokens: int = 0
    model: str | None = None

    def hottest(self, layer: int, n: int) -> tuple[int, ...]:
        """The n most chosen experts of `layer` (ties: lower id first), sorted by id."""
        counts = self.layers[layer]
        return tuple(sorted(sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:n]))


@dataclass(frozen=True)
class Placement:
    source: str  # the YAML file, or "<default>"
    runtime: RuntimeSettings
    rules: tuple[Rule, ...]  # in order, the extended file's after this one's
    modules: Mapping[str, tuple[str, str]]  # module name -> (device, format)
    routed: Mapping[int, ExpertPlacement]  # MoE layer -> its routed experts
    profile: ExpertProfile | None = None

    def module(self, name: str) -> tuple[str, str]:
        """(device, format) of a module name listed in this file's docstring."""
        if name not in self.modules:
            raise KeyError(
                f"{name!r} is not a module of this model (e.g. {next(iter(self.modules))})"
            )
        return self.modules[name]

    def experts(self, layer: int) -> ExpertPlacement:
        if layer not in self.routed:
            moe = sorted(self.routed)
            where = f"{moe[0]}-{moe[-1]}" if moe else "none"
            raise ValueError(f"layer {layer} has no routed experts (MoE layers: {where})")
        return self.routed[layer]

    @property
    def num_gpu_experts(self) -> int:
        return sum(len(p.gpu_experts) for p in self.routed.values())

    def gpu_formats(self) -> tuple[str, ...]:
        """The GPU formats in use, fp8 first (e.g. to know whether FP8 GEMM kernels are needed)."""
        used = {f for n, (d, f) in self.modules.items() if d == "gpu" and not DTYPE_ONLY.search(n)}
        used |= {p.gpu_format for p in self.routed.values() if p.gpu_experts}
        return tuple(f for f in GPU_FORMATS if f in used) + tuple(sorted(used - {*GPU_FORMATS}))


def module_names(config: ModelConfig) -> tuple[str, ...]:
    """Every module a placement decides, in model order."""
    names = ["model.embed_tokens"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names.append(p + "self_attn")
        if not config.is_moe_layer(i):
            names.append(p + "mlp")
            continue
        names.append(p + "mlp.gate")
        if config.n_shared_experts:
            names.append(p + "mlp.shared_experts")
        names.append(p + "mlp.experts")
    return (*names, "model.norm", "lm_head")


def load_placement(
    path: str | Path, config: ModelConfig, profile: ExpertProfile | dict | str | Path | None = None
) -> Placement:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlacementError(f"{path}:1: (file): cannot read it ({e.strerror})") from None
    return parse_placement(text, config, str(path), profile)


def parse_placement(
    text: str,
    config: ModelConfig,
    source: str = "<string>",
    profile: ExpertProfile | dict | str | Path | None = None,
) -> Placement:
    """`profile` (an ExpertProfile, its JSON dict, or a path) replaces the file's `profile:`."""
    doc = parse_file(text, source, config, ())
    if isinstance(profile, (str, Path)):
        profile = read_profile(profile)
    elif isinstance(profile, dict):
        profile = profile_from_json(profile, "<profile>")
    elif profile is None and doc.profile is not None:
        profile = read_profile(doc.profile)
    if profile is not None:
        _check_profile(profile, config)
    return _resolve(doc.rules, doc.where_rules, doc.runtime, config, source, profile)


def _resolve(rules, where_rules, runtime, config, source, profile) -> Placement:
    modules: dict[str, tuple[str, str]] = {}
    routed: dict[int, ExpertPlacement] = {}
    for name in module_names(config):
        m = LAYER_RE.match(name)
        layer = int(m.group(1)) if m else None
        rule = next((r for r in rules if r.matches(name, layer)), None)
        if rule is None:
            raise PlacementError(
                f"{where_rules}: rules: no rule matches {name} (every module needs one; "
                "end with a catch-all rule such as `- {device: gpu}`)"
            )
        is_experts = name.endswith(EXPERTS_SUFFIX)
        if rule.device == "cpu" and not is_experts:
            raise rule.error(
                "device",
                f"only routed experts may run on the CPU, but this rule also matches {name} "
                f"(match: '{EXPERTS_REGEX}' selects the routed experts alone)",
            )
        fmt = "bf16" if DTYPE_ONLY.search(name) else rule.format
        modules[name] = (rule.device, fmt)
        if is_experts:
            routed[layer] = _experts(rule, layer, config, profile)
    return Placement(
        source=source,
        runtime=RuntimeSettings(**runtime),
        rules=tuple(rules),
        modules=MappingProxyType(modules),
        routed=MappingProxyType(routed),
        profile=profile,
    )


def _experts(rule: Rule, layer: int, config: ModelConfig, profile) -> ExpertPlacement:
    E = config.n_routed_experts
    if rule.device == "gpu":
        return ExpertPlacement(DEFAULT_CPU_FORMAT, tuple(range(E)), rule.format, 0)
    choice = rule.gpu_experts
    if choice.hottest and profile is None:
        raise rule.error(
            "gpu_experts",
            "{hottest: N} needs an expert profile (top-level `profile:` or --profile)",
        )
    if choice.ids is not None:
        ids = choice.ids
    elif profile is not None:
        ids = profile.hottest(layer, choice.count)
    else:
        ids = tuple(range(choice.count))
    return ExpertPlacement(rule.format, tuple(sorted(ids)), rule.gpu_format, rule.deferred)


def read_profile(path: str | Path) -> ExpertProfile:
    """{"model": name, "layers": {"3": [count per expert], ...}, "tokens": N} from a JSON file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise PlacementError(f"{path}: cannot read the expert profile ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise PlacementError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return profile_from_json(data, str(path))


def profile_from_json(data: Any, source: str) -> ExpertProfile:
    def fail(key: str, msg: str) -> PlacementError:
        return PlacementError(f"{source}: {key}: {msg}")

    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise fail("layers", 'expected {"layers": {"3": [count per expert], ...}, ...}')
    layers = {}
    for key, counts in data["layers"].items():
        if not str(key).isdigit():
            raise fail(f"layers.{key}", 'layer keys are layer numbers such as "3"')
        if not isinstance(counts, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
        ):
            raise fail(f"layers.{key}", "expected a list of counts (integers >= 0)")
        layers[int(key)] = tuple(counts)
    tokens = data.get("tokens", 0)
    if not isinstance(tokens, int) or tokens < 0:
        raise fail("tokens", f"expected a token count, got {tokens!r}")
    return ExpertProfile(source, MappingProxyType(layers), tokens, data.get("model"))


def _check_profile(profile: ExpertProfile, config: ModelConfig) -> None:
    E = config.n_routed_experts
    for layer in config.moe_layers:
        counts = profile.layers.get(layer)
        if counts is None:
            raise PlacementError(f"{profile.source}: layers: no counts for MoE layer {layer}")
        if len(counts) != E:
            raise PlacementError(
                f"{profile.source}: layers.{layer}: {len(counts)} counts, but the model has "
                f"{E} routed experts"
            )


def default_placement(
    config: ModelConfig, vram_bytes: int | None = None, fp8_checkpoint: bool = False
) -> Placement:
    """Routed experts on the CPU as int4, everything else on the GPU (fp8 for an FP8 checkpoint,
    else bf16). Given `vram_bytes`, the room left after the GPU weights, the reserve and a KV cache
    of min(32768, max_position_embeddings) tokens keeps the first N experts of every MoE layer on
    the GPU (the same N everywhere; all of them when they all fit)."""
    gpu = default_gpu_format(config, fp8_checkpoint)
    n = 0
    vram_bytes = None if vram_bytes is None else int(vram_bytes)
    if vram_bytes is not None and config.moe_layers:
        from hetero.plan import gpu_expert_bytes, plan_memory

        base = default_placement(config, None, fp8_checkpoint)
        plan = plan_memory(config, base, vram_bytes, ram_bytes=0)
        kv = min(DEFAULT_KV_TOKENS, config.max_position_embeddings) * plan.kv_bytes_per_token
        room = vram_bytes - plan.gpu_fixed_bytes - kv
        per_n = len(config.moe_layers) * gpu_expert_bytes(config, gpu)
        n = min(config.n_routed_experts, max(0, room) // per_n)
    if n == config.n_routed_experts:
        experts = f"{{match: '{EXPERTS_REGEX}', device: gpu, format: {gpu}}}"
    else:
        experts = (
            f"{{match: '{EXPERTS_REGEX}', device: cpu, format: {DEFAULT_CPU_FORMAT}, "
            f"gpu_experts: {n}, gpu_format: {gpu}}}"
        )
    text = f"rules:\n  - {experts}\n  - {{device: gpu, format: {gpu}}}\n"
    return parse_placement(text, config, "<default>")
