from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetero.config import ConfigError
from hetero.loader import Checkpoint, CheckpointError, dequantize_fp8, load_model
from hetero.testing import fp8_block_quantize, write_tiny_v2

LAYER_TENSOR = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture
def broken(tiny_v2, tmp_path):
    """A private copy of the V2 fixture to damage, and the shard holding LAYER_TENSOR."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_v2, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, path / index["weight_map"][LAYER_TENSOR], index


def rewrite_shard(shard, change):
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def one_line_error(path, *needles):
    with pytest.raises((CheckpointError, ConfigError)) as e:
        load_model(path, dtype=torch.float32, progress=False)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message


def test_missing_tensor_names_it(broken):
    path, shard, index = broken
    rewrite_shard(shard, lambda t: t.pop(LAYER_TENSOR))
    del index["weight_map"][LAYER_TENSOR]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(path, LAYER_TENSOR, "missing")


def test_tensor_in_index_but_not_in_shard(broken):
    path, shard, _ = broken
    rewrite_shard(shard, lambda t: t.pop(LAYER_TENSOR))
    one_line_error(path, LAYER_TENSOR, shard.name)


def test_wrong_shape_names_tensor_file_and_shapes(broken):
    path, shard, _ = broken

    def shrink(t):
        t[LAYER_TENSOR] = t[LAYER_TENSOR][:, :-1].contiguous()

    rewrite_shard(shard, shrink)
    one_line_error(path, LAYER_TENSOR, shard.name, "[96, 191]", "[96, 192]")


def test_wrong_dtype(broken):
    path, shard, _ = broken
    rewrite_shard(shard, lambda t: t.update({LAYER_TENSOR: t[LAYER_TENSOR].to(torch.int32)}))
    one_line_error(path, LAYER_TENSOR, "I32")


def test_truncated_shard_names_file(broken):
    path, shard, _ = broken
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    one_line_error(path, shard.name, "truncated")


def test_missing_shard_file(broken):
    path, shard, _ = broken
    shard.unlink()
    one_line_error(path, shard.name, "does not exist")


def test_unsupported_model_type(broken):
    path, _, _ = broken
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mixtral"
    (path / "config.json").write_text(json.dumps(config))
    one_line_error(path, "config.json", "mixtral")


def test_fp8_missing_scale(tiny_v3, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_v3, path)
    name = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    rewrite_shard(path / index["weight_map"].pop(name), lambda t: t.pop(name))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(path, name.removesuffix("_scale_inv"), "weight_scale_inv")


@pytest.mark.parametrize("shape", [(192, 192), (320, 192), (96, 300), (576, 512)])
def test_fp8_dequantize_partial_edge_blocks(shape):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    q, scale = fp8_block_quantize(w)
    ours = dequantize_fp8(q, scale, (128, 128))
    # against an explicit loop over blocks, partial ones included
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            torch.testing.assert_close(ours[blk], q[blk].float() * scale[i, j], rtol=0, atol=0)


def test_mtp_layer_is_skipped_silently(tiny_v3, caplog):
    assert any(".layers.3." in n for n in Checkpoint(tiny_v3).tensors)  # MTP on disk
    with caplog.at_level(logging.WARNING):
        model = load_model(tiny_v3, dtype=torch.float32, progress=False)
    assert len(model.model.layers) == 3 and not caplog.records


def test_single_file_checkpoint_without_index(tmp_path):
    path = write_tiny_v2(tmp_path / "one", num_shards=1)
    (path / "model.safetensors.index.json").unlink()
    shard = next(path.glob("*.safetensors"))
    shard.rename(path / "model.safetensors")
    ref = load_model(write_tiny_v2(tmp_path / "two"), dtype=torch.float32, progress=False)
    model = load_model(path, dtype=torch.float32, progress=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_dtype_of_loaded_weights(tiny_v3):
    model = load_model(tiny_v3, dtype=torch.bfloat16, progress=False)
    assert model.lm_head.weight.dtype == torch.bfloat16
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0  # routing bias stays exact


MEMORY_PROBE = textwrap.dedent("""
    import json, re, sys, psutil, torch
    from hetero.loader import load_model
    torch.set_num_threads(1)
    import torch._dynamo  # imported by torch on the first meta-device init (with triton, if
    # installed): ~100 MB of code that is not the loader's
    before = psutil.Process().memory_info().rss
    model = load_model(sys.argv[1], dtype=torch.bfloat16, progress=False)
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    status = open("/proc/self/status").read()
    peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps({"growth": peak - before, "weights": weights}))
""")


def test_peak_rss_stays_near_weight_size(tmp_path):
    """A checkpoint ~14x its largest layer loads with peak RSS growth < 1.5x its weights."""
    path = write_tiny_v2(
        tmp_path / "big",
        num_hidden_layers=14,
        hidden_size=512,
        moe_intermediate_size=256,
        num_shards=5,
        vocab_size=1024,
    )
    ckpt = Checkpoint(path)
    layer_bytes = {}
    for name, info in ckpt.tensors.items():
        key = name.split(".")[2] if name.startswith("model.layers.") else name
        layer_bytes[key] = layer_bytes.get(key, 0) + info.nbytes
    total = sum(layer_bytes.values())
    assert total > 10 * max(layer_bytes.values())
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["weights"] >= 0.95 * total
    assert result["growth"] < 1.5 * result["weights"], result
