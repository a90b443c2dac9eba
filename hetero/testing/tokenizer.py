"""A small byte-level BPE tokenizer with DeepSeek-V3's special tokens, trained offline.

The corpus is the source of a fixed list of standard-library modules, so the same Python install
always yields the same tokenizer.json, byte for byte, with no download.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from hetero.server import reasoning, toolcalls

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# Trained vocabularies start with the special tokens in this order: bos 0, eos 1, pad 2, as in V3;
# then the tool-call format's tokens and R1's reasoning markers, so chat fixtures can use them.
SPECIAL_TOKENS = (
    BOS,
    EOS,
    PAD,
    USER,
    ASSISTANT,
    *toolcalls.TOKENS,
    reasoning.OPEN,
    reasoning.CLOSE,
)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
THINK_TOKENS = (reasoning.OPEN, reasoning.CLOSE)

CORPUS_MODULES = (
    "textwrap",
    "string",
    "functools",
    "dataclasses",
    "argparse",
    "json/decoder",
    "json/encoder",
    "collections/__init__",
    "heapq",
    "bisect",
    "fractions",
    "statistics",
    "tokenize",
    "shlex",
    "pprint",
    "difflib",
    "configparser",
    "inspect",
)
CORPUS_CHARS = 300_000

# DeepSeek-V3's template without tools: bos, the system prompts, then the turns.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] %}"
    "{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '" + USER + "' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '" + ASSISTANT + "' + m['content'] + '" + EOS + "' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


def stdlib_corpus(max_chars: int = CORPUS_CHARS) -> str:
    """The concatenated source of CORPUS_MODULES, cut at max_chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in CORPUS_MODULES:
        path = root / f"{name}.py"
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
    text = "".join(parts)[:max_chars]
    if len(text) < max_chars // 10:
        raise RuntimeError(f"{root}: too little standard-library source to train a tokenizer on")
    return text


def train_tokenizer(vocab_size: int, texts: Iterable[str] | None = None) -> Tokenizer:
    """Byte-level BPE with vocab_size entries, DeepSeek-V3's special tokens first (bos 0, eos 1,
    pad 2); encoding prepends bos, as DeepSeek's tokenizer does. `texts`: the training text
    (default: the fixed standard-library corpus above)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [stdlib_corpus()] if texts is None else texts
    # Lines as the training "documents": one big string would be one pre-tokenizer call.
    lines = (line for text in texts for line in text.splitlines(keepends=True))
    tok.train_from_iterator(lines, trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"trained {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids[:3] != [BOS_ID, EOS_ID, PAD_ID]:
        raise RuntimeError(f"special token ids {ids} do not start with bos, eos, pad = 0, 1, 2")
    # DeepSeek-R1 keeps <think> and </think> as added tokens that are *not* special, so a
    # decode that skips special tokens keeps them (the server splits reasoning on them)
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in THINK_TOKENS:
            added["special"] = False
    tok = Tokenizer.from_str(json.dumps(spec))
    # The fast tokenizer class in transformers only adds what the post-processor adds.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def tokenizer_config(model_max_length: int, chat_template: str = CHAT_TEMPLATE) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast; the chat template is
    DeepSeek-V3's without tools unless given (e.g. hetero.server.templates.THINK_TEMPLATE)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }


def write_tokenizer(
    out_dir: str | Path,
    vocab_size: int,
    *,
    model_max_length: int = 512,
    chat_template: str = CHAT_TEMPLATE,
) -> None:
    """A tokenizer trained on the fixed corpus, saved with `save_tokenizer`."""
    save_tokenizer(train_tokenizer(vocab_size), out_dir, model_max_length, chat_template)


def save_tokenizer(
    tok: Tokenizer, out_dir: str | Path, model_max_length: int, chat_template: str = CHAT_TEMPLATE
) -> None:
    """tokenizer.json + tokenizer_config.json that transformers.AutoTokenizer loads offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    config = tokenizer_config(model_max_length, chat_template)
    text = json.dumps(config, indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(text + "\n")
