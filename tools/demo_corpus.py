"""The demo model's data: the Python standard library's own source, offline and deterministic.

Files are split once into training and held-out sets by a hash of their relative path, so a file
keeps its side across Python versions. The held-out files never reach the tokenizer or the model.
Training documents are whole files plus chat examples made from the functions' docstrings
(request: the docstring's summary; answer: the function without its docstring).
"""

from __future__ import annotations

import ast
import hashlib
import random
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from hetero.testing.tokenizer import (
    ASSISTANT,
    BOS,
    BOS_ID,
    CHAT_TEMPLATE,
    EOS_ID,
    PAD_ID,
)

# Tests, GUI code, generated tables (codec maps, the pydoc topic strings) and installed packages.
EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "encodings",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "__pycache__",
    }
)
HELDOUT_EVERY = 20  # one file in 20, by the hash of its path
IGNORE = -100  # label of a token that is not trained on (transformers' ignore_index)
BIGRAM_K = 0.01  # add-k smoothing of the baseline; near the best k for an 8K vocabulary
MAX_ANSWER_LINES = 60
MAX_REQUEST_CHARS = 160


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: tuple[str, ...]  # relative paths, sorted
    heldout: tuple[str, ...]
    texts: dict[str, str]
    num_files: int  # in the whole standard library, before --limit-files
    files_sha256: str  # of the sorted list of all relative paths
    content_sha256: str  # of all paths and texts

    def describe(self) -> dict:
        return {
            "source": "Python standard library *.py (sysconfig stdlib)",
            "python": sys.version.split()[0],
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "heldout_rule": f"int(sha256(relative path)[:8], 16) % {HELDOUT_EVERY} == 0",
            "num_files_total": self.num_files,
            "files_sha256": self.files_sha256,
            "content_sha256": self.content_sha256,
            "train_files": len(self.train),
            "train_chars": sum(len(self.texts[f]) for f in self.train),
            "heldout_chars": sum(len(self.texts[f]) for f in self.heldout),
        }


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


