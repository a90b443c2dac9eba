"""Reading a placement YAML file into rules, keeping every value's line for error messages.

yaml.compose gives nodes that carry their position (yaml.safe_load would lose it); each value is
built from its node and checked against the model's config, so an error reads
`configs/x.yaml:12: rules[2].format: unknown CPU expert format 'int3' (...)`.
`extends:` is followed here:
the extended file's rules come after this file's, its runtime keys are overridden by this file's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from hetero.config import ModelConfig
from hetero.cpu_experts.formats import Format

GPU_FORMATS = ("fp8", "bf16")
# GPU-resident routed experts may also stay in the CPU's packed int4 (fused_moe_int4, W4A16)
EXPERT_GPU_FORMATS = (*GPU_FORMATS, "int4", "int4-g32", "int4-g64", "int4-g128")
DEVICES = ("gpu", "cpu")
TOP_KEYS = ("rules", "runtime", "profile", "extends")
RULE_KEYS = ("match", "layers", "device", "format", "gpu_experts", "gpu_format", "deferred")
EXPERT_KEYS = ("gpu_experts", "gpu_format", "deferred")
RUNTIME_KEYS = (
    "cpu_threads",
    "vram_gb",
    "ram_gb",
    "kv_cache_tokens",
    "kv_page_size",
    "cuda_graph_max_batch",
    "prefill_chunk",
    "staging_gb",
    "pin_experts",
)
DEFAULT_CPU_FORMAT = "int4"


class PlacementError(ValueError):
    """A placement hetero cannot use; the message starts with `FILE:LINE: KEY: `."""


def default_gpu_format(config: ModelConfig, fp8_checkpoint: bool = False) -> str:
    return "fp8" if fp8_checkpoint or config.fp8_block else "bf16"


@dataclass(frozen=True)
class GpuExperts:
    """A rule's `gpu_experts`: N (the first N; the N hottest given a profile), ids, or hottest."""

    count: int = 0
    ids: tuple[int, ...] | None = None
    hottest: bool = False


@dataclass(frozen=True)
class Rule:
    source: str  # the file that holds it
    index: int  # its position in that file's `rules`
    lines: Mapping[str, int]  # key -> line ("" = the rule's own), for errors found when resolving
    pattern: re.Pattern | None
    layers: frozenset[int] | None  # None = any module; a set = per-layer modules of those layers
    device: str  # gpu | cpu
    format: str  # gpu: fp8 | bf16; cpu: a Format spec
    gpu_experts: GpuExperts = GpuExperts()
    gpu_format: str = "fp8"
    deferred: int = 0

    def matches(self, name: str, layer: int | None) -> bool:
        if self.layers is not None and layer not in self.layers:
            return False
        return self.pattern is None or self.pattern.search(name) is not None

    def error(self, key: str, msg: str) -> PlacementError:
        line = self.lines.get(key, self.lines[""])
        return PlacementError(f"{self.source}:{line}: rules[{self.index}].{key}: {msg}")


@dataclass(frozen=True)
class ParsedFile:
    rules: tuple[Rule, ...]
    runtime: Mapping[str, Any]
    profile: Path | None
    where_rules: str  # "file:line" of `rules`, for "no rule matches ..."


def _line(node: yaml.Node | None) -> int:
    return node.start_mark.line + 1 if node is not None else 1


