"""`d2c score`: per-example NLL of a JSONL example file under a base model (+ adapter)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from d2c_jax.commands.checks import (
    check_base,
    check_jsonl,
    check_out,
    json_dumps_strict,
    positive_int,
    read_json_object,
    replaceable,
)
from d2c_jax.io import write_text_atomic

DTYPES = ("float32", "bfloat16")


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
    """--base, --adapter and --dtype, shared by `d2c score` and `d2c generate`."""
    parser.add_argument(
        "--base",
        default="default",
        metavar="{default|HF_DIR|FILE.gguf}",
        help="base model: 'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face "
        "model directory or a GGUF file (default: %(default)s)",
    )
    parser.add_argument(
        "--adapter", metavar="PEFT_DIR", help="a PEFT LoRA adapter directory for this base model"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="compute dtype (default: %(default)s)"
    )


def load_base_and_adapter(args: argparse.Namespace):
    """(base, adapter params or None, scale) from --base / --adapter / --dtype."""
    import jax.numpy as jnp

    from d2c_jax.adapters import check_adapter_for_base
    from d2c_jax.models import load_base

    # Loading (and, for a GGUF, dequantising) the model takes seconds to a minute.
    what = "the embedded base model" if args.base == "default" else f"base model {args.base}"
    print(f"loading {what}...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    base = load_base(args.base, dtype=jnp.dtype(args.dtype))
    print(f"loaded {base.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if not args.adapter:
        return base, None, 1.0
    from d2c_jax.library import AdapterLibrary

    path = Path(args.adapter)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} not found")
    # Stacked to the base's depth: an adapter may skip its last layers (layers_to_transform).
    library = AdapterLibrary.load([path], num_layers=base.config.num_layers)
    check_adapter_for_base(base, library)
    params, scale = library.adapter(0)
    return base, params, scale


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="per-example NLL of prompt/target examples under a base model (+ adapter)",
        description=(
            'Score a JSONL file of {"prompt": ..., "target": ...} examples: each example\'s '
            "loss is the mean negative log-likelihood of its target tokens and the eos token "
            "(prompt tokenized with the tokenizer's special tokens, target without). Prints "
            '(or writes with --out) {"per_example_nll": [...], "mean_nll": x}, where '
            "mean_nll is the unweighted mean over examples. Document start: when the "
            "tokenizer adds no special token itself (SmolLM2), every prompt is preceded by "
            "<|endoftext|> (or the bos token), so the first prompt token has context; the "
            "output's prompt_prefix_tokens records what was prepended."
        ),
    )
    add_base_arguments(parser)
    parser.add_argument(
        "--examples",
        type=Path,
        required=True,
        metavar="FILE.jsonl",
        help='UTF-8 JSONL, one {"prompt": str, "target": str} per line',
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="FILE.json",
        help="write the JSON here (default: print it); an existing file is replaced only "
        "if it is a previous `d2c score` output",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="examples per forward pass (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from d2c_jax.examples import encode_examples, read_examples
    from d2c_jax.scoring import score_examples

    check_base(args.base)  # an unsupported model fails before any input is read
    inputs = [("--examples", args.examples), ("--adapter", args.adapter)]
    inputs.append(("--base", None if args.base == "default" else args.base))
    if args.out is not None:
        check_out(args.out, kind="file", inputs=inputs)
        replaceable(args.out, command="score", is_output=is_score_output, force=None)
    start = time.perf_counter()
    check_jsonl(args.examples, "--examples")
    examples = read_examples(args.examples)
    base, adapter, scale = load_base_and_adapter(args)
    encoded = encode_examples(base, examples)
    print(f"scoring {len(examples)} examples...", file=sys.stderr, flush=True)
    nll = score_examples(base, adapter, encoded, scale=scale, batch_size=args.batch_size)
    result = {
        "per_example_nll": [float(x) for x in nll],
        "mean_nll": float(np.mean(nll)),
        "num_examples": len(examples),
        "num_label_tokens": int(encoded.num_labels.sum()),
        "base": base.name,
        "adapter": str(args.adapter) if args.adapter else None,
        "dtype": args.dtype,
        "prompt_prefix_tokens": prompt_prefix_tokens(base.tokenizer),
        "seconds": round(time.perf_counter() - start, 3),
    }
    text = json_dumps_strict(result, indent=2)
    if args.out:
        write_text_atomic(args.out, text + "\n")
        print(
            f"mean_nll {result['mean_nll']:.4f} over {len(examples)} examples -> {args.out}",
            file=sys.stderr,
        )
    else:
        print(text)
    return 0


def is_score_output(path: Path) -> bool:
    """A JSON file `d2c score` wrote."""
    record = read_json_object(path)
    return record is not None and {"per_example_nll", "mean_nll"} <= set(record)


def prompt_prefix_tokens(tokenizer) -> list[str]:
    """The tokens the tokenizer puts before every prompt (the document start)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return list(tokenizer.convert_ids_to_tokens(ids))
