from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from hetero.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def generate_json(capsys, model, prompt: str, *extra: str) -> dict:
    """`hetero generate --json` on `model`; returns its parsed output (exit code 0 asserted)."""
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(model), "--prompt", prompt, "--json", *extra
    )
    assert code == 0
    return json.loads(out)


def test_generate_json(tiny_v3, capsys):
    result = generate_json(capsys, tiny_v3, "def f(x):", "--max-tokens", "6", "--device", "cpu")
    tok = AutoTokenizer.from_pretrained(tiny_v3)
    assert result["prompt_ids"] == tok.encode("def f(x):")
    assert result["prompt_ids"][0] == tok.bos_token_id
    ids = result["output_ids"]
    assert len(ids) == 6 or (ids[-1] == tok.eos_token_id and len(ids) <= 6)
    assert result["text"] == tok.decode(ids, skip_special_tokens=True)


def test_generate_is_deterministic_and_sampling_differs(tiny_v2, capsys):
    def ids(*extra):
        return generate_json(capsys, tiny_v2, "import os", "--max-tokens", "12", *extra)[
            "output_ids"
        ]

    greedy = [ids() for _ in range(2)]
    assert greedy[0] == greedy[1]
    hot = [ids("--temperature", "5", "--seed", str(s)) for s in range(3)]
    assert len({tuple(h) for h in hot}) > 1  # different seeds sample different tokens


def test_chat_template(tiny_v3, capsys):
    ids = generate_json(capsys, tiny_v3, "hello", "--chat", "--max-tokens", "2")["prompt_ids"]
    tok = AutoTokenizer.from_pretrained(tiny_v3)
    user, assistant = tok.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>"])
    assert ids[:2] == [tok.bos_token_id, user] and ids[-1] == assistant
    assert tok.decode(ids[2:-1]) == "hello"


@pytest.mark.parametrize("naive", [False, True])
def test_bad_model_is_one_line_error(tmp_path, capsys, naive):
    target = tmp_path / ("missing" if naive else "")
    code, out, err = run_cli(capsys, "generate", "--model", str(target), "--prompt", "x")
    assert code == 2 and out == ""
    assert err.startswith("hetero: error:") and err.count("\n") == 1 and "config.json" in err


def test_console_script_default_model(tmp_path):
    """`hetero generate` with no model runs the demo model shipped in the package: the same
    output as naming it, and nothing written to the cache."""
    from hetero.demo import demo_dir

    assert demo_dir() is not None  # the weights ship in hetero/demo/
    env = dict(os.environ, HETERO_CACHE=str(tmp_path))
    cmd = [sys.executable, "-m", "hetero.cli", "generate", "--prompt", "def"]
    cmd += ["--max-tokens", "4", "--json"]
    default = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    named = cmd + ["--model", str(demo_dir())]
    named = subprocess.run(named, env=env, capture_output=True, text=True, check=True)
    assert json.loads(default.stdout) == json.loads(named.stdout)
    assert len(json.loads(default.stdout)["output_ids"]) == 4 and not any(tmp_path.iterdir())


def test_default_model_without_the_demo_weights(tmp_path, monkeypatch):
    """A source tree without the demo weights writes a small random checkpoint once and
    reuses it."""
    import hetero.demo
    from hetero.cli import default_model_dir

    monkeypatch.setattr(hetero.demo, "demo_dir", lambda: None)
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path))
    path = default_model_dir()
    assert path == tmp_path / "tiny-v3" and (path / "config.json").exists()
    written = (path / "config.json").stat().st_mtime_ns
    assert default_model_dir() == path
    assert (path / "config.json").stat().st_mtime_ns == written


def write_placement(path, cpu_format="bf16", extra=""):
    path.write_text(
        "rules:\n"
        f"  - {{match: '\\.mlp\\.experts$', device: cpu, format: {cpu_format}{extra}}}\n"
        "  - {device: gpu, format: bf16}\n"
    )
    return path


def test_generate_with_cpu_experts(tiny_v2, tmp_path, capsys):
    """--placement runs the routed experts on the CPU engine; bf16 experts of a bf16 checkpoint
    give the reference path's greedy tokens."""
    yaml = write_placement(tmp_path / "p.yaml")
    args = ("--max-tokens", "8", "--device", "cpu", "--dtype", "float32")
    hybrid = generate_json(capsys, tiny_v2, "def f(x):", *args, "--placement", str(yaml))
    plain = generate_json(capsys, tiny_v2, "def f(x):", *args)
    assert hybrid["output_ids"] == plain["output_ids"]


def test_impossible_plan_is_refused_before_loading(tiny_v3, tmp_path, capsys):
    """A placement whose memory plan does not fit fails with the numbers, before any shard is
    read (here the shards are gone: reading one would be a different error)."""
    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_v3.iterdir():
        if f.suffix != ".safetensors":
            (model / f.name).write_bytes(f.read_bytes())
    yaml = tmp_path / "p.yaml"
    yaml.write_text(write_placement(yaml).read_text() + "runtime: {ram_gb: 0.001}\n")
    code, out, err = run_cli(
        capsys, "generate", "--model", str(model), "--prompt", "x", "--placement", str(yaml)
    )
    assert code == 2 and out == ""
    assert "does not fit" in err and "GiB" in err and "safetensors" not in err


def test_profile_experts_feeds_placement(tiny_v3, tmp_path, capsys):
    from hetero.config import ModelConfig
    from hetero.placement import load_placement

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n\nimport os\nclass A:\n")
    out = tmp_path / "profile.json"
    code, _, _ = run_cli(
        capsys, "profile-experts", "--model", str(tiny_v3), "--prompts", str(prompts),
        "--out", str(out), "--max-tokens", "3", "--device", "cpu",
    )  # fmt: skip
    assert code == 0
    profile = json.loads(out.read_text())
    config = ModelConfig.from_hf(tiny_v3)
    assert sorted(map(int, profile["layers"])) == list(config.moe_layers)
    tok = AutoTokenizer.from_pretrained(tiny_v3)
    lines = [p for p in prompts.read_text().splitlines() if p]
    tokens = sum(len(tok.encode(p)) + 3 - 1 for p in lines)  # the last sampled token is not fed
    assert profile["tokens"] == tokens
    k = config.num_experts_per_tok
    assert all(sum(c) == tokens * k for c in profile["layers"].values())
    yaml = write_placement(tmp_path / "p.yaml", "int8", ", gpu_experts: {hottest: 2}")
    placement = load_placement(yaml, config, out)
    for L, counts in profile["layers"].items():
        hot = sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:2]
        assert placement.experts(int(L)).gpu_experts == tuple(sorted(hot))
