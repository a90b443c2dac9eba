"""Checkpoint loading: sharded safetensors as published, memory-mapped, one layer at a time.

Every tensor the model needs is checked (presence, shape, dtype) from the shard headers before
any weight is read; every error is one line naming the tensor and the file. FP8 weights
(float8_e4m3fn + fp32 `weight_scale_inv` per block) are dequantized as they stream in.
Nothing from the checkpoint is ever executed: only JSON and safetensors are read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from hetero.config import ModelConfig
from hetero.model.fp8 import block_dequantize as dequantize_fp8
from hetero.model.fp8 import block_quantize

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors spelling: F32, BF16, F8_E4M3...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        size = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1}.get(self.dtype, 4)
        n = size
        for s in self.shape:
            n *= s
        return n


class Checkpoint:
    """The tensors of an HF checkpoint directory, read from their shards' headers."""

    def __init__(self, path: str | Path, fp8_block: tuple[int, int] = (128, 128)) -> None:
        self.path = Path(path)
        self.fp8_block = fp8_block
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.tensors: dict[str, TensorInfo] = {}
        for file, names in self._shards().items():
            for name, info in _read_header(file).items():
                if names is not None and name not in names:
                    raise CheckpointError(
                        f"{file}: holds tensor {name!r} that {INDEX} places elsewhere"
                    )
                self.tensors[name] = info
            for name in sorted(set(names or ()) - set(self.tensors)):
                raise CheckpointError(
                    f"{file}: tensor {name!r} listed in {INDEX} is not in the file"
                )

    def _shards(self) -> dict[Path, set[str] | None]:
        index = self.path / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            shards: dict[Path, set[str] | None] = {}
            for name, file in weight_map.items():
                shards.setdefault(self.path / file, set()).add(name)
            return shards
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no {INDEX} and no *.safetensors files")
        return dict.fromkeys(files)

    def load_group(
        self, names: list[str], dtypes: dict[str, torch.dtype]
    ) -> dict[str, torch.Tensor]:
        """Tensors as their `dtypes`, FP8 dequantized; a dtype of float8_e4m3fn keeps (or makes)
        FP8 blocks and adds the name's `weight_scale_inv`. Each shard is opened for this group
        only, so its mapping (and the page cache it pins in our RSS) goes away with the group."""
        wanted = set(names) | {
            n + SCALE_SUFFIX for n in names if self.tensors[n].dtype == FP8_DTYPE
        }
        by_file: dict[Path, list[str]] = {}
        for n in sorted(wanted):
            by_file.setdefault(self.tensors[n].file, []).append(n)
        raw: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with _open(file) as f:
                for n in file_names:
                    raw[n] = _get(f, file, n)
        out = {}
        for n in names:
            t = raw.pop(n)
            fp8_in, fp8_out = self.tensors[n].dtype == FP8_DTYPE, dtypes[n] == torch.float8_e4m3fn
            if fp8_in and fp8_out:
                out[n], out[n + SCALE_SUFFIX] = t, raw.pop(n + SCALE_SUFFIX).float()
            elif fp8_out:
                out[n], out[n + SCALE_SUFFIX] = block_quantize(t, self.fp8_block)
            else:
                if fp8_in:
                    t = dequantize_fp8(t, raw.pop(n + SCALE_SUFFIX), self.fp8_block)
                out[n] = t.to(dtypes[n])
        return out


def _get(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None


def _read_header(file: Path) -> dict[str, TensorInfo]:
    if not file.exists():
        raise CheckpointError(f"{file}: shard named in {INDEX} does not exist")
    with _open(file) as f:
        return {
            name: TensorInfo(
                file, f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())
            )
            for name in f.keys()
        }


class _open:
    """safe_open with errors that name the file (truncated or corrupt shards)."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def __enter__(self):
        try:
            self.handle = safe_open(str(self.file), framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{self.file}: unreadable safetensors shard, truncated or corrupt ({e})"
            ) from None
        return self.handle.__enter__()

    def __exit__(self, *exc) -> None:
        self.handle.__exit__(*exc)


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """What the checkpoint must hold: the model's persistent state, by checkpoint name."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def validate(
    ckpt: Checkpoint,
    config: ModelConfig,
    expected: dict[str, tuple[int, ...]],
    elsewhere: Callable[[str], bool] | None = None,
) -> None:
    """Checks presence, shape and dtype of every expected tensor before anything is read."""
    if config.tie_word_embeddings:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    for name, shape in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing")
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}"
            )
        if info.dtype == FP8_DTYPE:
            _check_fp8(ckpt, name, info)
        elif info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has dtype {info.dtype}, "
                f"expected one of {', '.join(FLOAT_DTYPES)} or {FP8_DTYPE}"
            )
    extra = [
        n
        for n in ckpt.tensors
        if n not in expected
        and not _is_skipped(n, config, expected)
        and not (elsewhere and elsewhere(n.removesuffix(SCALE_SUFFIX)))
    ]
    if extra:
        log.warning(
            "%s: %d tensor(s) not used by the model, e.g. %s", ckpt.path, len(extra), extra[:3]
        )


