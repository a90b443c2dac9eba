"""bench/serve.py against a real `hetero serve` on the demo model: its lines count every request
of every turn, carry the latency fields, and see the chats' later turns hit the prefix cache.
No timings are asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
pytest.importorskip("openai")  # a test extra (installed by scripts/setup.sh test)

from bench.serve import main, parse_args  # noqa: E402
from hetero.demo import demo_dir  # noqa: E402
from hetero.testing.server import ServerProcess  # noqa: E402

pytestmark = pytest.mark.skipif(demo_dir() is None, reason="the demo weights are not shipped")


def test_levels_over_a_running_server(tmp_path, capsys):
    with ServerProcess([], tmp_path / "serve.log") as srv:
        main(
            [
                "--url",
                srv.url,
                "--concurrency",
                "1,3",
                "--requests",
                "3",
                "--turns",
                "2",
                "--chat-share",
                "1",
                "--prompt-len",
                "uniform:40,60",
                "--output-len",
                "fixed:4",
            ]
        )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for row in rows:
        assert row["bench"] == "serve" and row["model"]  # the server's own model name
        assert row["requests"] == 3 * 2 and row["errors"] == 0, row["first_error"]
        assert 0 < row["output_tokens"] <= 6 * 4
        for key in ("ttft_ms", "e2e_ms"):
            p = row[key]
            assert 0 < p["p50"] <= p["p90"] <= p["p99"]
        # a second turn resends the first: its prompt starts with cached pages
        assert row["prefix_hit_share"] > 0


def test_bad_arguments_say_what_is_wrong(capsys):
    for argv, message in (
        (["--prompt-len", "normal:5"], "unknown distribution 'normal'"),
        (["--chat-share", "2"], "--chat-share within 0..1"),
        (["--requests", "0"], "--requests must be non-zero"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
