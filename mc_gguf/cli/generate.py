"""mc-gguf run | chat: generate from a GGUF on the patched runtime, with Online Dynamic Pruning."""

from __future__ import annotations

import argparse
import io
import sys

from mc_gguf.cli.common import (
    add_command,
    add_generation_flags,
    llama_load_kwargs,
    print_expert_stats,
    sampling_kwargs,
)

# Each sampler's default: llama-cpp-python's create_completion (run, greedy unless --temp) and its chat
# handlers' (chat, at a temperature of 0.7), as the commands always used them.
RUN_SAMPLING = {"temperature": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}
CHAT_SAMPLING = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}


def add_parsers(commands) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    run_parser = add_command(commands, "run", "Generate text from a GGUF once.",
                             "example: mc-gguf run mixtral-f16.gguf -p 'The capital of France is' -n 16\n"
                             "         mc-gguf run -m mixtral-q4.gguf -p 'Once upon a time' -n 64 -c 4096 -ngl 99 "
                             "--cpu-moe")
    add_generation_flags(run_parser, 32, "context length (default: the model's, at most 4096): a prompt that "
                         "fills it is refused; when the prompt leaves less room than -n, the text stops at the "
                         "context's end and a note on stderr says so", RUN_SAMPLING)
    run_parser.add_argument("-p", "--prompt", required=True, help="the prompt")
    run_parser.set_defaults(func=run)

    chat_parser = add_command(commands, "chat", "Chat with a GGUF using its chat template; prints the pruned share "
                              "of expert slots at the end.",
                              "example: mc-gguf chat mixtral-q4.gguf            (ODP as the file says)\n"
                              "         mc-gguf chat mixtral-q4.gguf --mu 0.4   (one threshold for every layer)")
    add_generation_flags(chat_parser, 256, "context length (default: the model's, at most 4096): when the "
                         "conversation and room for a reply of -n tokens outgrow it, the oldest turns are dropped "
                         "(the system message stays) and a note on stderr says so; a message that cannot fit even "
                         "alone is refused and the chat goes on", CHAT_SAMPLING)
    chat_parser.add_argument("--system", help="a system message")
    chat_parser.set_defaults(func=chat)
    return run_parser, chat_parser


def run(args: argparse.Namespace) -> None:
    from mc_gguf.evaluate.run import complete
    from mc_gguf.loader.model import load

    _tolerant_stdio()
    prompt = _decoded(args.prompt, "run", "the prompt")
    llm = load(args.model, odp=not args.no_odp, mu=args.mu, seed=args.seed, **llama_load_kwargs(args))
    completion = complete(llm, prompt, args.max_tokens, seed=args.seed, **sampling_kwargs(args))
    print(prompt + completion.text)
    if completion.cut:
        print(f"mc-gguf run: stopped at the end of the context ({completion.n_ctx} tokens: {completion.prompt_tokens} "
              f"of prompt, {completion.tokens} generated); --ctx makes room for more", file=sys.stderr)
    print_expert_stats(llm.expert_stats())


def chat(args: argparse.Namespace) -> None:
    from mc_gguf.errors import ContextOverflowError
    from mc_gguf.evaluate.run import chat_formatter, chat_reply, fit_chat
    from mc_gguf.loader.model import load

    llm = load(args.model, odp=not args.no_odp, mu=args.mu, seed=args.seed, **llama_load_kwargs(args))
    formatter = chat_formatter(llm)
    _tolerant_stdio()
    messages = []
    if args.system:
        messages.append({"role": "system", "content": _decoded(args.system, "chat", "the system message")})
    print("mc-gguf chat: an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        message = {"role": "user", "content": _decoded(line, "chat", "the message")}
        try:
            prompt = fit_chat(llm, formatter, messages + [message], args.max_tokens)
        except ContextOverflowError as exc:
            print(f"mc-gguf chat: {exc}", file=sys.stderr)
            continue
        if prompt.dropped:
            print(f"mc-gguf chat: the conversation, with room for a reply of {args.max_tokens} tokens, is longer "
                  f"than the context ({prompt.n_ctx} tokens); dropped the oldest {prompt.dropped} "
                  f"turn{'s' if prompt.dropped > 1 else ''}", file=sys.stderr)
        if prompt.max_tokens < args.max_tokens:
            print(f"mc-gguf chat: the context ({prompt.n_ctx} tokens) has room for a reply of only {prompt.max_tokens} "
                  "tokens; it stops at the context's end", file=sys.stderr)
        reply = []
        for piece in chat_reply(llm, formatter, prompt, **sampling_kwargs(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages = prompt.messages + [{"role": "assistant", "content": "".join(reply)}]
    print_expert_stats(llm.expert_stats())


def _decoded(text: str, command: str, what: str) -> str:
    """``text`` with the bytes that were not UTF-8 replaced by U+FFFD, and a note on stderr when there were some."""
    from mc_gguf.evaluate.run import replace_undecodable

    text, replaced = replace_undecodable(text)
    if replaced:
        print(f"mc-gguf {command}: {what} is not valid UTF-8; {replaced} undecodable byte(s) replaced by U+FFFD",
              file=sys.stderr)
    return text


def _tolerant_stdio() -> None:
    """stdin hands bytes that are not UTF-8 over as lone surrogates (replace_undecodable then replaces them, with
    a note), and stdout prints '?' for what its encoding lacks: neither ends the command with an error."""
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "replace")):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=errors)
