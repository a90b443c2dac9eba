from __future__ import annotations

import dataclasses
import json
import mmap

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from hetero.cli import main
from hetero.config import ModelConfig
from hetero.cpu_experts import store as store_mod
from hetero.cpu_experts.formats import Format, unpack_expert
from hetero.cpu_experts.store import ExpertStore, StoreError, convert, pack_layer
from hetero.loader import Checkpoint
from hetero.testing import tiny_v3_config, write_checkpoint

SPECS = ("bf16", "int8", "int4-g32")
# Relative Frobenius error of the unpacked weights against the fp32 checkpoint weights.
TOLERANCE = {"bf16": 0.005, "int8": 0.02, "int4": 0.15}


@pytest.fixture(scope="module", params=SPECS)
def converted(request, tiny_v3, tmp_path_factory):
    fmt = Format.parse(request.param)
    out = tmp_path_factory.mktemp(f"store-{request.param}") / "store"
    assert convert(tiny_v3, out, fmt, progress=False) == out
    return fmt, out


@pytest.fixture
def own_store(tiny_v3, tmp_path):
    """A private int4 store to break, the config, and resize(L): record layer L's new file size."""
    config = ModelConfig.from_hf(tiny_v3)
    out = convert(tiny_v3, tmp_path / "store", Format.parse("int4"), progress=False)
    meta_file = out / "experts.json"

    def resize(layer: int) -> None:  # records the file's new size, so only its header can tell
        meta = json.loads(meta_file.read_text())
        meta["files"][str(layer)]["bytes"] = (
            (out / meta["files"][str(layer)]["file"]).stat().st_size
        )
        meta_file.write_text(json.dumps(meta))

    return out, config, resize


def reaches_mmap(a: np.ndarray) -> bool:
    while isinstance(a, np.ndarray):
        a = a.base
    return isinstance(a, mmap.mmap) or (isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap))


