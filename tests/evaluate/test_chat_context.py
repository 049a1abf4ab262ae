"""run and chat stay within the context, survive a broken chat template and text that is not UTF-8.

The library's counts are checked against the Hugging Face tokenizer's own rendering of the chat template; the
commands run as a user runs them (a subprocess, stdin piped) and must end cleanly: never a traceback, never
"this is a bug".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from mc_gguf.evaluate.run import (
    ChatTemplateError,
    ContextOverflowError,
    chat_formatter,
    chat_reply,
    complete,
    fit_chat,
    replace_undecodable,
)
from mc_gguf.loader.model import load
from mc_gguf.gguf_io.edit import MetadataDetails, rewrite_metadata

CTX = 64
SYSTEM = {"role": "system", "content": "You answer in one short sentence."}


def conversation(turns: int, latest: str = "And the next one?") -> list[dict]:
    messages = [SYSTEM]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Ship {i}?"}, {"role": "assistant", "content": "It sailed north."}]
    return messages + [{"role": "user", "content": latest}]


def reference_tokens(llm, hf_tokenizer, messages: list[dict]) -> list[int]:
    """The reference: the chat template as the model folder's tokenizer renders it, tokenized by the GGUF's
    tokenizer (llama.cpp's; the Hugging Face one splits "<s>[INST]" otherwise, without SentencePiece's space)."""
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@pytest.fixture(scope="module")
def llm(converted):
    return load(converted("f16"), n_ctx=CTX)


def with_template(src: Path, dst: Path, template: str) -> Path:
    return rewrite_metadata(src, dst, {"tokenizer.chat_template": MetadataDetails(gguf.GGUFValueType.STRING, template)})


def mc_gguf(*args, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mc_gguf.cli", *args], input=stdin, capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def stderr_of(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "this is a bug" not in err, err
    return err


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    err = stderr_of(result)
    assert result.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("mc-gguf: error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), err


# ------------------------------------------------------------ the library


def test_fit_chat_keeps_a_conversation_that_fits_as_it_is(llm, hf_tokenizer):
    messages = conversation(1, "Hi")
    prompt = fit_chat(llm, chat_formatter(llm), messages, max_tokens=8)
    assert prompt.dropped == 0 and prompt.messages == messages and prompt.max_tokens == 8
    assert prompt.tokens == reference_tokens(llm, hf_tokenizer, messages)


def test_fit_chat_drops_the_oldest_turns_as_few_as_fit_and_keeps_the_system_message(llm, hf_tokenizer):
    messages = conversation(6)
    assert len(reference_tokens(llm, hf_tokenizer, messages)) > CTX
    prompt = fit_chat(llm, chat_formatter(llm), messages, max_tokens=8)
    assert prompt.dropped >= 1
    assert prompt.messages == [SYSTEM] + messages[1 + 2 * prompt.dropped:]
    # counted by the model's tokenizer on the rendered template: what the Hugging Face tokenizer makes of it
    assert prompt.tokens == reference_tokens(llm, hf_tokenizer, prompt.messages)
    assert len(prompt.tokens) + 8 <= CTX
    one_more_turn = [SYSTEM] + messages[1 + 2 * (prompt.dropped - 1):]
    assert len(reference_tokens(llm, hf_tokenizer, one_more_turn)) + 8 > CTX


def test_a_message_that_cannot_fit_alone_is_a_context_overflow(llm):
    with pytest.raises(ContextOverflowError, match=f"the context holds {CTX}.*--ctx"):
        fit_chat(llm, chat_formatter(llm), conversation(2, "word " * 80), max_tokens=8)


def test_a_reply_with_less_room_than_asked_runs_to_the_context_end(llm):
    """Before, llama.cpp's cache (padded to 256) let llama-cpp-python run past its 64-token buffers."""
    prompt = fit_chat(llm, chat_formatter(llm), conversation(3), max_tokens=200)
    assert prompt.messages == [SYSTEM, conversation(3)[-1]] and prompt.dropped == 3
    assert prompt.max_tokens == CTX - len(prompt.tokens) < 200
    reply = "".join(chat_reply(llm, chat_formatter(llm), prompt, temperature=0.0))
    assert reply


def test_complete_refuses_a_prompt_that_fills_the_context(llm):
    with pytest.raises(ContextOverflowError, match=r"the prompt takes \d+ tokens and the context holds 64"):
        complete(llm, "word " * 100, 4)


def test_complete_stops_at_the_context_end(llm):
    completion = complete(llm, "word " * 40, 100)
    assert completion.cut and completion.n_ctx == CTX
    assert completion.prompt_tokens + completion.tokens == CTX
    assert not complete(llm, "word " * 40, 4).cut


def test_a_chat_template_jinja_cannot_parse_loads_and_is_refused_for_chat(converted, tmp_path):
    path = with_template(converted("f16"), tmp_path / "broken.gguf", "{% for m in messages %}{{ m['content'] }")
    llm = load(path, n_ctx=CTX)  # llama-cpp-python compiles the template while loading
    assert complete(llm, "Hello", 2).tokens == 2
    with pytest.raises(ChatTemplateError, match="chat template cannot be used: unexpected '}'"):
        chat_formatter(llm)


def test_undecodable_bytes_become_replacement_characters():
    text = b"hi \xff\xfe there \xc3\xa9".decode("utf-8", "surrogateescape")
    assert replace_undecodable(text) == ("hi \ufffd\ufffd there \u00e9", 2)
    assert replace_undecodable("plain") == ("plain", 0)


