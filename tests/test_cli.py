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
    """`hetero generate` with no model writes its own small checkpoint once and reuses it."""
    env = dict(os.environ, HETERO_CACHE=str(tmp_path))
    cmd = [
        sys.executable,
        "-m",
        "hetero.cli",
        "generate",
        "--prompt",
        "def",
        "--max-tokens",
        "4",
        "--json",
    ]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert (tmp_path / "tiny-v3" / "config.json").exists()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert json.loads(first.stdout) == json.loads(second.stdout)
    assert len(json.loads(first.stdout)["output_ids"]) <= 4