def one_line_error(fn, *needles) -> str:
    with pytest.raises(StoreError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    return message


def test_store_equals_packing_in_memory(converted, tiny_v3):
    fmt, out = converted
    config = ModelConfig.from_hf(tiny_v3)
    ckpt = Checkpoint(tiny_v3, config.fp8_block)
    store = ExpertStore.open(out, config, tiny_v3)
    assert store.fmt == fmt and store.layers == config.moe_layers == (1, 2)
    meta = json.loads((out / "experts.json").read_text())
    assert meta["format"] == str(fmt) and meta["hetero_store_version"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "experts.json",
        "layer-001.safetensors",
        "layer-002.safetensors",
    ]
    for layer in config.moe_layers:
        loaded, ref = store.layer(layer).arrays(), pack_layer(ckpt, config, layer, fmt).arrays()
        for name, a in loaded.items():
            assert a.dtype == ref[name].dtype and a.shape == ref[name].shape, name
            assert a.tobytes() == ref[name].tobytes(), f"layer {layer} {name} differs"


# formats.dequantize calls torch.from_numpy on the store's read-only maps, which torch warns about.
@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_unpacked_store_matches_checkpoint(converted, tiny_v3):
    fmt, out = converted
    config = ModelConfig.from_hf(tiny_v3)
    ckpt = Checkpoint(tiny_v3, config.fp8_block)
    packed = ExpertStore.open(out, config).layer(2)
    for e in (0, 7, 15):
        p = f"model.layers.2.mlp.experts.{e}."
        names = [p + m + "_proj.weight" for m in ("gate", "up", "down")]
        ref = ckpt.load_group(names, dict.fromkeys(names, torch.float32))
        for got, name in zip(unpack_expert(packed, e), names):
            err = (got - ref[name]).norm() / ref[name].norm()
            assert err < TOLERANCE[fmt.name], f"{fmt} expert {e} {name}: rel. err {err:.4f}"


def test_layers_are_read_only_memory_maps(converted, tiny_v3):
    _, out = converted
    packed = ExpertStore.open(out, ModelConfig.from_hf(tiny_v3)).layer(1)
    for name, a in packed.arrays().items():
        assert not a.flags.owndata and not a.flags.writeable and a.flags.aligned, name
        assert reaches_mmap(a), f"{name} is not a view of the file"


def test_truncated_layer_file(own_store):
    out, config, resize = own_store
    file = out / "layer-002.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 100)
    one_line_error(lambda: ExpertStore.open(out, config), file, "truncated")
    resize(2)  # experts.json agrees now: the header must catch it
    store = ExpertStore.open(out, config)
    store.layer(1)
    one_line_error(lambda: store.layer(2), file, "truncated")


@pytest.mark.parametrize("damage", ["header", "dtype", "missing", "empty"])
def test_damaged_layer_file_names_it(own_store, damage):
    out, config, resize = own_store
    file = out / "layer-001.safetensors"
    arrays = {k: np.array(v) for k, v in ExpertStore.open(out, config).layer(1).arrays().items()}
    if damage == "header":
        data = bytearray(file.read_bytes())
        data[8:20] = b"\xff" * 12
        file.write_bytes(bytes(data))
    elif damage == "dtype":
        save_file(arrays | {"s2": arrays["s2"].astype(np.float32)}, file)
    elif damage == "missing":
        save_file({k: v for k, v in arrays.items() if k != "w2"}, file)
    else:
        file.write_bytes(b"")
    resize(1)
    needle = {"header": "corrupt", "dtype": "'s2'", "missing": "w2", "empty": "truncated"}[damage]
    one_line_error(lambda: ExpertStore.open(out, config).layer(1), file, needle)


def test_store_of_another_model(own_store, tiny_v3, tiny_v2, tmp_path):
    out, config, _ = own_store
    smaller = dataclasses.replace(config, n_routed_experts=8)
    one_line_error(lambda: ExpertStore.open(out, smaller), "experts.json", "num_experts")
    one_line_error(
        lambda: ExpertStore.open(out, ModelConfig.from_hf(tiny_v2), tiny_v2),
        out / "experts.json",
        tiny_v3.resolve(),
        tiny_v2.resolve(),
    )
    # Another seed: config, index and shard sizes are all the same; only the bytes differ.
    other = write_checkpoint(
        tmp_path / "seed1", tiny_v3_config(), seed=1, dtype="fp8", tokenizer=False
    )
    for name in ("config.json", "model.safetensors.index.json"):
        assert (other / name).read_bytes() == (tiny_v3 / name).read_bytes()
    one_line_error(lambda: ExpertStore.open(out, config, other), "converted from", other.resolve())


def test_not_a_store(tiny_v3, tmp_path):
    config = ModelConfig.from_hf(tiny_v3)
    one_line_error(lambda: ExpertStore.open(tmp_path, config), "not a hetero expert store")
    (tmp_path / "experts.json").write_text("{}")
    one_line_error(lambda: ExpertStore.open(tmp_path, config), "experts.json", "unreadable")


def test_interrupted_convert_is_not_a_store(tiny_v3, tmp_path, monkeypatch):
    out = tmp_path / "store"
    convert(tiny_v3, out, Format.parse("int8"), progress=False)
    real = store_mod.pack_layer

    def fail_on_layer_2(ckpt, config, layer, fmt):
        if layer == 2:
            raise KeyboardInterrupt
        return real(ckpt, config, layer, fmt)

    monkeypatch.setattr(store_mod, "pack_layer", fail_on_layer_2)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_v3, out, Format.parse("int4"), progress=False)  # over the int8 store
    one_line_error(lambda: ExpertStore.open(out, ModelConfig.from_hf(tiny_v3)), "no experts.json")


def test_cli_convert(tiny_v3, tmp_path, capsys):
    out = tmp_path / "store"
    args = ["convert", "--model", str(tiny_v3), "--out", str(out), "--cpu-format", "int4"]
    assert main([*args, "--group-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "int4-g32" in printed and "GiB" in printed
    assert (out / "experts.json").exists() and (out / "layer-002.safetensors").exists()
    assert ExpertStore.open(out, ModelConfig.from_hf(tiny_v3)).fmt == Format("int4", 32)


@pytest.mark.parametrize(
    "spec, needle",
    [
        (["int5"], "unknown CPU expert format"),
        (["int4-g48"], "group size"),
        (["int4-g64", "--group-size", "32"], "--group-size"),
        (["int4-g64"], "cannot pack"),  # moe_intermediate_size 96 is not a multiple of 64
    ],
)
def test_cli_convert_bad_format(tiny_v3, tmp_path, capsys, spec, needle):
    args = ["convert", "--model", str(tiny_v3), "--out", str(tmp_path / "s"), "--cpu-format"]
    assert main([*args, *spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetero: error: ") and err.count("\n") == 1 and needle in err, err
