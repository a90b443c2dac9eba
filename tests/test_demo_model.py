"""The shipped demo model (hetero/demo/, see docs/demo_model.md): better than a bigram model on
held-out files, plausible Python completions, and what INT8/INT4 experts cost.

These run once the weights are in the package (`HETERO_TEST_DEMO=DIR` points them at another
checkpoint trained by tools/train_demo.py). The held-out files are those training.json lists,
read from this machine's standard library; files this Python lacks are skipped.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import sys
import sysconfig
import tokenize
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


def lex(text: str) -> list[tokenize.TokenInfo]:
    """Python's tokens of `text`, less comments, NL and indentation. A completion stops after a
    fixed number of tokens, so text that ends inside brackets or a triple-quoted string is fine;
    a stray character, an unclosed quote or a bad dedent fails."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    toks: list[tokenize.TokenInfo] = []
    try:
        toks += tokenize.generate_tokens(io.StringIO(text).readline)
    except tokenize.TokenError as e:
        assert "EOF in multi-line" in str(e), (text, e)
    assert not [t for t in toks if t.type == tokenize.ERRORTOKEN], text
    return [t for t in toks if t.type not in skip]


def is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


def init_params(text: str, lines: list[str]) -> None:
    """`def __init__(self` goes on with another parameter or closes the parameter list."""
    t = [x.string for x in lex(text)]
    assert t[:4] == ["def", "__init__", "(", "self"] and len(t) >= 6, t
    if t[4] == ",":  # a parameter or the keyword-only marker
        assert t[5] in ("*", "**") or t[5].isidentifier(), t
    else:
        assert t[4:6] in ([")", ":"], [")", "->"]), t


def import_module(text: str, lines: list[str]) -> None:
    """The line becomes `import M` for a real standard library module M, and ends there."""
    lex(text)
    m = re.fullmatch(r"import ([\w.]+)(?: as \w+)?", lines[0])
    assert m and is_stdlib(m[1]) and len(lines) > 1, lines


def main_guard(text: str, lines: list[str]) -> None:
    """`if __name__ ==` compares with the "__main__" literal, and the line ends with a colon."""
    t = lex(lines[0])
    assert [x.string for x in t[:3]] == ["if", "__name__", "=="] and len(t) >= 5, t
    assert t[3].type == tokenize.STRING and ast.literal_eval(t[3].string) == "__main__", t
    assert t[4].string == ":" and len(lines) > 1, t


def class_bases(text: str, lines: list[str]) -> None:
    """`class Foo(` lists base names (dotted, or keyword=value), closes with `):`, and an
    indented body starts on the next line."""
    t = lex(lines[0])
    close = next((i for i, x in enumerate(t) if x.string == ")"), len(t))
    assert close > 3 and close + 1 < len(t) and t[close + 1].string == ":", t
    assert all(x.type == tokenize.NAME or x.string in ".,=" for x in t[3:close]), t
    assert len(lines) > 1 and re.match(r" +\S", lines[1]), lines


def method_self(text: str, lines: list[str]) -> None:
    """An indented `def ` is a method: a name, then `(self`."""
    t = lex(lines[0].lstrip())
    assert len(t) >= 4 and t[0].string == "def" and t[1].type == tokenize.NAME, t
    assert [x.string for x in t[2:4]] == ["(", "self"], t


def optional_import(text: str, lines: list[str]) -> None:
    """`try: import` imports a standard library module, and the try ends in an except clause
    that names a built-in exception."""
    import builtins

    lex(text)
    m = re.fullmatch(r"    import ([\w.]+)(?: as \w+)?", lines[0])
    assert m and is_stdlib(m[1]) and len(lines) > 1, lines
    e = re.fullmatch(r"except \(?(\w+).*:", lines[1])
    assert e and issubclass(getattr(builtins, e[1], type), BaseException), lines


# No prefix ends in a space or a lone quote: byte-level BPE carries the space on the next word
# (" os") and merges a quote into what follows ('"__'), so such a prompt is a token sequence
# the model never saw.
COMPLETIONS = {
    "def __init__(self": init_params,
    "import": import_module,
    "import os\nimport": import_module,
    "if __name__ ==": main_guard,
    "class Foo(": class_bases,
    "    def": method_self,
    "try:\n    import": optional_import,
}


@pytest.mark.parametrize("prefix", COMPLETIONS)
def test_completions_are_python(setup, prefix):
    """Greedy completions of typical prefixes, checked with Python's own tokenizer and standard
    library (which modules exist, which names are exceptions), not against stored text."""
    from hetero.generate import SamplingParams, generate

    path, model, *_ = setup
    tok = AutoTokenizer.from_pretrained(path)
    out = generate(model, [tok.encode(prefix)], SamplingParams(max_tokens=16))[0]
    text = prefix + tok.decode(out, skip_special_tokens=True)
    print(f"{prefix!r} -> {text[len(prefix) :]!r}")
    # the lines from the one the prefix ends in; only the last may be cut off
    COMPLETIONS[prefix](text, text.split("\n")[prefix.count("\n") :])


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