@dataclass(frozen=True)
class _Doc:
    """One YAML file being read, with typed accessors whose errors carry file, line and key."""

    source: str
    config: ModelConfig

    def error(self, node: yaml.Node | None, key: str, msg: str) -> PlacementError:
        return PlacementError(f"{self.source}:{_line(node)}: {key}: {msg}")

    def value(self, node: yaml.Node, key: str) -> Any:
        try:
            return SafeConstructor().construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise self.error(node, key, f"cannot read this value ({e.problem})") from None

    def fields(self, node: yaml.Node, key: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key or "(file)", f"expected a mapping of {', '.join(allowed)}")
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            name = self.value(k, key)
            where = f"{key}.{name}" if key else str(name)
            if name not in allowed:
                raise self.error(k, where, f"unknown key (valid: {', '.join(allowed)})")
            if name in out:
                raise self.error(k, where, "given twice")
            out[name] = v
        return out

    def int_(self, node: yaml.Node, key: str, lo: int, hi: int | None = None) -> int:
        v = self.value(node, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            want = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise self.error(node, key, f"expected an integer {want}, got {v!r}")
        return v

    def choice(self, node: yaml.Node, key: str, valid: tuple[str, ...], what: str = "") -> str:
        v = self.value(node, key)
        if v not in valid:
            raise self.error(node, key, f"{v!r} is not {what or 'one of'} ({', '.join(valid)})")
        return v


def parse_file(text: str, source: str, config: ModelConfig, chain: tuple[Path, ...]) -> ParsedFile:
    doc = _Doc(source, config)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise PlacementError(f"{source}:{line}: (syntax): {getattr(e, 'problem', e)}") from None
    if root is None:
        raise doc.error(None, "rules", "the file is empty; it needs `rules:` (or `extends:`)")
    top = doc.fields(root, "", TOP_KEYS)
    if "rules" not in top and "extends" not in top:
        raise doc.error(root, "rules", "missing; a placement needs `rules:` (or `extends:`)")
    rules_node = top.get("rules")
    if rules_node is not None and not isinstance(rules_node, yaml.SequenceNode):
        raise doc.error(rules_node, "rules", "expected a list of rules (- match: ...)")
    rules = tuple(_rule(doc, n, i) for i, n in enumerate(rules_node.value if rules_node else ()))
    runtime = _runtime(doc, top["runtime"]) if "runtime" in top else {}
    profile = _relative_file(doc, top["profile"], "profile") if "profile" in top else None
    rules_key = next((k for k, _ in root.value if k.value == "rules"), root)
    where_rules = f"{source}:{_line(rules_key)}"
    if "extends" in top:
        path = _relative_file(doc, top["extends"], "extends")
        if path.resolve() in chain:
            raise doc.error(top["extends"], "extends", f"{path} extends itself (through a cycle)")
        base = parse_file(path.read_text(), str(path), config, (*chain, path.resolve()))
        rules += base.rules
        runtime = {**base.runtime, **runtime}
        profile = profile or base.profile
    return ParsedFile(rules, MappingProxyType(runtime), profile, where_rules)


def _relative_file(doc: _Doc, node: yaml.Node, key: str) -> Path:
    name = doc.value(node, key)
    if not isinstance(name, str) or not name:
        raise doc.error(node, key, f"expected a file path, got {name!r}")
    path = Path(doc.source).parent / name
    if not path.is_file():
        raise doc.error(node, key, f"no such file: {path}")
    return path


def _rule(doc: _Doc, node: yaml.Node, i: int) -> Rule:
    key = f"rules[{i}]"
    f = doc.fields(node, key, RULE_KEYS)
    if "device" not in f:
        raise doc.error(node, f"{key}.device", "missing (gpu or cpu)")
    device = doc.choice(f["device"], f"{key}.device", DEVICES, "a device")
    pattern = None
    if "match" in f:
        regex = doc.value(f["match"], f"{key}.match")
        try:
            pattern = re.compile(str(regex))
        except re.error as e:
            raise doc.error(f["match"], f"{key}.match", f"{regex!r} is not a regex ({e})") from None
    c = doc.config
    rule = Rule(
        source=doc.source,
        index=i,
        lines=MappingProxyType({"": _line(node)} | {k: _line(v) for k, v in f.items()}),
        pattern=pattern,
        layers=_layers(doc, f["layers"], f"{key}.layers") if "layers" in f else None,
        device=device,
        format=DEFAULT_CPU_FORMAT if device == "cpu" else default_gpu_format(c),
        gpu_format=default_gpu_format(c),
    )
    if device == "gpu":
        if "format" in f:
            fmt = doc.choice(f["format"], f"{key}.format", GPU_FORMATS, "a GPU format")
            rule = replace(rule, format=fmt)
        for k in EXPERT_KEYS:
            if k in f:
                msg = "only for experts on the CPU; device: gpu puts all of a layer's experts there"
                raise doc.error(f[k], f"{key}.{k}", msg)
        return rule
    if "format" in f:
        rule = replace(rule, format=_cpu_format(doc, f["format"], f"{key}.format"))
    if "gpu_format" in f:
        where = f"{key}.gpu_format"
        fmt = doc.choice(f["gpu_format"], where, EXPERT_GPU_FORMATS, "a GPU expert format")
        rule = replace(rule, gpu_format=fmt)
    if "gpu_experts" in f:
        rule = replace(rule, gpu_experts=_gpu_experts(doc, f["gpu_experts"], f"{key}.gpu_experts"))
    if "deferred" in f:
        deferred = doc.int_(f["deferred"], f"{key}.deferred", 0)
        if deferred >= c.num_experts_per_tok:
            k = c.num_experts_per_tok
            msg = (
                f"{deferred} must be less than the experts a token uses ({k}, num_experts_per_tok)"
            )
            raise doc.error(f["deferred"], f"{key}.deferred", msg)
        rule = replace(rule, deferred=deferred)
    return rule


def _cpu_format(doc: _Doc, node: yaml.Node, key: str) -> str:
    spec = doc.value(node, key)
    try:
        fmt = Format.parse(str(spec))
    except ValueError as e:
        raise doc.error(node, key, str(e)) from None  # Format lists the valid ones
    c = doc.config
    try:
        fmt.groups(c.hidden_size), fmt.groups(c.moe_intermediate_size)
    except ValueError as e:
        raise doc.error(node, key, f"does not fit this model's experts: {e}") from None
    return fmt.name if fmt == Format.parse(fmt.name) else str(fmt)  # "int4" for int4-g32


def _layers(doc: _Doc, node: yaml.Node, key: str) -> frozenset[int]:
    L = doc.config.num_hidden_layers
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not items:
        raise doc.error(node, key, "an empty list matches nothing")
    layers: set[int] = set()
    for item in items:
        v = doc.value(item, key)
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", v) if isinstance(v, str) else None
        if isinstance(v, int) and not isinstance(v, bool):
            lo = hi = v
        elif m:
            lo, hi = int(m.group(1)), int(m.group(m.lastindex))
        else:
            raise doc.error(
                item, key, f"expected a layer (7), a range ('3-60') or a list of them, got {v!r}"
            )
        if lo > hi:
            raise doc.error(item, key, f"range {v!r} runs backwards")
        if lo < 0 or hi >= L:
            raise doc.error(item, key, f"{v!r} is outside the model (layers 0-{L - 1})")
        layers.update(range(lo, hi + 1))
    return frozenset(layers)


def _gpu_experts(doc: _Doc, node: yaml.Node, key: str) -> GpuExperts:
    E = doc.config.n_routed_experts
    if isinstance(node, yaml.MappingNode):
        return GpuExperts(
            doc.int_(doc.fields(node, key, ("hottest",))["hottest"], f"{key}.hottest", 0, E),
            hottest=True,
        )
    if not isinstance(node, yaml.SequenceNode):
        return GpuExperts(doc.int_(node, key, 0, E))
    ids: list[int] = []
    for item in node.value:
        e = doc.value(item, key)
        if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < E:
            raise doc.error(
                item,
                key,
                f"expert {e!r} does not exist (the model has {E} routed experts, 0-{E - 1})",
            )
        if e in ids:
            raise doc.error(item, key, f"expert {e} is listed twice")
        ids.append(e)
    return GpuExperts(ids=tuple(sorted(ids)))


def _runtime(doc: _Doc, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode) and doc.value(node, "runtime") is None:
        return {}
    out: dict[str, Any] = {}
    for k, v in doc.fields(node, "runtime", RUNTIME_KEYS).items():
        key = f"runtime.{k}"
        if k == "pin_experts":
            flag = doc.value(v, key)
            if not isinstance(flag, bool) and flag != "auto":
                raise doc.error(v, key, f"expected true, false or auto, got {flag!r}")
            out[k] = None if flag == "auto" else flag
        elif k in ("vram_gb", "ram_gb", "staging_gb"):
            gb = doc.value(v, key)
            nullable = k != "staging_gb"
            if (gb is not None or not nullable) and (
                isinstance(gb, bool) or not isinstance(gb, (int, float)) or gb <= 0
            ):
                raise doc.error(v, key, f"expected GiB > 0{' (or null)' * nullable}, got {gb!r}")
            out[k] = None if gb is None else float(gb)
        else:
            out[k] = doc.int_(v, key, 1 if k in ("prefill_chunk", "kv_page_size") else 0)
    return out
