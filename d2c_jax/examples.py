"""Examples: read the JSONL files and encode them into padded token batches.

The first step of every path that touches examples (``d2c score``, ``d2c train``,
the D2C objective, evaluation): `read_examples` turns a file into dicts,
`encode_examples` turns dicts into an `EncodedExamples` batch that
`d2c_jax.packing` packs and `d2c_jax.scoring` scores.

Example contract (``docs/ARCHITECTURE.md``)
-------------------------------------------
Examples are JSONL lines ``{"prompt": str, "target": str}`` (other keys, e.g.
``"task"``, are kept and ignored here). An example's tokens are
``tokenizer(prompt, add_special_tokens=True) + tokenizer(target,
add_special_tokens=False) + [eos_id]``; with the tokenizers of `load_base` the first
part starts with a document-start token (``<|endoftext|>`` for SmolLM2, see
`d2c_jax.models`). Its loss is the mean NLL of the target tokens and the eos.
Sequences are right-padded to a length bucket (a multiple of `bucket`); padding never
changes a loss because no real token attends to a later position and padded labels
are masked.

Shapes: ``tokens [M, T]`` int32 and ``loss_mask [M, T]`` float32, where
``loss_mask[m, t] = 1`` iff token ``t`` of example ``m`` is a label (target or eos);
it is predicted from position ``t - 1``. ``lengths [M]``, ``task_ids [M]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BUCKET = 16


class ExampleError(ValueError):
    """Invalid example input (malformed JSONL, empty target, too long for the context)."""


def read_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``{"prompt": str, "target": str}`` JSONL; blank lines are skipped.

    Each returned dict also carries ``"_line"`` (1-based line number) so later errors
    (e.g. too long for the context) can point at the file. Raises FileNotFoundError,
    or ExampleError naming ``path:line`` for malformed JSON, a line that is not an
    object, a missing or non-string prompt/target, or an empty target.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"examples file {str(path)!r} not found")
    examples = []
    # utf-8-sig: a byte-order mark (editors on Windows write one) is not part of line 1.
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ExampleError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            try:
                validate_example(obj)
            except ExampleError as err:
                raise ExampleError(f"{path}:{lineno}: {err}") from None
            examples.append({**obj, "_line": lineno})
    if not examples:
        raise ExampleError(f"{path}: no examples")
    return examples


def validate_example(obj: Any) -> None:
    """Raise ExampleError unless `obj` is ``{"prompt": str, "target": non-empty str}``."""
    if not isinstance(obj, Mapping):
        raise ExampleError(
            f"expected a JSON object with prompt and target, got {type(obj).__name__}"
        )
    for key in ("prompt", "target"):
        if key not in obj:
            raise ExampleError(f"missing {key!r}")
        if not isinstance(obj[key], str):
            raise ExampleError(f"{key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["target"].strip():
        raise ExampleError("empty target")


@dataclasses.dataclass(frozen=True)
class EncodedExamples:
    """Right-padded token batch (NumPy).

    Attributes:
      tokens: ``[M, T]`` int32, right-padded; T is a multiple of the bucket.
      loss_mask: ``[M, T]`` float32, 1 on label tokens (target + eos).
      lengths: ``[M]`` int32 real lengths (computed from the mask if omitted).
      task_ids: ``[M]`` int32 or None (filled by `encode_examples` from a task key).
      task_names: names of the task ids, or None.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray | None = None
    task_ids: np.ndarray | None = None
    task_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.tokens.shape != self.loss_mask.shape:
            raise ValueError(
                f"tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} differ"
            )
        if self.lengths is None:
            m, t = self.loss_mask.shape
            last = t - 1 - np.argmax(np.asarray(self.loss_mask)[:, ::-1] > 0, axis=1)
            object.__setattr__(self, "lengths", (last + 1).astype(np.int32))

    @property
    def num_examples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_labels(self) -> np.ndarray:
        return np.asarray(self.loss_mask).sum(axis=1).astype(np.int32)

    def __len__(self) -> int:
        return self.num_examples

    def subset(self, indices) -> EncodedExamples:
        idx = np.asarray(indices)
        return EncodedExamples(
            tokens=self.tokens[idx],
            loss_mask=self.loss_mask[idx],
            lengths=self.lengths[idx],
            task_ids=None if self.task_ids is None else self.task_ids[idx],
            task_names=self.task_names,
        )