def load_corpus(root: str | Path | None = None, limit_files: int | None = None) -> Corpus:
    """All UTF-8 *.py files under the stdlib outside EXCLUDED_DIRS. `limit_files` keeps that many
    training files, evenly spaced in the sorted list, and one held-out file per HELDOUT_EVERY."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    texts: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        try:
            texts[rel.as_posix()] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    names = sorted(texts)
    if not names:
        raise RuntimeError(f"{root}: no standard-library sources found")
    content = hashlib.sha256()
    for name in names:
        content.update(f"{name}\0{texts[name]}\0".encode())
    train = [n for n in names if not is_heldout(n)]
    heldout = [n for n in names if is_heldout(n)]
    if limit_files:
        train = _spread(train, limit_files)
        heldout = _spread(heldout, max(1, limit_files // HELDOUT_EVERY))
    return Corpus(
        root=root,
        train=tuple(train),
        heldout=tuple(heldout),
        texts={n: texts[n] for n in train + heldout},
        num_files=len(names),
        files_sha256=hashlib.sha256("\n".join(names).encode()).hexdigest(),
        content_sha256=content.hexdigest(),
    )


def _spread(items: list[str], n: int) -> list[str]:
    step = max(1, len(items) // n)
    return items[::step][:n]


# --- chat examples -----------------------------------------------------------------------------


class ChatExample(NamedTuple):
    request: str  # the docstring's summary
    answer: str  # the function's source without its docstring, dedented


def chat_examples(source: str) -> list[ChatExample]:
    """One example per function or method with a usable docstring summary and a body besides it."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        request = _summary(ast.get_docstring(node))
        doc = node.body[0]
        if request is None or len(node.body) < 2 or doc.lineno <= node.lineno:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        kept = lines[start : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
        if len(kept) > MAX_ANSWER_LINES:
            continue
        out.append(ChatExample(request, textwrap.dedent("".join(kept)).rstrip() + "\n"))
    return out


def _summary(doc: str | None) -> str | None:
    """The docstring's first paragraph on one line, if it reads like a request."""
    if not doc:
        return None
    text = " ".join(doc.strip().split("\n\n")[0].split())
    if len(text) > MAX_REQUEST_CHARS or len(text.split()) < 3 or not text[0].isalpha():
        return None
    return text


def chat_renderer():
    """DeepSeek-V3's chat template, rendered as transformers renders it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(CHAT_TEMPLATE)

    def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
        return template.render(
            messages=messages, bos_token=BOS, add_generation_prompt=add_generation_prompt
        )

    return render


# --- documents, packing ------------------------------------------------------------------------


class Document(NamedTuple):
    ids: list[int]
    trained: list[bool]  # which tokens carry a loss


def plain_documents(tok: Tokenizer, texts: list[str]) -> list[Document]:
    """bos, the text, eos. Bos is never a target: it always follows the previous eos."""
    docs = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = [BOS_ID] + enc.ids + [EOS_ID]
        docs.append(Document(ids, [False] + [True] * (len(ids) - 1)))
    return docs


def chat_documents(tok: Tokenizer, examples: list[ChatExample]) -> list[Document]:
    """The rendered conversations; only the answers and their eos are targets."""
    render, heads, tails = chat_renderer(), [], []
    for ex in examples:
        messages = [{"role": "user", "content": ex.request}]
        prompt = render(messages, add_generation_prompt=True)
        full = render(messages + [{"role": "assistant", "content": ex.answer}])
        assert full.startswith(prompt) and prompt.endswith(ASSISTANT), (prompt, full)
        heads.append(prompt)
        tails.append(full[len(prompt) :])
    heads_enc = tok.encode_batch(heads, add_special_tokens=False)
    tails_enc = tok.encode_batch(tails, add_special_tokens=False)
    return [
        Document(h.ids + t.ids, [False] * len(h.ids) + [True] * len(t.ids))
        for h, t in zip(heads_enc, tails_enc)
    ]


def training_documents(
    tok: Tokenizer, corpus: Corpus, chat_fraction: float, seed: int
) -> tuple[list[Document], dict]:
    """Every training file, plus chat examples (chosen in a seeded order) up to `chat_fraction`
    of all tokens, or all of them if there are fewer."""
    plain = plain_documents(tok, [corpus.texts[f] for f in corpus.train])
    examples = [ex for f in corpus.train for ex in chat_examples(corpus.texts[f])]
    random.Random(seed).shuffle(examples)
    chat = chat_documents(tok, examples)
    plain_tokens = sum(len(d.ids) for d in plain)
    budget = plain_tokens * chat_fraction / (1 - chat_fraction)
    chat_tokens, n = 0, 0
    while n < len(chat) and chat_tokens < budget:
        chat_tokens += len(chat[n].ids)
        n += 1
    stats = {
        "plain_documents": len(plain),
        "plain_tokens": plain_tokens,
        "chat_examples_available": len(examples),
        "chat_examples": n,
        "chat_tokens": chat_tokens,
        "chat_fraction": round(chat_tokens / max(1, plain_tokens + chat_tokens), 4),
    }
    return plain + chat[:n], stats


def pack(docs: list[Document], ctx: int, *, pad_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated documents cut into rows of ctx tokens -> (input_ids, labels), both [N, ctx].

    labels hold the token where it is trained, IGNORE elsewhere (transformers shifts them). The
    remainder is dropped, or with pad_last padded with pad tokens that are never targets."""
    ids = torch.tensor([t for d in docs for t in d.ids], dtype=torch.long)
    trained = torch.tensor([m for d in docs for m in d.trained], dtype=torch.bool)
    labels = torch.where(trained, ids, IGNORE)
    n = len(ids) // ctx
    if pad_last and len(ids) % ctx:
        extra = ctx - len(ids) % ctx
        ids = torch.cat([ids, torch.full((extra,), PAD_ID)])
        labels = torch.cat([labels, torch.full((extra,), IGNORE)])
        n += 1
    return ids[: n * ctx].view(n, ctx), labels[: n * ctx].view(n, ctx)


def batches(docs: list[Document], ctx: int, batch: int, seed: int):
    """(epoch, input_ids, labels) [batch, ctx] forever. Each epoch shuffles the documents (seeded)
    and packs them anew, so rows start at different offsets in each epoch."""
    epoch = 0
    while True:
        order = list(range(len(docs)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        ids, labels = pack([docs[i] for i in order], ctx, pad_last=False)
        for i in range(0, len(ids) - batch + 1, batch):
            yield epoch, ids[i : i + batch], labels[i : i + batch]
        epoch += 1


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token loss of logits [N, T, V] over the trained targets of labels [N, T]
    (position t predicts labels[:, t + 1]), and how many targets there were."""
    targets = labels[:, 1:].flatten()
    logits = logits[:, :-1].flatten(0, 1).float()
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    return float(total), int((targets != IGNORE).sum())


# --- bigram baseline ---------------------------------------------------------------------------


def bigram_perplexity(
    train_docs: list[Document],
    ids: torch.Tensor,
    labels: torch.Tensor,
    vocab: int,
    k: float = BIGRAM_K,
) -> float:
    """Add-k bigram P(b | a) = (c(a, b) + k) / (c(a) + k * vocab), counted over consecutive
    tokens of the training documents, scored on the targets of (ids, labels) [N, T] that the
    language model scores: position t >= 1 with labels[:, t] != IGNORE, context ids[:, t - 1]."""
    prev = torch.cat([torch.tensor(d.ids[:-1], dtype=torch.long) for d in train_docs])
    nxt = torch.cat([torch.tensor(d.ids[1:], dtype=torch.long) for d in train_docs])
    keys, counts = torch.unique(prev * vocab + nxt, return_counts=True)  # sorted keys
    context_counts = torch.bincount(prev, minlength=vocab).double()
    mask = labels[:, 1:] != IGNORE
    a, b = ids[:, :-1][mask], ids[:, 1:][mask]
    query = a * vocab + b
    pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
    pair = torch.where(keys[pos] == query, counts[pos], 0).double()
    logp = torch.log(pair + k) - torch.log(context_counts[a] + k * vocab)
    return float(torch.exp(-logp.mean()))
