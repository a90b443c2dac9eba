"""Write a random checkpoint directory laid out exactly like a published HF DeepSeek one.

config.json, generation_config.json, `model-0000i-of-0000N.safetensors` shards in layer order,
model.safetensors.index.json, and (optionally) a trained tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hetero.config import ModelConfig
from hetero.testing.configs import fp8_quantization_config, tiny_v2_config, tiny_v3_config
from hetero.testing.tokenizer import BOS_ID, EOS_ID, write_tokenizer
from hetero.testing.weights import fp8_block_quantize, is_fp8_linear, random_state_dict

DTYPES = ("bf16", "fp32", "fp8")


def write_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    dtype: str = "bf16",
    num_shards: int = 2,
    mtp: bool = True,
    tokenizer: bool = True,
) -> Path:
    """Random weights for `config` in `dtype` ("bf16" | "fp32" | "fp8"); returns the directory.

    The written config.json follows the files: "fp8" adds a quantization_config if missing,
    "bf16"/"fp32" drop it, and torch_dtype names the non-FP8 dtype. mtp=False leaves the MTP
    layers off disk but keeps num_nextn_predict_layers, like a checkpoint stripped of them.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = _config_for(config, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _stored_tensors(config, seed=seed, dtype=dtype, mtp=mtp)
    _write_shards(out, tensors, num_shards)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer:
        if (bos, eos) != (BOS_ID, EOS_ID):
            raise ValueError(f"config bos/eos ids must be the tokenizer's ({BOS_ID}, {EOS_ID})")
        write_tokenizer(
            out, config["vocab_size"], model_max_length=config["max_position_embeddings"]
        )
    return out


def write_tiny_v3(
    out_dir: str | Path, *, seed: int = 0, num_shards: int = 2, **config_overrides: Any
) -> Path:
    """tiny_v3_config in FP8 with its MTP layer on disk, as DeepSeek-V3 is published."""
    config = tiny_v3_config(**config_overrides)
    return write_checkpoint(
        out_dir, config, seed=seed, dtype="fp8", num_shards=num_shards, mtp=True
    )


def write_tiny_v2(
    out_dir: str | Path, *, seed: int = 0, num_shards: int = 2, **config_overrides: Any
) -> Path:
    """tiny_v2_config in BF16, as DeepSeek-V2-Lite is published."""
    config = tiny_v2_config(**config_overrides)
    return write_checkpoint(
        out_dir, config, seed=seed, dtype="bf16", num_shards=num_shards, mtp=False
    )


def _config_for(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    config = dict(config)
    if dtype == "fp8":
        config.setdefault("quantization_config", fp8_quantization_config())
    else:
        config.pop("quantization_config", None)
    config["torch_dtype"] = "float32" if dtype == "fp32" else "bfloat16"
    ModelConfig.from_hf(config, name="write_checkpoint config")
    return config


def _stored_tensors(
    config: dict[str, Any], *, seed: int, dtype: str, mtp: bool
) -> dict[str, torch.Tensor]:
    """The tensors as the files hold them: FP8 linears followed by their weight_scale_inv."""
    block = ModelConfig.from_hf(config).fp8_block
    plain = torch.float32 if dtype == "fp32" else torch.bfloat16
    stored: dict[str, torch.Tensor] = {}
    for name, w in random_state_dict(config, seed=seed, mtp=mtp).items():
        if name.endswith("e_score_correction_bias"):  # fp32 in every published file
            stored[name] = w
        elif dtype == "fp8" and is_fp8_linear(name, tuple(w.shape)):
            stored[name], stored[name + "_scale_inv"] = fp8_block_quantize(w, block)
        else:
            stored[name] = w.to(plain)
    return stored


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    groups = _shard_groups(list(tensors), {k: _nbytes(v) for k, v in tensors.items()}, num_shards)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, str(out / file), metadata={"format": "pt"})
        weight_map |= {k: file for k in names}
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _shard_groups(names: list[str], nbytes: dict[str, int], num_shards: int) -> list[list[str]]:
    """Consecutive runs of names of about equal bytes; a weight_scale_inv stays with its weight."""
    units: list[list[str]] = []
    for name in names:
        if (
            name.endswith("_scale_inv")
            and units
            and units[-1][-1] == name.removesuffix("_scale_inv")
        ):
            units[-1].append(name)
        else:
            units.append([name])
    if not 1 <= num_shards <= len(units):
        raise ValueError(f"num_shards={num_shards} must be in 1..{len(units)}")
    total = sum(nbytes.values())
    groups: list[list[str]] = [[]]
    done = 0  # bytes in closed groups and the open one
    for j, unit in enumerate(units):
        shards_left = num_shards - len(groups)
        full = done >= total * len(groups) / num_shards
        if groups[-1] and shards_left and (full or len(units) - j == shards_left):
            groups.append([])
        groups[-1] += unit
        done += sum(nbytes[k] for k in unit)
    return groups


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
