"""The transformers + PEFT peer: what a researcher would write in torch (benchmarks only).

The speed benchmarks compare the engine against this one implementation:
`bench_scoring.py` scores merged candidates with it, `bench_d2c.py` runs a naive
D2C iteration with it. The engine never imports this module.

The peer works on the engine's own inputs so that only the implementation differs:
the base model is the engine's weights written as a Hugging Face directory
(`causal_lm`), adapters are PEFT directories (the library's own, or
`save_adapters` for an in-memory one), and examples are the engine's encoded bank
(`d2c_jax.examples.EncodedExamples`: the same tokens and label mask, so the same
scoring contract: an example's NLL is the mean over its label tokens). What the
peer does its own way, as a PEFT user would:

* merges with ``PeftModel.add_weighted_adapter`` (`peft_combination` maps a
  `MergeConfig` to the PEFT combination type with the same semantics, e.g. delta
  space TIES -> ``ties_svd``, which truncates to rank r by SVD, one module-layer at
  a time);
* scores in batches of 16 examples, each padded to its longest with an attention
  mask, computing full logits and ``cross_entropy`` over the whole vocabulary.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from kernels.merge import MergeConfig

BATCH_SIZE = 16


def peft_combination(config: MergeConfig) -> str:
    """PEFT's ``combination_type`` with the semantics of `config`, or ValueError.

    PEFT trims per tensor, votes on unweighted values, divides TIES by the count of
    agreeing entries, keeps a one-adapter merge whole and has no lambda; its ``*_svd``
    types merge dense deltas and truncate to rank r (our delta space), the others
    merge A and B (our factor space).
    """
    pefts = {"ties": "ties", "task_arithmetic": "linear", "magnitude_prune": "magnitude_prune"}
    same = (
        config.method in pefts
        and config.trim == "per-tensor"
        and config.sign_vote == "unweighted"
        and config.lam == 1.0
        and config.weights is None
        and config.singletons == "keep"
        and config.divisor == ("count" if config.method == "ties" else "none")
    )
    if not same:
        raise ValueError(f"PEFT has no merge with the semantics of {config}")
    if config.space == "factor":
        return pefts[config.method]
    return {"ties": "ties_svd", "task_arithmetic": "svd", "magnitude_prune": "magnitude_prune_svd"}[
        config.method
    ]


def causal_lm(base, workdir: Path):
    """The engine's base model as a float32 transformers model (via an HF directory)."""
    import transformers

    from d2c_jax.models.hf import save_hf_weights

    weights = {k: np.asarray(v) for k, v in base.model.weights().items() if k != "layers"}
    weights["layers"] = {k: np.asarray(v) for k, v in base.model.weights()["layers"].items()}
    save_hf_weights(workdir, base.config, weights)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(workdir), dtype=torch.float32
    ).eval()


def save_adapters(
    params: Mapping[str, Mapping[str, np.ndarray]],
    names: Sequence[str],
    *,
    rank: int,
    alpha: float,
    base_model: str | None,
    workdir: Path,
) -> dict[str, Path]:
    """Write stacked adapters ``{module: {"A": [N, ...], "B": [N, ...]}}`` as PEFT dirs."""
    import jax.numpy as jnp

    from d2c_jax.library import save_peft_adapter

    return {
        name: save_peft_adapter(
            workdir / name,
            {m: {f: np.asarray(params[m][f][i]) for f in "AB"} for m in params},
            rank=rank,
            alpha=alpha,
            base_model=base_model,
            dtype=jnp.float32,
        )
        for i, name in enumerate(names)
    }


def peft_model(model, adapter_dirs: Mapping[str, Path]):
    """A ``PeftModel`` holding every adapter of `adapter_dirs` ``{name: directory}``."""
    from peft import PeftModel

    items = list(adapter_dirs.items())
    pmodel = PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
    for name, directory in items[1:]:
        pmodel.load_adapter(str(directory), adapter_name=name)
    return pmodel.eval()


def add_merged(pmodel, members: Sequence[str], name: str, config: MergeConfig) -> None:
    """Merge the adapters `members` into a new adapter `name` with PEFT."""
    pmodel.add_weighted_adapter(
        list(members),
        [1.0] * len(members),
        name,
        combination_type=peft_combination(config),
        density=config.density,
        majority_sign_method=config.majority,
    )


def merged_deltas(pmodel, name: str) -> dict[str, np.ndarray]:
    """``{module: [L, d_out, d_in]}``: the dense update ``scaling * B @ A`` of adapter `name`."""
    out: dict[str, list[np.ndarray]] = {}
    for path, module in pmodel.named_modules():
        if hasattr(module, "get_delta_weight") and name in getattr(module, "lora_A", {}):
            out.setdefault(path.rsplit(".", 1)[-1], []).append(
                module.get_delta_weight(name).detach().numpy()
            )
    return {m: np.stack(layers) for m, layers in out.items()}


def example_nll(pmodel, bank, rows: Sequence[int]) -> np.ndarray:
    """Per-example NLL (mean over label tokens) of bank examples `rows` under the active
    adapter, in batches of `BATCH_SIZE` padded to their longest."""
    rows = np.asarray(rows)
    out = np.empty(len(rows), np.float32)
    with torch.inference_mode():
        for lo in range(0, len(rows), BATCH_SIZE):
            batch = rows[lo : lo + BATCH_SIZE]
            length = int(bank.lengths[batch].max())
            ids = torch.from_numpy(bank.tokens[batch, :length]).long()
            attention = torch.from_numpy(np.arange(length)[None] < bank.lengths[batch][:, None])
            logits = pmodel(input_ids=ids, attention_mask=attention.long()).logits[:, :-1]
            labels = ids[:, 1:].clone()
            labels[torch.from_numpy(bank.loss_mask[batch, 1:length]) == 0] = -100
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
            ).reshape(labels.shape)
            out[lo : lo + len(batch)] = (ce.sum(1) / (labels != -100).sum(1)).numpy()
    return out


