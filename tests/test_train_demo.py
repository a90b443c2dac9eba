"""tools/train_demo.py in --tiny mode: a loadable checkpoint, hetero matches transformers on it,
held-out files stay out, runs are reproducible; and the data helpers on hand-made inputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, DeepseekV3ForCausalLM

from hetero.config import ModelConfig
from hetero.generate import SamplingParams, generate
from hetero.loader import load_model
from hetero.model import ForwardBatch
from hetero.testing.tokenizer import ASSISTANT, BOS_ID, EOS_ID, PAD_ID, USER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import demo_corpus as dc  # noqa: E402
import demo_model  # noqa: E402
import train_demo  # noqa: E402

TOL = 1e-4
STEPS = 8
TINY_ARGS = ["--tiny", "--limit-files", "6", "--max-steps", str(STEPS), "--device", "cpu"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, train_demo.main([*TINY_ARGS, "--out", str(out)])


def test_checkpoint_files(run):
    out, result = run
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["dtype"] == "bfloat16"
    assert "auto_map" not in config and "quantization_config" not in config
    parsed = ModelConfig.from_hf(out)
    want = ("noaux_tc", "sigmoid", demo_model.TINY.n_group)
    assert (parsed.topk_method, parsed.scoring_func, parsed.n_group) == want
    assert parsed.first_k_dense_replace == 1 and not parsed.tie_word_embeddings
    tensors = load_file(out / "model.safetensors")
    for name, t in tensors.items():
        want = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want, name
    assert (
        sum(t.numel() for n, t in tensors.items() if "correction" not in n) == result["parameters"]
    )


def test_correction_bias_was_updated(run):
    out, result = run
    tensors = load_file(out / "model.safetensors")
    biases = [t for n, t in tensors.items() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().max() > 0 for b in biases)
    # Each step moves each bias by exactly +-u or 0.
    steps, u = result["steps"], result["settings"]["bias_update_speed"]
    assert all(b.abs().max() <= steps * u + 1e-6 for b in biases)


def test_training_json(run):
    out, result = run
    saved = json.loads((out / "training.json").read_text())
    assert saved == json.loads(json.dumps(result))
    held, train = set(saved["corpus"]["heldout_files"]), set(saved["train_files"])
    assert held and train and not held & train
    assert all(dc.is_heldout(f) for f in held) and not any(dc.is_heldout(f) for f in train)
    assert saved["train_loss_final"] < saved["train_loss_first"]
    tiny = demo_model.TINY
    assert (
        saved["steps"] == STEPS and saved["tokens_seen"] == STEPS * tiny.batch_size * tiny.context
    )
    h = saved["heldout"]
    assert h["tokens"] > 0 and math.isfinite(h["perplexity"])
    assert h["ratio_to_bigram"] == pytest.approx(h["perplexity"] / h["bigram_perplexity"], rel=1e-3)
    assert set(saved["completions"]) == {*train_demo.PROMPTS, train_demo.CHAT_REQUEST}
    assert saved["corpus"]["python"] == sys.version.split()[0]


def test_hetero_matches_transformers(run):
    out, _ = run
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )
    prompt = tokenizer("def __init__(self, path):\n    return os.path")["input_ids"]
    assert prompt[0] == BOS_ID
    ref = DeepseekV3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model = load_model(out, dtype=torch.float32, progress=False)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([prompt])).logits[0]
    cache = model.new_cache(1, len(prompt))
    batch = ForwardBatch.build([0], [len(prompt)], [len(prompt)])
    assert rel_err(model(torch.tensor(prompt), batch, cache), expected) < TOL
    greedy = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    ours = generate(model, [prompt], SamplingParams(max_tokens=8, stop_token_ids=(EOS_ID,)))
    assert ours[0] == greedy[0, len(prompt) :].tolist()[: len(ours[0])]


def test_a_run_shorter_than_a_log_interval(tmp_path):
    """Steps after the last log point still count (a run cut short by --max-steps or the clock
    still saves its model)."""
    args = [*TINY_ARGS[:-4], "--max-steps", "3", "--set", "log_every=5", "--device", "cpu"]
    result = train_demo.main([*args, "--out", str(tmp_path)])
    assert result["steps"] == 3 and math.isfinite(result["train_loss_final"])
    assert (tmp_path / "model.safetensors").exists() and result["loss_curve"] == []


def test_same_seed_same_bytes(run, tmp_path):
    out, _ = run
    train_demo.main([*TINY_ARGS, "--out", str(tmp_path)])
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_bigram_perplexity_by_hand():
    # vocab 3, training pairs (0,1) (1,0) (0,1) (1,2): c(0)=2, c(1)=2, c(0,1)=2, c(1,2)=1.
    docs = [dc.Document([0, 1, 0, 1, 2], [True] * 5)]
    ids = torch.tensor([[0, 1, 2, 0]])
    labels = torch.tensor([[dc.IGNORE, 1, 2, dc.IGNORE]])  # targets: 1 after 0, 2 after 1
    k = 0.5
    p1 = (2 + k) / (2 + 3 * k)  # P(1 | 0)
    p2 = (1 + k) / (2 + 3 * k)  # P(2 | 1)
    want = math.exp(-(math.log(p1) + math.log(p2)) / 2)
    assert dc.bigram_perplexity(docs, ids, labels, 3, k) == pytest.approx(want, rel=1e-12)
    unseen = torch.tensor([[2, 2]])  # context 2 never seen: uniform 1/3
    assert dc.bigram_perplexity(docs, unseen, unseen, 3, k) == pytest.approx(3.0)


SOURCE = '''
class Box:
    @property
    def size(self):
        """Return the number of things in the box."""
        # counted lazily
        return len(self.things)

    def empty(self):
        """Nope."""
        return not self.things

def stub():
    """Only a docstring, nothing to learn from."""
'''


def test_chat_examples_from_docstrings():
    examples = dc.chat_examples(SOURCE)
    assert examples == [
        dc.ChatExample(
            "Return the number of things in the box.",
            "@property\ndef size(self):\n    # counted lazily\n    return len(self.things)\n",
        )
    ]
    assert dc.chat_examples("def broken(:\n") == []


def test_chat_document_matches_template(run):
    out, _ = run
    tokenizer = AutoTokenizer.from_pretrained(out)
    example = dc.ChatExample("Return the sum of a list.", "def total(xs):\n    return sum(xs)\n")
    messages = [
        {"role": "user", "content": example.request},
        {"role": "assistant", "content": example.answer},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == dc.chat_renderer()(messages)
    assert rendered.startswith(tokenizer.bos_token + USER) and ASSISTANT in rendered
    (doc,) = dc.chat_documents(tokenizer.backend_tokenizer, [example])
    assert doc.ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    answer_start = doc.ids.index(tokenizer.convert_tokens_to_ids(ASSISTANT)) + 1
    assert doc.trained == [False] * answer_start + [True] * (len(doc.ids) - answer_start)
    assert doc.ids[-1] == EOS_ID


def test_packing_masks_bos_and_pads_the_tail():
    docs = [dc.Document([BOS_ID, 5, 6, EOS_ID], [False, True, True, True])] * 2
    ids, labels = dc.pack(docs, 3, pad_last=True)
    assert ids.tolist() == [[0, 5, 6], [1, 0, 5], [6, 1, PAD_ID]]
    assert labels.tolist() == [[-100, 5, 6], [1, -100, 5], [6, 1, -100]]
    ids, _ = dc.pack(docs, 3, pad_last=False)
    assert ids.shape == (2, 3)


def test_full_size_model_fits_the_budget():
    """The shipped configuration: 10-20M parameters, at most 40 MB in BF16, hetero can read it."""
    config = demo_model.model_config(demo_model.Settings())
    with torch.device("meta"):
        n = sum(p.numel() for p in DeepseekV3ForCausalLM(config).parameters())
    assert 10e6 <= n <= 20e6  # BF16: at most 40 MB
    parsed = ModelConfig.from_hf(config.to_dict())
    biases = len(parsed.moe_layers) * parsed.n_routed_experts  # buffers, not parameters
    assert parsed.num_parameters == n + biases
