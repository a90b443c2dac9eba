from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hetero.engine.detokenizer import (
    REPLACEMENT,
    SEED_TOKENS,
    Delta,
    IncrementalDetokenizer,
    decodes_by_concatenation,
    first_stop,
    partial_stop,
)

DEMO = "/work/main/hetero/demo"
EOS, USER = "<｜end▁of▁sentence｜>", "<｜User｜>"
TEXTS = (
    "café au lait, naïve résumé",
    "日本語のテキスト",
    "smile 🙂🙂 done",
    "e\u0301 a\u0300 n\u0303 combining marks",
    "mixed: é日🙂\u0301 end",
)


@pytest.fixture(scope="module")
def demo_tok():
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(params=["demo", "tiny_v3"])
def tok(request, demo_tok):
    if request.param == "demo":
        return demo_tok
    return AutoTokenizer.from_pretrained(request.getfixturevalue("tiny_v3"))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[Delta]:
    return [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]


def splits_a_character(tok, ids: list[int]) -> bool:
    return any(tok.decode(ids[:n]).endswith(REPLACEMENT) for n in range(1, len(ids)))


def test_both_tokenizers_take_the_window_path(tok):
    assert decodes_by_concatenation(tok)


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_never_broken(tok, text, chunk):
    ids = encode(tok, text)
    assert tok.decode(ids) == text
    assert splits_a_character(tok, ids)  # else nothing here is ever held back
    detok = IncrementalDetokenizer(tok)
    shown = ""
    for n in range(chunk, len(ids) + chunk, chunk):
        delta = detok.push(ids[n - chunk : n])
        assert REPLACEMENT not in delta.text and delta.stopped is None
        shown += delta.text
        # all that is stable is shown at once: only the unfinished character waits
        assert shown == detok.text == tok.decode(ids[:n]).rstrip(REPLACEMENT)
    assert detok.flush() == ""
    assert detok.text == shown == text
    assert detok.output_ids == ids


def test_unfinished_character_comes_out_at_flush(tok):
    ids = encode(tok, "ok 🙂")
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith(REPLACEMENT))
    detok = IncrementalDetokenizer(tok)
    assert "".join(d.text for d in stream(detok, ids[:cut])) == "ok "
    assert detok.flush() == REPLACEMENT
    assert detok.text == tok.decode(ids[:cut])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    eos, user = tok.convert_tokens_to_ids([EOS, USER])
    e = encode(tok, "é")
    assert len(e) == 2
    ids = encode(tok, "hi") + [eos] + encode(tok, " there") + [user, e[0], user, e[1], eos]
    for chunk in (1, 2, 3):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        text = "".join(d.text for d in stream(detok, ids, chunk)) + detok.flush()
        assert text == tok.decode(ids, skip_special_tokens=skip)
    if skip:  # the skipped tokens vanish and the two halves of é meet again
        assert text == "hi thereé"
    else:
        assert text == f"hi{EOS} there{USER}{REPLACEMENT}{USER}{REPLACEMENT}{EOS}"


def pick(rng: random.Random, vocab: int) -> int:
    return rng.randrange(300) if rng.random() < 0.3 else rng.randrange(vocab)


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_in_random_chunks_match_decode(tok, skip):
    """Stray bytes, unfinished characters, special tokens: the concatenation is still decode()."""
    rng = random.Random(0)
    for _ in range(20):
        # 30% from the specials and the 256 single-byte tokens, which split characters
        ids = [pick(rng, len(tok)) for _ in range(60)]
        prompt = [rng.randrange(300) for _ in range(7)]  # may end inside a character
        detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
        out, i = [], 0
        while i < len(ids):
            step = rng.randint(1, 4)
            out.append(detok.push(ids[i : i + step]).text)
            i += step
        assert REPLACEMENT not in "".join(out)[-1:]  # a held tail is never shown early
        out.append(detok.flush())
        assert "".join(out) == tok.decode(ids, skip_special_tokens=skip)


def test_prompt_seeds_the_window_but_is_not_output(demo_tok):
    chat = [{"role": "user", "content": "Grüße"}]
    prompt_text = demo_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    prompt = encode(demo_tok, prompt_text)
    out = encode(demo_tok, " Hello wörld")
    for seed in (prompt, prompt + encode(demo_tok, "é")[:1]):  # the second ends inside é
        detok = IncrementalDetokenizer(demo_tok, prompt_ids=seed)
        text = "".join(d.text for d in stream(detok, out)) + detok.flush()
        assert text == " Hello wörld"
        assert detok.output_ids == out


