"""The README's curl and Python examples, run as written against `hetero serve` on the demo model
(only the port is changed, to a free one)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hetero.demo import demo_dir
from hetero.testing.server import ServerProcess

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.skipif(
    demo_dir() is None, reason="the demo weights are not in hetero/demo/"
)


def block(lang: str, containing: str) -> str:
    for body in re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S):
        if containing in body:
            return body
    raise AssertionError(f"README has no ```{lang} block with {containing!r}")


def test_first_command_serves_the_demo_model():
    demo = (Path(__file__).resolve().parent.parent / "scripts" / "demo.sh").read_text()
    assert "hetero serve" in demo
    assert "scripts/demo.sh" in block("bash", "scripts/test.sh")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess([], tmp_path_factory.mktemp("readme") / "serve.log") as srv:
        yield srv


def test_curl_example(server):
    cmd = block("bash", "curl").replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] <= 48


def test_python_example(server, tmp_path):
    code = block("python", "from openai import OpenAI")
    script = tmp_path / "example.py"
    script.write_text(code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # the streamed answer
