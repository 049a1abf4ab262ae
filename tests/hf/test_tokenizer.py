"""llama.cpp tokenizes as transformers and as the SentencePiece model the vocabulary came from."""

from __future__ import annotations

import shutil

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


@pytest.fixture(scope="module")
def json_only(tiny_model_dir, tmp_path_factory):
    """The tiny model as transformers 5 saves a Mixtral fine-tune: tokenizer.json, no tokenizer.model."""
    from mc_gguf.gguf_io.convert import convert

    folder = tmp_path_factory.mktemp("json-only") / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("tokenizer.model"))
    return folder, convert(folder, folder.parent / "f16.gguf", "f16", progress=False)


@pytest.fixture(scope="module")
def json_only_llm(json_only):
    from llama_cpp import Llama

    return Llama(model_path=str(json_only[1]), vocab_only=True, verbose=False)


# Space runs inside the text; at its very start llama.cpp prepends "▁" to the leading spaces as SentencePiece
# does, where tokenizer.json's Metaspace(prepend_scheme="first") prepends nothing.
INNER_SPACE_RUNS = [text for text in SPACE_RUNS if not text.startswith(" ")] + ["runs of   spaces  inside"]


@pytest.mark.parametrize("text", STRINGS + INNER_SPACE_RUNS)
def test_tokenizer_json_alone_tokenizes_as_transformers(json_only, json_only_llm, text):
    """Without tokenizer.model the reference is the tokenizer the folder has: transformers' from tokenizer.json
    (space runs included, where it differs from the SentencePiece model: the merge ranks are followed)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(json_only[0]))
    assert json_only_llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == tokenizer(text).input_ids


def test_tokenizer_json_alone_gives_the_same_model(json_only, converted):
    """Same pieces, types and special tokens as the tokenizer.model conversion; only the scores are derived."""
    import gguf

    def vocab(path):
        fields = gguf.GGUFReader(path).fields
        return {key: fields[key].contents() for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                                         "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                                         "tokenizer.chat_template")}

    assert vocab(json_only[1]) == vocab(converted("f16"))
