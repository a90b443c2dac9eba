"""A checkpoint's `model.safetensors.index.json` without its shards, for planning full-size models.

`hetero plan` reads only config.json and the index's names, so a directory with these two files
stands in for a 700 GB checkpoint in tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hetero.config import ModelConfig
from hetero.testing.checkpoint import _shard_groups
from hetero.testing.weights import is_fp8_linear, tensor_shapes

V3_SHARDS = 163  # DeepSeek-V3/R1 as published: model-00001-of-000163.safetensors ...


def write_v3_index(
    out_dir: str | Path, config: dict[str, Any], *, num_shards: int = V3_SHARDS, mtp: bool = True
) -> Path:
    """config.json + an index naming every tensor of the published layout; returns the directory.

    With a quantization_config the linears are FP8 (1 byte an element) and each has its fp32
    `weight_scale_inv` [ceil(out/128), ceil(in/128)]; other tensors are bf16, the router's
    e_score_correction_bias fp32. mtp=True lists the MTP layers (index >= num_hidden_layers), as
    the published V3 index does. Shards are named as DeepSeek names them (six-digit total).
    """
    c = ModelConfig.from_hf(config, name="write_v3_index config")
    nbytes: dict[str, int] = {}
    for name, shape in tensor_shapes(config, mtp=mtp).items():
        numel = math.prod(shape)
        if c.fp8_block and is_fp8_linear(name, shape):
            nbytes[name] = numel
            bo, bi = c.fp8_block
            nbytes[name + "_scale_inv"] = 4 * -(-shape[0] // bo) * -(-shape[1] // bi)
        else:
            nbytes[name] = numel * (4 if name.endswith("e_score_correction_bias") else 2)
    weight_map: dict[str, str] = {}
    groups = _shard_groups(list(nbytes), nbytes, num_shards)
    for i, names in enumerate(groups):
        weight_map |= dict.fromkeys(names, f"model-{i + 1:05d}-of-{len(groups):06d}.safetensors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return out
