"""`d2c generate`: greedy generation from a base model (+ adapter), with a KV cache."""

from __future__ import annotations

import argparse
import json

from d2c_jax.commands.checks import check_base, positive_int
from d2c_jax.commands.score import add_base_arguments, load_base_and_adapter


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="greedy generation from a base model (+ adapter)",
        description=(
            "Greedy decoding with a KV cache, batched over prompts, stopping at the eos token "
            "or --max-new-tokens. By default each prompt is one user turn of the tokenizer's "
            "chat template; --raw feeds the text as is (with the document-start token)."
        ),
    )
    add_base_arguments(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="a prompt (repeat for several; they are decoded as one batch)",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="stop after this many tokens"
    )
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--json", action="store_true", help="print a JSON list of outputs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from d2c_jax.generation import generate

    check_base(args.base)  # an unsupported model fails before any work
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    base, adapter, scale = load_base_and_adapter(args)
    outputs = generate(
        base,
        adapter,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.raw,
        scale=scale,
    )
    if args.json:
        print(
            json.dumps(
                [{"prompt": p, "output": o} for p, o in zip(args.prompt, outputs, strict=True)],
                indent=2,
            )
        )
    else:
        for i, out in enumerate(outputs):
            if len(outputs) > 1:
                print(f"--- {i}")
            print(out)
    return 0