def round_up(n: int, bucket: int) -> int:
    return max(bucket, int(math.ceil(n / bucket)) * bucket)


def _tokenizer_and_context(tokenizer_or_base, max_length):
    tokenizer = getattr(tokenizer_or_base, "tokenizer", tokenizer_or_base)
    config = getattr(tokenizer_or_base, "config", None)
    if max_length is None and config is not None:
        max_length = config.context_limit
    return tokenizer, max_length


def encode_examples(
    tokenizer_or_base,
    examples: Sequence[Mapping[str, Any]],
    *,
    max_length: int | None = None,
    bucket: int = DEFAULT_BUCKET,
    pad_to: int | None = None,
    task_key: str | None = "task",
) -> EncodedExamples:
    """Tokenize examples per the contract and right-pad them to a length bucket.

    Args:
      tokenizer_or_base: a tokenizer, or a `BaseModel` (then `max_length` defaults to
        the model's context length).
      examples: dicts with ``prompt`` and ``target`` (see `read_examples`).
      max_length: context length; longer examples raise ExampleError.
      bucket: T is rounded up to a multiple of this (fewer recompiles).
      pad_to: pad to exactly this T instead (must fit every example).
      task_key: if every example has this key, ``task_ids`` / ``task_names`` are set
        (ids in order of first appearance).
    """
    tokenizer, max_length = _tokenizer_and_context(tokenizer_or_base, max_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token")
    if not examples:
        raise ExampleError("no examples to encode")

    def where(i):
        line = examples[i].get("_line") if isinstance(examples[i], Mapping) else None
        return f"example {i}" + (f" (line {line})" if line is not None else "")

    for i, ex in enumerate(examples):
        try:
            validate_example(ex)
        except ExampleError as err:
            raise ExampleError(f"{where(i)}: {err}") from None
    prompts = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=True)["input_ids"]
    targets = tokenizer([ex["target"] for ex in examples], add_special_tokens=False)["input_ids"]
    seqs, masks = [], []
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        if not p:
            raise ExampleError(
                f"{where(i)}: empty prompt and the tokenizer adds no start token, so the first "
                "target token would have no context"
            )
        if not t:
            raise ExampleError(f"{where(i)}: empty target")
        seq = list(p) + list(t) + [eos]
        if max_length is not None and len(seq) > max_length:
            raise ExampleError(
                f"{where(i)}: {len(seq)} tokens (prompt {len(p)}, target {len(t)}, eos 1) are "
                f"longer than the model's context of {max_length} tokens"
            )
        seqs.append(seq)
        masks.append([0] * len(p) + [1] * (len(t) + 1))
    longest = max(map(len, seqs))
    t_len = round_up(longest, bucket) if pad_to is None else pad_to
    if t_len < longest:
        raise ExampleError(
            f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tokens = np.full((len(seqs), t_len), pad, np.int32)
    loss_mask = np.zeros((len(seqs), t_len), np.float32)
    for i, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
        tokens[i, : len(seq)] = seq
        loss_mask[i, : len(mask)] = mask
    task_ids = task_names = None
    if task_key and all(task_key in ex for ex in examples):
        names: dict[str, int] = {}
        task_ids = np.asarray(
            [names.setdefault(str(ex[task_key]), len(names)) for ex in examples], np.int32
        )
        task_names = tuple(names)
    return EncodedExamples(
        tokens=tokens,
        loss_mask=loss_mask,
        lengths=np.asarray([len(s) for s in seqs], np.int32),
        task_ids=task_ids,
        task_names=task_names,
    )
