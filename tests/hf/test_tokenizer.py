"""llama.cpp tokenizes as transformers and as the SentencePiece model the vocabulary came from."""

from __future__ import annotations

import pytest

STRINGS = [
    "Hello world",
    "tabs\tand\nnewlines\n\n",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "unicode: naïve café, Ελληνικά, русский, 日本語, emoji 🦊🔥",
    "code: def f(x): return x**2 # comment",
    "a sentence that ends with the eos token</s>",
    "",
]

# Runs of spaces before a word: transformers' tokenizer.json (its BPE merges
# are derived from the SentencePiece scores on conversion) merges "▁▁" where
# SentencePiece itself, and llama.cpp, merge "▁word". llama.cpp follows the
# SentencePiece model, which is the tokenizer the checkpoint was trained with.
SPACE_RUNS = [
    "  leading spaces and   runs of   spaces  ",
    "x = 2  # two spaces before a comment",
]


@pytest.fixture(scope="module")
def llm(converted):
    from llama_cpp import Llama

    return Llama(model_path=str(converted("f16")), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def sentencepiece(tiny_model_dir):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))


@pytest.mark.parametrize("text", STRINGS)
def test_tokenizes_as_transformers(llm, hf_tokenizer, text):
    # transformers parses special tokens written in text; so does llama.cpp with special=True.
    expected = hf_tokenizer(text).input_ids
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == expected


@pytest.mark.parametrize("text", STRINGS + SPACE_RUNS)
def test_plain_text_tokenizes_as_sentencepiece(llm, sentencepiece, text):
    expected = [sentencepiece.bos_id()] + sentencepiece.encode(text)
    assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == expected


@pytest.mark.parametrize("text", SPACE_RUNS)
def test_space_runs_follow_sentencepiece_where_transformers_differs(llm, hf_tokenizer, sentencepiece, text):
    llama = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    assert llama == [sentencepiece.bos_id()] + sentencepiece.encode(text)
    # If transformers ever agrees with SentencePiece here, move the string to STRINGS.
    assert hf_tokenizer(text).input_ids != llama


@pytest.mark.parametrize("text", STRINGS[:5])
def test_detokenize_round_trips(llm, hf_tokenizer, text):
    # With the BOS in front, both engines drop the SentencePiece space prefix of the first word.
    ids = hf_tokenizer(text).input_ids
    assert llm.detokenize(ids, special=False).decode("utf-8") == hf_tokenizer.decode(ids, skip_special_tokens=True)
