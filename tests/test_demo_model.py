"""The shipped demo model (hetero/demo/, see docs/demo_model.md): better than a bigram model on
held-out files, plausible Python completions, and what INT8/INT4 experts cost.

These run once the weights are in the package (`HETERO_TEST_DEMO=DIR` points them at another
checkpoint trained by tools/train_demo.py). The held-out files are those training.json lists,
read from this machine's standard library; files this Python lacks are skipped.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from hetero.demo import demo_dir
from hetero.loader import load_model
from hetero.model import ForwardBatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import demo_corpus as dc  # noqa: E402

MODEL = os.environ.get("HETERO_TEST_DEMO") or demo_dir()
pytestmark = pytest.mark.skipif(
    MODEL is None, reason="the demo weights are not in hetero/demo/ yet (docs/demo_model.md)"
)
ROWS = 24  # held-out rows of the training context scored here (~12K tokens: CI time)


@pytest.fixture(scope="module")
def setup():
    path = Path(MODEL)
    model = load_model(path, dtype=torch.float32, progress=False)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    info = json.loads((path / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    held = [root / f for f in info["corpus"]["heldout_files"] if (root / f).is_file()]
    context = info["settings"]["context"] if "settings" in info else 512
    docs = dc.plain_documents(tok, [f.read_text(encoding="utf-8") for f in held])
    ids, labels = dc.pack(docs, context, pad_last=True)
    return path, model, tok, ids[:ROWS], labels[:ROWS]


@torch.inference_mode()
def nll(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token loss of hetero's model over the rows' trained targets."""
    N, T = ids.shape
    batch = ForwardBatch.build(list(range(N)), [T] * N, [T] * N)
    logits = model(ids.flatten(), batch, model.new_cache(N, T)).view(N, T, -1)
    return dc.next_token_nll(logits, labels)


def test_perplexity_is_at_most_half_a_bigram_models(setup):
    _, model, tok, ids, labels = setup
    total, n = nll(model, ids, labels)
    ppl = torch.tensor(total / n).exp().item()
    corpus = dc.load_corpus()
    train = dc.plain_documents(tok, [corpus.texts[f] for f in corpus.train])
    bigram = dc.bigram_perplexity(train, ids, labels, tok.get_vocab_size())
    print(f"held-out perplexity {ppl:.2f}, bigram {bigram:.2f}, ratio {ppl / bigram:.3f}")
    assert ppl <= 0.5 * bigram


def test_completions_are_python(setup):
    from hetero.generate import SamplingParams, generate

    path, model, *_ = setup
    tok = AutoTokenizer.from_pretrained(path)
    params = SamplingParams(max_tokens=12)

    def complete(prefix: str) -> str:
        out = generate(model, [tok.encode(prefix)], params)[0]
        return tok.decode(out, skip_special_tokens=True)

    init = complete("def __init__(self")
    assert init[:1] in (",", ")") and ":" in init  # the argument list closes into a body
    # no trailing space: byte-level BPE carries it on the next word (" os"), so a prompt ending
    # in a space is a token sequence the model never saw
    imported = complete("import os\nimport")
    assert imported[:1] == " " and imported[1:2].isalpha()  # a module name follows


def test_int8_and_int4_experts_cost_little(setup):
    from hetero.config import ModelConfig
    from hetero.eval import evaluate, standard_placements
    from hetero.sched.runtime import HybridOptions, load_hybrid

    path, model, _, ids, _ = setup
    rows = standard_placements(ModelConfig.from_hf(path))
    opts = HybridOptions(dtype=torch.float32, progress=False)
    hybrids = {n: load_hybrid(path, rows[n], opts) for n in ("int8 experts", "int4 experts")}
    try:
        windows = [r.tolist() for r in ids[:8]]
        results = evaluate(model, {n: h.model for n, h in hybrids.items()}, windows)
    finally:
        for h in hybrids.values():
            h.close()
    print({n: round(100 * r["perplexity_change"], 3) for n, r in results.items()})
    assert results["int8 experts"]["perplexity_change"] <= 0.01
    assert results["int4 experts"]["perplexity_change"] <= 0.05