def test_window_stays_short(demo_tok, monkeypatch):
    lengths = []
    decode = demo_tok.decode

    def spy(ids, **kwargs):
        lengths.append(len(ids))
        return decode(ids, **kwargs)

    monkeypatch.setattr(demo_tok, "decode", spy)
    ids = encode(demo_tok, "日本語 🙂 and some ascii words " * 20)
    detok = IncrementalDetokenizer(demo_tok, prompt_ids=list(range(5, 40)))
    text = "".join(d.text for d in stream(detok, ids)) + detok.flush()
    assert text == decode(ids)
    assert len(ids) > 300 and max(lengths) <= SEED_TOKENS + 4  # an emoji is 4 byte tokens


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "hello", "world", ",", ".", "'", "s", "n't", "do", "##ing", "it"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=True)


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 style: ▁ for spaces, <0x..> byte tokens, the first leading space stripped."""
    pieces = ["<unk>", "▁hello", "▁w", "orld", "<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x99>"]
    pieces += ["<0x82>", "▁", ".", "▁a"]
    backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.mark.parametrize(
    "make, ids",
    [
        (wordpiece_tokenizer, [1, 3, 2, 9, 4, 8, 7, 10, 5, 6, 1, 5, 2, 3, 4]),
        (metaspace_tokenizer, [1, 2, 3, 10, 4, 5, 11, 12, 6, 7, 8, 9, 12, 4, 5, 11]),
    ],
)
def test_other_decoders_fall_back_to_the_whole_output(make, ids):
    tok = make()
    assert not decodes_by_concatenation(tok)
    # why: decoding token by token and joining the pieces does not give decode()
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)
    for chunk in (1, 2):
        detok = IncrementalDetokenizer(tok, prompt_ids=[1, 2])
        deltas = stream(detok, ids, chunk)
        assert all(REPLACEMENT not in d.text for d in deltas)
        assert "".join(d.text for d in deltas) + detok.flush() == tok.decode(ids)


def push_text(tok, text: str, stop: tuple[str, ...], chunk: int = 1):
    detok = IncrementalDetokenizer(tok, stop=stop)
    return detok, stream(detok, encode(tok, text), chunk)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stop_string_spanning_tokens(tok, chunk):
    stop = "wörld"
    ids = encode(tok, "hello wörld and more")
    assert not any(stop in tok.decode([i]) for i in ids)  # it spans tokens
    detok, deltas = push_text(tok, "hello wörld and more", (stop,), chunk)
    shown = "".join(d.text for d in deltas)
    assert shown == "hello "
    assert deltas[-1].stopped == stop
    first = next(k for k, d in enumerate(deltas) if d.stopped)
    assert all(not d.text for d in deltas[first + 1 :])
    # the partial match was held: "hello " shows, "w" does not, until the match is known
    assert all(d.stopped is None and "w" not in d.text for d in deltas[:first])
    assert detok.flush() == "" and detok.text == "hello "
    assert detok.push(encode(tok, "x")) == Delta("", stop)
    assert tok.decode(detok.output_ids).startswith("hello wörld")
    assert len(detok.output_ids) < len(ids)


def test_partial_match_that_diverges_is_shown_in_full(tok):
    text = "the STOP? not yet, STOP! now"
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok, stop=("STOP!",))
    held = False  # some step showed less than decode() gave: the partial "STOP" waited
    for n in range(1, len(ids) + 1):
        delta = detok.push(ids[n - 1 : n])
        if delta.stopped:
            break
        held |= detok.text != tok.decode(ids[:n])
    assert held and delta.stopped == "STOP!"
    assert detok.text == "the STOP? not yet, "
    # no full match at all: everything comes out, the last partial at flush
    detok, deltas = push_text(tok, "a STOP? b STO", ("STOP!",))
    assert "".join(d.text for d in deltas) == "a STOP? b "
    assert detok.flush() == "STO"
    assert detok.text == "a STOP? b STO" and detok.stopped is None


@pytest.mark.parametrize(
    "stop, hit",
    [
        (("world", "lo w"), "lo w"),  # "lo w" is complete first
        (("lo w", "world"), "lo w"),
        (("rld", "world"), "world"),  # both complete with the token holding "d"
        (("world", "rld"), "world"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 100])
def test_earliest_stop_wins(tok, stop, hit, chunk):
    detok, deltas = push_text(tok, "hello world", stop, chunk)
    assert deltas[-1].stopped == hit
    assert detok.text == "hello world"[: "hello world".index(hit)]


def test_first_stop_and_partial_stop():
    assert first_stop("abcd", ("cd", "bc")) == (1, "bc")
    assert first_stop("abcd", ("abc", "ab")) == (0, "abc")  # same place: the first listed
    assert first_stop("abcd", ("x",)) is None
    assert partial_stop("xxSTO", ("STOP", "OPEN", "O")) == 3
    assert partial_stop("xxSTOP", ("STOP",)) == 0  # a whole match is not a partial one
    assert partial_stop("ab", ()) == 0


@pytest.mark.parametrize("stop", ["🙂", "日本"])
def test_multibyte_stop_string(tok, stop):
    text = f"ok {stop} no"
    assert splits_a_character(tok, encode(tok, stop))
    detok, deltas = push_text(tok, text, (stop,))
    assert all(REPLACEMENT not in d.text for d in deltas)
    assert detok.text == "ok " and detok.stopped == stop and detok.flush() == ""


def test_stop_string_of_special_tokens_unskipped(demo_tok):
    user = demo_tok.convert_tokens_to_ids(USER)
    ids = encode(demo_tok, "answer") + [user] + encode(demo_tok, "q")
    detok = IncrementalDetokenizer(demo_tok, stop=(USER,), skip_special_tokens=False)
    assert detok.push(ids) == Delta("answer", USER)


def test_flush_ends_the_stream(demo_tok):
    detok = IncrementalDetokenizer(demo_tok, stop=("abc",))
    assert detok.push(encode(demo_tok, "x ab")) == Delta("x ", None)
    assert detok.flush() == "ab"
    assert detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.push([5])
    with pytest.raises(ValueError):
        IncrementalDetokenizer(demo_tok, stop=("",))