def _check_fp8(ckpt: Checkpoint, name: str, info: TensorInfo) -> None:
    scale = ckpt.tensors.get(name + SCALE_SUFFIX)
    if scale is None:
        raise CheckpointError(f"{info.file}: FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
    bo, bi = ckpt.fp8_block
    want = (-(-info.shape[0] // bo), -(-info.shape[1] // bi)) if len(info.shape) == 2 else None
    if scale.shape != want:
        raise CheckpointError(
            f"{scale.file}: tensor {name + SCALE_SUFFIX!r} has shape "
            f"{list(scale.shape)}, expected {list(want or ())}"
        )


def _is_skipped(name: str, config: ModelConfig, expected: dict) -> bool:
    """Scales of FP8 weights are consumed with them; MTP layers (index >= num_hidden_layers) are
    for speculative decoding, not run here."""
    if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in expected:
        return True
    m = LAYER_RE.match(name)
    return m is not None and int(m.group(1)) >= config.num_hidden_layers


def groups(names: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Names grouped as they stream: embeddings, each layer in order, then the head."""
    by_group: dict[str, list[str]] = {}
    for name in names:
        m = LAYER_RE.match(name)
        key = (
            f"layer {int(m.group(1)):05d}"
            if m
            else ("head" if not name.startswith("model.embed") else "embed")
        )
        by_group.setdefault(key, []).append(name)
    order = sorted(by_group, key=lambda k: (k != "embed", k == "head", k))
    for key in order:
        yield key, by_group[key]


def load_weights(
    model: torch.nn.Module,
    ckpt: Checkpoint,
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    progress: bool = True,
    elsewhere: Callable[[str], bool] | None = None,
) -> None:
    """Fills a model built on the meta device, group by group, so peak RAM stays near its size.
    `elsewhere(name)`: checkpoint tensors another part loads (e.g. CPU experts), not reported."""
    expected = expected_tensors(model)
    scales = {n for n in expected if n.endswith(SCALE_SUFFIX)}  # of FP8Linear modules
    fp8 = {n.removesuffix(SCALE_SUFFIX) for n in scales}
    expected = {n: s for n, s in expected.items() if n not in scales}  # they come with weights
    validate(ckpt, config, expected, elsewhere)
    names = [n for n in expected if n in ckpt.tensors]
    bar = tqdm(list(groups(names)), desc="loading", unit="layer", disable=not progress)
    for _, group in bar:
        dtypes = {n: _dtype(n, fp8, dtype) for n in group}
        for name, t in ckpt.load_group(group, dtypes).items():
            _assign(model, name, t.to(device))
    if config.tie_word_embeddings and "lm_head.weight" not in ckpt.tensors:
        model.lm_head.weight = model.model.embed_tokens.weight


def _dtype(name: str, fp8: set[str], dtype: torch.dtype) -> torch.dtype:
    if name in fp8:
        return torch.float8_e4m3fn
    return torch.float32 if name.endswith("e_score_correction_bias") else dtype


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)


def load_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attention: str = "absorbed",
    experts: str = "torch",
    progress: bool = True,
):
    """Config + checkpoint -> a ready `Transformer` on `device`, in `dtype`."""
    from hetero.model import Transformer

    config = ModelConfig.from_hf(path)
    ckpt = Checkpoint(path, config.fp8_block or (128, 128))
    with torch.device("meta"):
        model = Transformer(config, attention=attention, experts=experts)
    load_weights(model, ckpt, config, device, dtype, progress)
    model.model.rotary.to_empty(device=device)
    return model.eval()


def read_index(model_dir: str | Path) -> dict | None:
    """The checkpoint's model.safetensors.index.json, or None when it has none."""
    path = Path(model_dir) / INDEX
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors index ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{path}: no weight_map")
    return index


def is_fp8_checkpoint(config: ModelConfig, names: Iterable[str] = ()) -> bool:
    """FP8 weights: a quantization_config, or `weight_scale_inv` among the tensor names."""
    return config.fp8_block is not None or any(n.endswith("weight_scale_inv") for n in names)
