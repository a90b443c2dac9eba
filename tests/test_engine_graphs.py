"""Decode steps of the serving engine through graph segments (hetero.sched.graphs) per
(batch, page-width) bucket against the plain model: eagerly on the CPU, as CUDA graphs on
the GPU (marked gpu). Rows past a step's requests are padding that must change nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from hetero.demo import demo_dir
from hetero.engine.engine import Engine, ServingConfig
from hetero.engine.params import SamplingParams
from hetero.loader import load_model

TEXT = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"


def outputs(model, tok, graph_batch: int, graphs: bool, lengths, page_size: int = 8) -> list:
    """Greedy tokens of prompts of `lengths` tokens, run together; decode steps through graph
    segments when graph_batch > 0 (`graphs`: captured as CUDA graphs)."""
    ids = tok.encode(TEXT * 4)
    config = ServingConfig(page_size=page_size, kv_cache_tokens=1024, max_num_batched_tokens=64)
    engine = Engine(model, tok, config)
    engine.runner.max_graph_batch, engine.runner.graphs = graph_batch, graphs
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    rids = [engine.add_request(ids[i : i + n], params) for i, n in enumerate(lengths)]
    out = {r: [] for r in rids}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] += o.token_ids
    # the buckets met: 3 requests pad to 4 rows; contexts crossing 8-token pages widen the table
    assert not graph_batch or {b for b, _ in engine.runner.decoders} == {4}
    return [out[r] for r in rids]


@pytest.fixture(scope="module")
def demo():
    return AutoTokenizer.from_pretrained(demo_dir())


def test_eager_segments_equal_the_plain_model(demo):
    model = load_model(demo_dir(), dtype=torch.float32, progress=False)
    lengths = (3, 17, 30)
    assert outputs(model, demo, 8, False, lengths) == outputs(model, demo, 0, False, lengths)


@pytest.mark.gpu
def test_cuda_graphs_equal_eager(demo):
    model = load_model(demo_dir(), device="cuda", dtype=torch.float32, progress=False)
    lengths = (3, 17, 30)
    assert outputs(model, demo, 8, True, lengths) == outputs(model, demo, 0, False, lengths)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_attention_graphs_on_and_off(demo, dtype):
    """The "triton" backend (mla_decode inside the graphs, mla_extend for the prompts): CUDA
    graphs give the eager steps' tokens, and fp32 gives the CPU engine's greedy tokens."""
    lengths = (3, 17, 30)

    def run(device, graph_batch, graphs, dtype):
        model = load_model(demo_dir(), device=device, dtype=dtype, attention="triton",
                           progress=False)  # fmt: skip
        return outputs(model, demo, graph_batch, graphs, lengths, page_size=16)

    eager = run("cuda", 0, False, dtype)
    assert run("cuda", 8, True, dtype) == eager
    if dtype == torch.float32:
        assert eager == run("cpu", 0, False, dtype)
