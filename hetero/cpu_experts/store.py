"""The on-disk store of packed routed experts: converted once, then memory-mapped at every start.

Layout of a store directory:
- `layer-{L:03d}.safetensors` per MoE layer L: tensors w13, s13, w2, s2 exactly as
  `PackedExperts` holds them, so loading is a memory map and never quantizes;
- `experts.json`, written last: the format, the sizes, the layers and files, and a fingerprint of
  the checkpoint they came from. A directory without it is not a store, so an interrupted convert
  never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm import tqdm

from hetero.config import ModelConfig
from hetero.cpu_experts.formats import Format, PackedExperts, pack_experts
from hetero.loader import INDEX, Checkpoint, CheckpointError

log = logging.getLogger(__name__)

META = "experts.json"
VERSION = 1
EXPERT_CHUNK = 16  # experts dequantized to fp32 at once: 2.8 GB for DeepSeek-V3, not 45
SAMPLE_BYTES = 1 << 16  # read from each shard for its fingerprint
DTYPES = {"U8": np.uint8, "I8": np.int8, "U16": np.uint16, "F32": np.float32}
Layout = dict[str, tuple[np.dtype, tuple[int, ...]]]


class StoreError(ValueError):
    """An expert store that cannot be written or used; the message names the file."""


def layout(fmt: Format, E: int, H: int, I: int) -> Layout:
    """name -> (dtype, shape) of each array `pack_experts` makes in `fmt` (see formats.py)."""

    def matrix(lead: tuple[int, ...], K: int) -> tuple[tuple, tuple]:
        if fmt.name == "bf16":
            return (np.uint16, (*lead, K)), (np.float32, (*lead, 0))
        if fmt.name == "int8":
            return (np.int8, (*lead, K)), (np.float32, (*lead, fmt.groups(K)))
        return (np.uint8, (*lead, K // 2)), (np.uint16, (*lead, fmt.groups(K)))

    parts = (*matrix((E, I, 2), H), *matrix((E, H), I))  # w13, s13, w2, s2
    return {k: (np.dtype(d), s) for k, (d, s) in zip(("w13", "s13", "w2", "s2"), parts)}


def fingerprint(model_dir: str | Path) -> str:
    """sha256 of config.json, the shard index, each shard's name and size, and 64 KiB from the
    middle of each shard.

    Hashing the weights would read the whole checkpoint (690 GB for DeepSeek-V3) at every start.
    Names and sizes alone cannot tell apart checkpoints of one layout (V3 and R1, or two random
    seeds: same config, same index, same sizes); one sample per shard does, for one read a shard.
    """
    path = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", INDEX):
        if (path / name).exists():
            h.update(name.encode() + b"\0" + (path / name).read_bytes())
    for shard in sorted(path.glob("*.safetensors")):
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            f.seek(max(0, size // 2 - SAMPLE_BYTES // 2))
            sample = f.read(SAMPLE_BYTES)
        h.update(f"{shard.name}\0{size}\0".encode() + sample)
    return h.hexdigest()


def _expert_names(layer: int, e: int) -> list[str]:
    p = f"model.layers.{layer}.mlp.experts.{e}."
    return [p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"]


def pack_layer(
    ckpt: Checkpoint,
    config: ModelConfig,
    layer: int,
    fmt: Format,
    experts: Sequence[int] | None = None,
) -> PackedExperts:
    """The routed experts of MoE layer `layer` (all, or `experts` in that order), packed in `fmt`,
    EXPERT_CHUNK experts at a time into arrays allocated once, so at most one chunk is ever in
    fp32."""
    if not config.is_moe_layer(layer):
        raise StoreError(f"{ckpt.path}: layer {layer} is not a MoE layer ({config.moe_layers})")
    H, I = config.hidden_size, config.moe_intermediate_size
    ids = list(range(config.n_routed_experts) if experts is None else experts)
    E = len(ids)
    for e in ids:
        for name, shape in zip(_expert_names(layer, e), ((I, H), (I, H), (H, I))):
            info = ckpt.tensors.get(name)
            if info is None or info.shape != shape:
                found = f"{info.file}: tensor {name!r} has shape {list(info.shape)}" if info else ""
                raise CheckpointError(
                    f"{found or f'{ckpt.path}: tensor {name!r} is missing'}, expected {list(shape)}"
                )
    out = {k: np.empty(s, d) for k, (d, s) in layout(fmt, E, H, I).items()}
    for e0 in range(0, E, EXPERT_CHUNK):
        chunk = ids[e0 : e0 + EXPERT_CHUNK]
        names = [n for e in chunk for n in _expert_names(layer, e)]
        w = ckpt.load_group(names, dict.fromkeys(names, torch.float32))
        gate, up, down = (
            torch.stack([w[_expert_names(layer, e)[m]] for e in chunk]) for m in range(3)
        )  # [e, I, H], [e, I, H], [e, H, I]
        del w
        part = pack_experts(gate, up, down, fmt)
        for k, a in part.arrays().items():
            dst = out[k][e0 : e0 + len(chunk)]
            if a.shape != dst.shape or a.dtype != dst.dtype:  # layout() and formats.py disagree
                raise RuntimeError(f"{fmt}: {k} packs as {a.dtype}{a.shape}, not {dst.dtype}")
            dst[...] = a
    return PackedExperts(fmt, **out)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise StoreError(f"{path}: cannot write ({e})") from None


def convert(model_dir: str | Path, out_dir: str | Path, fmt: Format, progress: bool = True) -> Path:
    """Packs every MoE layer of the checkpoint at `model_dir` into a store at `out_dir`."""
    model_dir, out = Path(model_dir), Path(out_dir)
    config = ModelConfig.from_hf(model_dir)
    ckpt = Checkpoint(model_dir, config.fp8_block or (128, 128))
    H, I = config.hidden_size, config.moe_intermediate_size
    try:
        layout(fmt, config.n_routed_experts, H, I)
    except ValueError as e:
        raise StoreError(f"{model_dir}: cannot pack its experts as {fmt} ({e})") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / META).unlink(missing_ok=True)  # a store being rewritten is incomplete until done
    except OSError as e:
        raise StoreError(f"{out}: cannot create the store ({e})") from None
    files = {}
    for layer in tqdm(config.moe_layers, desc="converting", unit="layer", disable=not progress):
        arrays = pack_layer(ckpt, config, layer, fmt).arrays()
        path = out / f"layer-{layer:03d}.safetensors"
        _write_atomic(path, lambda tmp, arrays=arrays: save_file(arrays, tmp))
        files[str(layer)] = {"file": path.name, "bytes": path.stat().st_size}
        del arrays  # before packing the next layer: one packed layer in RAM, not two
    meta = {
        "format": str(fmt),
        "hetero_store_version": VERSION,
        "source": {"path": str(model_dir.resolve()), "fingerprint": fingerprint(model_dir)},
        "num_experts": config.n_routed_experts,
        "hidden_size": H,
        "moe_intermediate_size": I,
        "layers": list(config.moe_layers),
        "files": files,
    }
    _write_atomic(out / META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    total = sum(f["bytes"] for f in files.values())
    log.info("%s: %d MoE layers as %s, %.2f GiB", out, len(files), fmt, total / 2**30)
    return out


@dataclass(frozen=True)
class ExpertStore:
    path: Path
    fmt: Format
    num_experts: int
    hidden: int
    inter: int
    files: dict[int, tuple[Path, int]]  # MoE layer -> (its file, the file's size in bytes)
    source: str  # the checkpoint it was converted from
    fingerprint: str  # of that checkpoint, see `fingerprint`

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.files)

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.files.values())

    @classmethod
    def open(
        cls, store_dir: str | Path, config: ModelConfig, model_dir: str | Path | None = None
    ) -> ExpertStore:
        """Checks the store against `config` (and, given `model_dir`, that it was converted from
        that checkpoint) and that every layer file has the size it was written with."""
        store = _read_meta(Path(store_dir))
        meta = store.path / META
        want = {
            "num_experts": (store.num_experts, config.n_routed_experts),
            "hidden_size": (store.hidden, config.hidden_size),
            "moe_intermediate_size": (store.inter, config.moe_intermediate_size),
            "layers": (store.layers, config.moe_layers),
        }
        for key, (have, value) in want.items():
            if have != value:
                raise StoreError(f"{meta}: {key} is {have}, the model's is {value}: another model")
        if model_dir is not None and fingerprint(model_dir) != store.fingerprint:
            raise StoreError(
                f"{meta}: converted from {store.source}, whose files differ from "
                f"{Path(model_dir).resolve()}; convert that checkpoint again"
            )
        for file, size in store.files.values():
            found = file.stat().st_size if file.exists() else None
            if found != size:
                got = "it is missing" if found is None else f"found {found}"
                raise StoreError(f"{file}: expected {size} bytes, {got} (truncated or rewritten)")
        return store

    def layer(self, layer: int) -> PackedExperts:
        """Layer `layer`'s packed experts as read-only memory maps of its file (no copy)."""
        if layer not in self.files:
            raise StoreError(f"{self.path / META}: no MoE layer {layer} (layers {self.layers})")
        file = self.files[layer][0]
        arrays = _map_safetensors(file)
        expected = layout(self.fmt, self.num_experts, self.hidden, self.inter)
        if set(arrays) != set(expected):
            raise StoreError(f"{file}: holds tensors {sorted(arrays)}, not {sorted(expected)}")
        for name, (dtype, shape) in expected.items():
            a = arrays[name]
            if a.dtype != dtype or a.shape != shape:
                raise StoreError(
                    f"{file}: tensor {name!r} is {a.dtype}{list(a.shape)}, "
                    f"but {self.fmt} needs {dtype}{list(shape)}"
                )
        return PackedExperts(self.fmt, **arrays)


