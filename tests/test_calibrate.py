"""Calibration (hetero.sched.calibrate) and its cache (hetero.sched.rates): a tiny measurement on
this CPU through the real engine, then the cache's rules with the measurements replaced by
counters: written, reused on the same machine, measured again for another machine, format or
shape, a corrupt file ignored. No timing is asserted."""

from __future__ import annotations

import json
import logging
import math

import pytest

from hetero.sched import calibrate as cal
from hetero.sched.calibrate import CalibrationSize, calibrate, load_rates
from hetero.sched.rates import (
    CalibrationError,
    ExpertCost,
    Rates,
    cached_rates,
    default_cache_path,
    read_cache,
)

TINY = CalibrationSize(
    tokens=(1, 4, 16), pool_bytes=4 << 20, probe_bytes=16 << 20, min_time_s=0.01, max_calls=3
)
SHAPE = (256, 128)  # H, I: multiples of 128, so int4 takes the engine's int8-activation GEMV
MACHINE = {"cpu": "test CPU", "cores": 16, "threads": 15, "ram_gib": 512, "gpus": []}


def test_tiny_calibration_on_this_cpu(tmp_path):
    path = tmp_path / "calibration.json"
    rates = calibrate(SHAPE, ["int4", "int8"], size=TINY, cache=path)
    for v in (rates.host_read_gbps, rates.stage_gbps):
        assert math.isfinite(v) and v > 0
    assert rates.h2d_gbps == 0 and rates.hbm_gbps is None and not rates.gpu  # no CUDA here
    assert set(rates.cpu) == {"int4-g32", "int8"} and rates.shape == SHAPE
    for cost in rates.cpu.values():
        assert cost.tokens == (1, 4, 16)
        assert all(math.isfinite(s) and s >= 0 for s in (*cost.seconds, cost.call_s))
        assert cost.call([1] * 8) > 0  # a decode layer's call
    entry = next(iter(read_cache(path)["machines"].values()))
    assert {"256x128 cpu:int4-g32", "256x128 cpu:int8"} <= set(entry["experts"])
    assert entry["fingerprint"]["threads"] == rates.threads > 0
    # this machine's entry, found again without measuring
    again = cached_rates(SHAPE, ["int4"], path=path)
    assert again is not None and again.cpu["int4-g32"] == rates.cpu["int4-g32"]
    assert cached_rates(SHAPE, ["bf16"], path=path) is None


@pytest.fixture
def counted(monkeypatch):
    """The measurements replaced by counters (what was measured, in order)."""
    calls = []

    def host(size, threads, cuda):
        calls.append("host")
        return {"host_read_gbps": 100.0, "stage_gbps": 30.0, "h2d_gbps": 0.0}

    def table(shape, fmt, size, threads):
        calls.append(f"{shape[0]}x{shape[1]} {fmt}")
        return ExpertCost((1, 16), (1e-4, 5e-4), 1e-5)

    monkeypatch.setattr(cal, "_host_rates", host)
    monkeypatch.setattr(cal, "_cpu_table", table)
    monkeypatch.setattr(cal, "_cuda", lambda: False)
    return calls


def test_cache_reused_and_invalidated(tmp_path, counted):
    path = tmp_path / "calibration.json"
    run = lambda fp, formats=("int4",), shape=SHAPE: calibrate(  # noqa: E731
        shape, formats, cache=path, fingerprint=fp
    )
    first = run(MACHINE)
    assert counted == ["host", "256x128 int4"] and path.exists()
    assert first.source == f"measured now, cached in {path}"
    assert first.machine.startswith("test CPU, 16 cores")
    assert run(MACHINE).source == f"cached in {path}"  # the same machine: nothing measured
    assert counted == ["host", "256x128 int4"]
    run(MACHINE, ("int4-g32",))  # the same format, spelled out
    assert len(counted) == 2
    run(MACHINE, ("int4", "int8"))  # another format: its table alone
    assert counted[2:] == ["256x128 int8"]
    run(MACHINE, ("int4-g128",))  # another int4 group is another format
    assert counted[3:] == ["256x128 int4-g128"]
    run(MACHINE, ("int4",), (512, 256))  # another shape
    assert counted[4:] == ["512x256 int4"]
    for other in ({**MACHINE, "cpu": "other CPU"}, {**MACHINE, "gpus": ["H200"]},
                  {**MACHINE, "threads": 7}, {**MACHINE, "numba": "0.1"}):  # fmt: skip
        n = len(counted)
        run(other)  # another machine: everything again
        assert counted[n:] == ["host", "256x128 int4"]
    assert len(read_cache(path)["machines"]) == 5  # each machine kept beside the others
    run(MACHINE)
    assert len(counted) == 13  # the first machine's entry is still there


