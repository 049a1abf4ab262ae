"""Generation on a loaded model (loader/model.py ``load``): completions, chat with the file's template, what fits
in the context."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mc_gguf.errors import ChatTemplateError, ContextOverflowError, InvalidValueError
from mc_gguf.loader.model import CHAT_TEMPLATE_KEY, load, template_reason
from mc_gguf.prune import rule as pruning


def context_size(llm) -> int:
    """The tokens ``llm`` holds: the n_ctx it was made with (llama.cpp pads its cache to a multiple of 256, but
    llama-cpp-python keeps n_ctx tokens, llama.py's input_ids, and fails past them)."""
    return min(llm.n_ctx(), llm.context_params.n_ctx)


def prompt_tokens(llm, prompt: str) -> list[int]:
    """``prompt`` tokenized as llama-cpp-python's create_completion does a text prompt: a BOS where the
    vocabulary adds one, special tokens parsed."""
    return llm.tokenize(_utf8(prompt, "the prompt"), add_bos=True, special=True)


@dataclass(frozen=True)
class Completion:
    """What ``complete`` generated, and whether the context's end cut it short of ``max_tokens``."""

    text: str
    prompt_tokens: int
    tokens: int
    n_ctx: int
    cut: bool


def complete(llm, prompt: str, max_tokens: int = 32, *, temperature: float = 0.0, seed: int = 0,
             **sampling) -> Completion:
    """Continue ``prompt`` by up to ``max_tokens`` tokens (``sampling``: create_completion's top_k, top_p, min_p,
    repeat_penalty, ...).

    A prompt that leaves no room in the context is a ContextOverflowError; one that leaves less than
    ``max_tokens`` is continued to the context's end (``Completion.cut``), as llama-cpp-python's
    create_completion and llama.cpp's llama-cli without context shift stop there.
    """
    tokens = prompt_tokens(llm, prompt)
    n_ctx = context_size(llm)
    if len(tokens) >= n_ctx:
        raise ContextOverflowError(
            f"the prompt takes {len(tokens)} tokens and the context holds {n_ctx}, with none left for the reply: "
            f"give a larger --ctx (--ctx {len(tokens) + max_tokens} holds it and {max_tokens} more; the model was "
            f"trained on {llm._model.n_ctx_train()}) or a shorter prompt")
    room = n_ctx - len(tokens)
    out = llm.create_completion(tokens, max_tokens=min(max_tokens, room), temperature=temperature, seed=seed,
                                **sampling)
    generated = out["usage"]["completion_tokens"]
    return Completion(out["choices"][0]["text"], len(tokens), generated, n_ctx,
                      cut=room < max_tokens and generated >= room)


def generate(path: str | Path, prompt: str, max_tokens: int = 32, *, temperature: float = 0.0, seed: int = 0,
             odp: bool = True, mu: float | None = None, **llama_kwargs) -> tuple[str, pruning.SlotCounts]:
    """Generate a continuation of ``prompt`` (see ``complete``); return it with the expert slot counts."""
    llm = load(path, odp=odp, mu=mu, seed=seed, **llama_kwargs)
    completion = complete(llm, prompt, max_tokens, temperature=temperature, seed=seed)
    return completion.text, llm.expert_stats()


# ------------------------------------------------------------------ chat


def chat_formatter(llm):
    """How ``llm`` renders a conversation (a llama_cpp ChatFormatter): the file's own chat template (the one
    llama.cpp's --jinja renders; llama-cpp-python would swap a few it recognises for built-in formats), or, for a
    file without one, llama-cpp-python's fallback (its "llama-2" format).

    A template jinja cannot compile is a ChatTemplateError here; one it cannot render, when ``fit_chat``
    renders it.
    """
    from llama_cpp import llama_chat_format

    problem = getattr(llm, "chat_template_problems", {}).get(CHAT_TEMPLATE_KEY)
    if problem:
        raise ChatTemplateError(f"{llm.model_path}: the model's chat template cannot be used: {problem}")
    template = llm.metadata.get(CHAT_TEMPLATE_KEY)
    if template is None:
        return llama_chat_format.format_llama2
    # the tokens and stop id that Llama.__init__ gives the formatters of its chat handlers
    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
        bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
        stop_token_ids=[eos_id],
    )