def _read_meta(path: Path) -> ExpertStore:
    file = path / META
    if not file.exists():
        raise StoreError(f"{path}: not a hetero expert store (no {META})")
    try:
        meta = json.loads(file.read_text())
        version = meta["hetero_store_version"]
        if version != VERSION:
            raise StoreError(
                f"{file}: store version {version}, hetero reads {VERSION}; convert again"
            )
        files = {int(L): (path / f["file"], int(f["bytes"])) for L, f in meta["files"].items()}
        if any(p.parent != path for p, _ in files.values()):
            raise ValueError("a layer file outside the store")
        if sorted(files) != list(meta["layers"]):
            raise ValueError(f"files {sorted(files)} do not match layers {meta['layers']}")
        return ExpertStore(
            path=path,
            fmt=Format.parse(meta["format"]),
            num_experts=int(meta["num_experts"]),
            hidden=int(meta["hidden_size"]),
            inter=int(meta["moe_intermediate_size"]),
            files=dict(sorted(files.items())),
            source=str(meta["source"]["path"]),
            fingerprint=str(meta["source"]["fingerprint"]),
        )
    except StoreError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"{file}: unreadable store metadata ({type(e).__name__}: {e})") from None


def _map_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Read-only arrays over an mmap of a safetensors file, after checking its header against its
    size; parsed here because safetensors' own loaders copy."""

    def fail(msg: str) -> StoreError:
        return StoreError(f"{file}: {msg}")

    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise fail(f"truncated: {size} bytes cannot hold its {n}-byte header")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            entries = {}
            for name, v in header.items():
                dtype, shape = np.dtype(DTYPES[v["dtype"]]), tuple(int(s) for s in v["shape"])
                start, stop = (int(o) for o in v["data_offsets"])
                size_ok = stop - start == math.prod(shape) * dtype.itemsize
                # unaligned data would be legal for numpy but is never written, and slow in numba
                if not 0 <= start <= stop or not size_ok or (8 + n + start) % dtype.itemsize:
                    raise ValueError(f"tensor {name!r}: offsets {[start, stop]}, shape {shape}")
                entries[name] = (dtype, shape, start)
            end = 8 + n + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise fail(f"corrupt safetensors header ({type(e).__name__}: {e})") from None
        if size != end:
            raise fail(f"{size} bytes, but its header says {end}: truncated or corrupt")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the file handle
    return {
        name: np.frombuffer(buf, dtype, math.prod(shape), 8 + n + start).reshape(shape)
        for name, (dtype, shape, start) in entries.items()
    }