@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2]", '{"version": 0, "machines": {}}', '{"version": 1}', "\udcff"],
)
def test_corrupt_cache_is_ignored(tmp_path, counted, caplog, text):
    path = tmp_path / "calibration.json"
    path.write_text(text, errors="surrogateescape")
    with caplog.at_level(logging.WARNING):
        rates = calibrate(SHAPE, ["int4"], cache=path, fingerprint=MACHINE)
    assert "calibration cache" in caplog.text and rates.cpu["int4-g32"].call_s == 1e-5
    assert counted == ["host", "256x128 int4"]
    assert read_cache(path)["machines"]  # rewritten whole


def test_malformed_entry_is_measured_again(tmp_path, counted):
    path = tmp_path / "calibration.json"
    calibrate(SHAPE, ["int4"], cache=path, fingerprint=MACHINE)
    data = json.loads(path.read_text())
    (entry,) = data["machines"].values()
    entry["experts"]["256x128 cpu:int4-g32"] = {"tokens": [1]}  # no seconds
    path.write_text(json.dumps(data))
    calibrate(SHAPE, ["int4"], cache=path, fingerprint=MACHINE)
    assert counted == ["host", "256x128 int4", "256x128 int4"]


def test_default_cache_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_path() == tmp_path / "c" / "calibration.json"
    monkeypatch.delenv("HETERO_CACHE_DIR")
    assert default_cache_path().parts[-3:] == (".cache", "hetero", "calibration.json")


def rates_file(tmp_path, **changes) -> str:
    rates = Rates(
        shape=SHAPE, host_read_gbps=100.0, h2d_gbps=25.0, hbm_gbps=2000.0, gpu_tflops=300.0,
        cpu={"int4-g32": ExpertCost((1, 16), (1e-4, 5e-4))}, machine="the GPU machine",
    )  # fmt: skip
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({**rates.to_dict(), **changes}))
    return str(path)


def test_load_rates_from_files(tmp_path, counted):
    rates = load_rates(rates_file(tmp_path), SHAPE, ["int4"])
    assert rates.h2d_gbps == 25.0 and rates.source.endswith("rates.json")
    assert Rates.from_dict(rates.to_dict()) == rates
    with pytest.raises(CalibrationError, match="measured on 256x128 experts, the model's are 7"):
        load_rates(rates_file(tmp_path), (7168, 2048), ["int4"])
    with pytest.raises(CalibrationError, match="no CPU cost for int8 .*it has: int4-g32"):
        load_rates(rates_file(tmp_path), SHAPE, ["int8"])
    with pytest.raises(CalibrationError, match="not a calibration"):
        load_rates(rates_file(tmp_path, shape=None), SHAPE, ["int4"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CalibrationError, match="bad.json: not a readable JSON file"):
        load_rates(str(tmp_path / "bad.json"), SHAPE, ["int4"])
    # a cache file copied from one other machine: its entry
    cache = tmp_path / "other.json"
    calibrate(SHAPE, ["int4"], cache=cache, fingerprint=MACHINE)
    rates = load_rates(str(cache), SHAPE, ["int4"])
    assert rates.machine.startswith("test CPU") and rates.host_read_gbps == 100.0
    calibrate(SHAPE, ["int4"], cache=cache, fingerprint={**MACHINE, "cpu": "another"})
    with pytest.raises(CalibrationError, match="2 machines have int4 experts of 256x128"):
        load_rates(str(cache), SHAPE, ["int4"])
    with pytest.raises(CalibrationError, match="0 machines have int8"):
        load_rates(str(cache), SHAPE, ["int8"])


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_gpu_tables_through_the_runtime_kernels_on_the_host(fmt):
    """The GPU tables' calls (streaming.group_experts for a CPU format, fused_moe_fp8 for FP8
    experts) made on CPU tensors (the Triton interpreter): the plumbing, not the rates."""
    size = CalibrationSize(tokens=(1, 4), experts_a_call=2, min_time_s=0.0, max_calls=3)
    cost = cal._gpu_table(SHAPE, fmt, size, device="cpu")
    assert cost.tokens == (1, 4) and all(math.isfinite(s) for s in (*cost.seconds, cost.call_s))
    assert cal._gpu_table(SHAPE, "fp4", size, device="cpu") is None  # (no kernel to time)