@dataclasses.dataclass
class Timed:
    """A peer result with the seconds spent merging and scoring, and the member sets
    merged and scored in them."""

    value: np.ndarray
    merge_seconds: float
    score_seconds: float
    sets_scored: int = 0


def score_member_sets(
    pmodel,
    names: Sequence[str],
    masks: np.ndarray,
    bank,
    examples_of: Sequence[np.ndarray],
    config: MergeConfig,
) -> Timed:
    """``[C, N]`` task losses of merged member sets, one candidate at a time.

    Row c of `masks` is merged with PEFT and each of its member tasks t is scored on
    its bank rows ``examples_of[t]``; the value is the mean NLL per member task
    (NaN for non-members), the peer of `DevObjective.task_losses`.
    """
    out = np.full(masks.shape, np.nan)
    merge_s = score_s = 0.0
    for c, mask in enumerate(np.asarray(masks, bool)):
        start = time.perf_counter()
        add_merged(pmodel, [names[i] for i in np.flatnonzero(mask)], "candidate", config)
        pmodel.set_adapter("candidate")
        merge_s += time.perf_counter() - start
        start = time.perf_counter()
        tasks = np.flatnonzero(mask)
        nll = example_nll(pmodel, bank, np.concatenate([examples_of[t] for t in tasks]))
        bounds = np.cumsum([0] + [len(examples_of[t]) for t in tasks])
        out[c, tasks] = [nll[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        score_s += time.perf_counter() - start
        pmodel.delete_adapter("candidate")
    return Timed(out, merge_s, score_s, len(masks))


def dev_objective(
    pmodel,
    names: Sequence[str],
    assign: np.ndarray,
    k: int,
    bank,
    examples_of: Sequence[np.ndarray],
    config: MergeConfig,
) -> Timed:
    """The whole D2C objective of `assign` computed naively: merge every cluster, score
    every task under its cluster's merge; the value is the ``[N]`` per-task mean NLL
    (J is its mean)."""
    assign = np.asarray(assign)
    masks = assign[None, :] == np.arange(k)[:, None]
    per_cluster = score_member_sets(pmodel, names, masks, bank, examples_of, config)
    return dataclasses.replace(per_cluster, value=per_cluster.value[assign, np.arange(len(assign))])


def move_objective(
    pmodel,
    names: Sequence[str],
    assign: np.ndarray,
    k: int,
    bank,
    examples_of: Sequence[np.ndarray],
    config: MergeConfig,
    moves: np.ndarray,
    cache: dict[frozenset, np.ndarray],
) -> Timed:
    """The D2C objective of each move's assignment, scoring only member sets that change.

    The smart peer: the savings of the engine's `move_deltas` + `CachedObjective` with
    PEFT merges. `moves` ``[M, 2]`` are (adapter i, cluster b) pairs; `cache` maps a
    member set (frozenset of adapter indices) to its ``[N]`` task losses (NaN for
    non-members, a row of `score_member_sets`) and is filled in place. The K current
    clusters of `assign` are scored first where not cached (not counted in the result);
    then every member set not in the cache that a move creates (the source ``a - i``
    and destination ``b + i``; the other clusters are current ones) is merged and
    scored once. The value is ``[M, N]``: each task's loss under its cluster's merge in
    the move's assignment (J is its row mean); the seconds and `sets_scored` are those
    of the moves' new sets only.
    """
    assign = np.asarray(assign)
    moves = np.asarray(moves, int).reshape(-1, 2)
    moved = np.repeat(assign[None], len(moves), 0)  # [M, N]
    moved[np.arange(len(moves)), moves[:, 0]] = moves[:, 1]

    def key(mask: np.ndarray) -> frozenset:
        return frozenset(np.flatnonzero(mask).tolist())

    def score_new(rows: np.ndarray) -> Timed:
        """Score the distinct member sets of the clusters of assignments `rows` not cached."""
        new = {key(row == c): row == c for row in rows for c in np.unique(row)}
        new = {s: mask for s, mask in new.items() if s not in cache}
        masks = np.array(list(new.values()), bool).reshape(-1, len(assign))
        timed = score_member_sets(pmodel, names, masks, bank, examples_of, config)
        cache.update(zip(new, timed.value, strict=True))
        return timed

    score_new(assign[None])
    timed = score_new(moved)
    value = np.array([[cache[key(row == c)][t] for t, c in enumerate(row)] for row in moved])
    return dataclasses.replace(timed, value=value.reshape(len(moved), len(assign)))


def warm_up(pmodel, names: Sequence[str], bank, config: MergeConfig) -> None:
    """One merge and one batch (torch compiles nothing; this fills its caches)."""
    add_merged(pmodel, list(names[:2]), "warm", config)
    pmodel.set_adapter("warm")
    example_nll(pmodel, bank, np.arange(min(BATCH_SIZE, bank.tokens.shape[0])))
    pmodel.delete_adapter("warm")


def pick_torch_threads(pmodel, names: Sequence[str], bank, config: MergeConfig) -> dict:
    """Seconds of a probe (`warm_up`) with 1 thread and torch's default; sets the faster.

    On a busy machine torch's default threads can spin against each other and run
    several times slower than one thread; the peer gets whichever is faster here.
    """
    probe = {}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        warm_up(pmodel, names, bank, config)
        probe[threads] = round(time.perf_counter() - start, 3)
    best = min(probe, key=probe.get)
    torch.set_num_threads(best)
    return {"probe_seconds": probe, "used": best}