# ------------------------------------------------------------ the commands


def test_chat_drops_the_oldest_turns_of_a_long_conversation_and_ends_cleanly(converted):
    lines = [f"Tell me about ship number {i} and the sea it sailed." for i in range(6)]
    result = mc_gguf("chat", str(converted("f16")), "--ctx", str(CTX), "-n", "8", "--temperature", "0",
                     "--system", SYSTEM["content"], stdin="\n".join(lines).encode() + b"\n")
    err = stderr_of(result)
    assert result.returncode == 0, err
    assert f"longer than the context ({CTX} tokens); dropped the oldest" in err
    assert result.stdout.endswith(b"> ") and result.stdout.count(b"> ") >= len(lines) + 1  # all read, to EOF


def test_chat_refuses_a_message_too_long_for_the_context_and_goes_on(converted):
    stdin = b"Hi\n" + b"word " * 80 + b"\nHello again\n"
    result = mc_gguf("chat", str(converted("f16")), "--ctx", str(CTX), "-n", "4", "--temperature", "0", stdin=stdin)
    err = stderr_of(result)
    assert result.returncode == 0, err
    refusals = [line for line in err.splitlines() if f"the context holds {CTX}" in line]
    assert len(refusals) == 1 and refusals[0].startswith("mc-gguf chat: this message takes"), err
    assert result.stdout.endswith(b"> ") and result.stdout.count(b"> ") >= 4  # it went on, to EOF


def test_run_refuses_a_prompt_longer_than_the_context(converted):
    result = mc_gguf("run", str(converted("f16")), "--ctx", str(CTX), "-n", "4", "-p", "word " * 100)
    assert_one_line_error(result, "the prompt takes", f"the context holds {CTX}", "--ctx")
    assert result.stdout == b""


def test_run_stops_at_the_context_end_and_says_so(converted):
    result = mc_gguf("run", str(converted("f16")), "--ctx", str(CTX), "-n", "100", "-p", "word " * 40)
    err = stderr_of(result)
    assert result.returncode == 0 and f"stopped at the end of the context ({CTX} tokens" in err, err


def test_a_broken_chat_template_leaves_run_working_and_chat_refused_in_one_line(converted, tmp_path):
    unparsable = with_template(converted("f16"), tmp_path / "unparsable.gguf", "{% if messages %}{{ x }")
    unrenderable = with_template(converted("f16"), tmp_path / "unrenderable.gguf",
                                 "{{ raise_exception('roles must alternate user/assistant') }}")
    for path in (unparsable, unrenderable):
        result = mc_gguf("run", str(path), "-p", "Hello", "-n", "2")
        assert result.returncode == 0 and result.stdout.startswith(b"Hello"), stderr_of(result)
    assert_one_line_error(mc_gguf("chat", str(unparsable), stdin=b"Hi\n"),
                          str(unparsable), "the model's chat template cannot be used: unexpected '}' (line 1)")
    assert_one_line_error(mc_gguf("chat", str(unrenderable), stdin=b"Hi\n"),
                          "the model's chat template cannot be used: roles must alternate user/assistant")


@pytest.mark.parametrize("env", [{"LC_ALL": "C.UTF-8"}, {"LC_ALL": "C"}, {"PYTHONIOENCODING": "utf-8:strict"}],
                         ids=["c-utf8", "c", "strict"])
def test_chat_replaces_bytes_that_are_not_utf8(converted, env):
    stdin = b"hi \xff\xfe there\n\x00\x01\x80\xc3binary\x89PNG\r\n"
    result = mc_gguf("chat", str(converted("f16")), "--ctx", str(CTX), "-n", "2", stdin=stdin, env=env)
    err = stderr_of(result)
    assert result.returncode == 0, err
    assert "mc-gguf chat: the message is not valid UTF-8; 2 undecodable byte(s) replaced by U+FFFD" in err
    assert "mc-gguf chat: the message is not valid UTF-8; 3 undecodable byte(s) replaced by U+FFFD" in err


def test_run_replaces_bytes_of_the_prompt_that_are_not_utf8(converted):
    result = mc_gguf("run", str(converted("f16")), "-n", "2", "-p", b"caf\xe9 au lait")
    err = stderr_of(result)
    assert result.returncode == 0, err
    assert "the prompt is not valid UTF-8; 1 undecodable byte(s) replaced by U+FFFD" in err
    assert result.stdout.startswith("caf\ufffd au lait".encode())


@pytest.mark.parametrize("length", [2 ** 31 - 1, 2 ** 32 - 1])
def test_a_context_length_past_what_an_int32_holds_runs(converted, tmp_path, length):
    """llama-cpp-python tokenizes into a buffer of the model's whole training context (negative from 2^31 on, a
    ValueError; 8 GB below it): the runtime tokenizes into a buffer of the text's size (found by tests/fuzz)."""
    path = rewrite_metadata(converted("q8_0"), tmp_path / "long.gguf",
                            {"llama.context_length": MetadataDetails(gguf.GGUFValueType.UINT32, length)})
    result = mc_gguf("run", str(path), "-p", "The capital", "-n", "2")
    assert result.returncode == 0 and result.stdout.startswith(b"The capital"), stderr_of(result)
    llm = load(path, n_ctx=CTX)
    assert llm.tokenize(b"The capital", add_bos=True) == load(converted("q8_0"), n_ctx=CTX).tokenize(b"The capital")