@dataclass(frozen=True)
class ChatPrompt:
    """The conversation ``fit_chat`` sends for a reply, and what it counted."""

    messages: list[dict]  # the system messages, the turns kept and the new user message
    tokens: list[int]  # the messages rendered by the chat template and tokenized by the model
    dropped: int  # the oldest turns (a user message and what followed it) left out to fit
    max_tokens: int  # the room for the reply: the one asked for, or what the context has left
    n_ctx: int


def fit_chat(llm, formatter, messages: Sequence[dict], max_tokens: int) -> ChatPrompt:
    """The conversation to send for the reply to ``messages``' last (user) message.

    ``messages`` are the system messages, then turns, each a user message and what followed it. The oldest
    whole turns are dropped (the system messages stay) until the rendered conversation, counted by the model's
    tokenizer, leaves ``max_tokens`` free in the context. When even the system messages and the last message
    leave less, the reply gets what is left (it stops at the context's end); when they leave nothing, this
    is a ContextOverflowError and ``messages`` are as good as unsent.
    """
    messages = list(messages)
    n_head = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    starts = [i for i in range(n_head, len(messages)) if messages[i].get("role") == "user"] or [len(messages) - 1]
    n_ctx = context_size(llm)
    for dropped, start in enumerate(starts):
        kept = messages[:n_head] + messages[start:]
        tokens = _chat_tokens(llm, formatter, kept)
        if len(tokens) + max_tokens <= n_ctx:
            return ChatPrompt(kept, tokens, dropped, max_tokens, n_ctx)
    if len(tokens) < n_ctx:
        return ChatPrompt(kept, tokens, dropped, n_ctx - len(tokens), n_ctx)
    what = "the system message and this message take" if n_head else "this message takes"
    raise ContextOverflowError(f"{what} {len(tokens)} tokens and the context holds {n_ctx}, with none left for "
                               "the reply: write a shorter message, or give a larger --ctx")


def chat_reply(llm, formatter, prompt: ChatPrompt, *, temperature: float = 0.7, **sampling) -> Iterator[str]:
    """Stream the reply to ``prompt`` piece by piece, through llama-cpp-python's chat handler for ``formatter``
    (the one create_chat_completion would use): its sampling defaults, stop strings and stop tokens."""
    from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

    handler = chat_formatter_to_chat_completion_handler(formatter)
    for chunk in handler(llama=llm, messages=prompt.messages, max_tokens=prompt.max_tokens,
                         temperature=temperature, stream=True, **sampling):
        yield chunk["choices"][0]["delta"].get("content") or ""


def _chat_tokens(llm, formatter, messages: list[dict]) -> list[int]:
    """``messages`` rendered by ``formatter`` and tokenized as llama-cpp-python's chat handler does
    (llama_chat_format.chat_formatter_to_chat_completion_handler)."""
    try:
        result = formatter(messages=messages)
    except Exception as exc:  # noqa: BLE001 - whatever the template raises (jinja's errors, raise_exception's)
        raise ChatTemplateError(f"{llm.model_path}: the model's chat template cannot be used: "
                                f"{template_reason(exc)}") from None
    return llm.tokenize(_utf8(result.prompt, "the conversation"), add_bos=not result.added_special, special=True)


# ------------------------------------------------------------------ text from outside

_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_undecodable(text: str) -> tuple[str, int]:
    """``text`` with its lone surrogates replaced by U+FFFD, and how many there were.

    Python hands bytes that are not UTF-8 over as lone surrogates (surrogateescape: command-line arguments,
    and stdin in the C locale or after ``reconfigure(errors="surrogateescape")``); the tokenizer needs UTF-8.
    """
    return _SURROGATE.subn("\ufffd", text)


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValueError(f"{what} is not valid text: it holds lone surrogates (bytes that are not UTF-8); "
                                "replace_undecodable replaces them") from None
