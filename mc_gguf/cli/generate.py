"""mc-gguf run | chat: generate from a GGUF on the patched runtime, with Online Dynamic Pruning."""

from __future__ import annotations

import argparse
import sys

from mc_gguf.cli.common import add_command, add_generation_flags, positive_int, print_expert_stats


def add_parsers(commands) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    run_parser = add_command(commands, "run", "Generate text from a GGUF once.",
                             "example: mc-gguf run mixtral-f16.gguf -p 'The capital of France is' -n 16")
    add_generation_flags(run_parser, max_tokens=32, temperature=0.0)
    run_parser.add_argument("-p", "--prompt", required=True, help="the prompt")
    run_parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    run_parser.set_defaults(func=run)

    chat_parser = add_command(commands, "chat", "Chat with a GGUF using its chat template; prints the pruned share "
                              "of expert slots at the end.",
                              "example: mc-gguf chat mixtral-q4.gguf            (ODP as the file says)\n"
                              "         mc-gguf chat mixtral-q4.gguf --mu 0.4   (one threshold for every layer)")
    add_generation_flags(chat_parser, max_tokens=256, temperature=0.7)
    chat_parser.add_argument("--system", help="a system message")
    chat_parser.add_argument("--ctx", type=positive_int, help="context length (default: the model's, at most 4096)")
    chat_parser.set_defaults(func=chat)
    return run_parser, chat_parser


def run(args: argparse.Namespace) -> None:
    from mc_gguf.evaluate.run import generate

    text, counts = generate(args.model, args.prompt, args.max_tokens, temperature=args.temperature,
                            seed=args.seed, odp=not args.no_odp, mu=args.mu, rpc=args.rpc, repack=args.repack)
    print(args.prompt + text)
    print_expert_stats(counts)


def chat(args: argparse.Namespace) -> None:
    from mc_gguf.evaluate.run import load

    llm = load(args.model, odp=not args.no_odp, mu=args.mu, n_ctx=args.ctx, rpc=args.rpc, repack=args.repack)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("mc-gguf chat: an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for chunk in llm.create_chat_completion(messages, max_tokens=args.max_tokens,
                                                temperature=args.temperature, stream=True):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    print_expert_stats(llm.expert_stats())
