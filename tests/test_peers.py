"""benchmarks/peers.py: the PEFT peer merges what the engine merges, and scores like it.

The speed ratios of bench_scoring and bench_d2c are only meaningful if the peer
does the same work: `peers.peft_combination` must pick the PEFT merge with the
semantics of our `MergeConfig`, and the peer's per-example NLL must follow the
engine's scoring contract.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from benchmarks import peers  # noqa: E402
from d2c_jax import merging  # noqa: E402
from d2c_jax.examples import encode_examples  # noqa: E402
from d2c_jax.scoring import score_examples  # noqa: E402
from kernels.merge import MergeConfig  # noqa: E402
from tests.conftest import random_lora  # noqa: E402

RANK, ALPHA, N = 4, 8.0, 4
NAMES = [f"t{i}" for i in range(N)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base):
    workdir = tmp_path_factory.mktemp("peers")
    params = random_lora(tiny_base.config, rank=RANK, n=N)
    dirs = peers.save_adapters(
        params, NAMES, rank=RANK, alpha=ALPHA, base_model=None, workdir=workdir
    )
    return params, peers.peft_model(peers.causal_lm(tiny_base, workdir / "hf"), dirs)


@pytest.mark.parametrize("space", ["delta", "factor"])
def test_peft_merge_equals_ours(setup, space):
    params, pmodel = setup
    config = MergeConfig("ties", space=space, density=0.5)
    peers.add_merged(pmodel, NAMES, "merged", config)
    try:
        got = peers.merged_deltas(pmodel, "merged")
    finally:
        pmodel.delete_adapter("merged")
    ours = merging.merge(
        params, jnp.full((N,), ALPHA / RANK), np.ones((1, N), np.float32), config, names=NAMES
    )
    for module, delta in got.items():
        want = np.asarray(ours.params[module]["B"][0] @ ours.params[module]["A"][0])
        np.testing.assert_allclose(delta, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_peft_combination_refuses_other_semantics():
    assert peers.peft_combination(merging.DEFAULT_MERGE) == "ties_svd"
    with pytest.raises(ValueError, match="PEFT has no merge"):
        peers.peft_combination(MergeConfig("ties", density=0.2, trim="global"))


def test_example_nll_matches_engine(setup, tiny_base, tiny_examples):
    params, pmodel = setup
    bank = encode_examples(tiny_base, tiny_examples, task_key=None)
    pmodel.set_adapter(NAMES[0])
    got = peers.example_nll(pmodel, bank, np.arange(bank.num_examples))
    adapter = {m: {f: params[m][f][0] for f in "AB"} for m in params}
    want = score_examples(tiny_base, adapter, bank, scale=ALPHA / RANK)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_single_adapter_is_kept_whole_like_peft_unless_asked_to_merge(setup):
    """PEFT merges a single adapter as ``linear`` (the adapter itself); so does the engine
    by default (``singletons="keep"``), while ``"merge"`` trims it like any cluster."""
    params, pmodel = setup
    config = MergeConfig("ties", space="delta", density=0.5)
    peers.add_merged(pmodel, NAMES[:1], "single", config)
    try:
        got = peers.merged_deltas(pmodel, "single")
    finally:
        pmodel.delete_adapter("single")
    merged = {
        mode: merging.merge(
            params,
            jnp.full((N,), ALPHA / RANK),
            np.eye(1, N, dtype=np.float32),
            dataclasses.replace(config, singletons=mode),
            names=NAMES,
            return_delta=True,
        )
        for mode in ("keep", "merge")
    }
    for module, delta in got.items():
        whole = ALPHA / RANK * params[module]["B"][0] @ params[module]["A"][0]
        np.testing.assert_allclose(delta, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
        kept = np.asarray(merged["keep"].delta[module]["delta"][0])
        np.testing.assert_allclose(kept, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
        trimmed = np.asarray(merged["merge"].delta[module]["delta"][0])
        assert np.count_nonzero(trimmed) < 0.6 * trimmed.size


@pytest.fixture(scope="module")
def task_bank(tiny_base):
    """The tiny examples as one bank, split into N tasks of consecutive rows."""
    from tests.conftest import TINY_TASKS

    examples = [{"prompt": p, "target": t} for pairs in TINY_TASKS.values() for p, t in pairs]
    bank = encode_examples(tiny_base, examples, task_key=None)
    return bank, np.array_split(np.arange(bank.num_examples), N)


# K=3 clusters {0, 1}, {2}, {3}; moves of adapters 0 and 1 to clusters 1 and 2 share
# their sources: 2 sources ({1}, {0}) and 4 destinations, 6 distinct sets for 4 moves.
ASSIGN, K = np.array([0, 0, 1, 2]), 3
MOVES = np.array([[0, 1], [0, 2], [1, 1], [1, 2]])
CONFIG = MergeConfig("ties", space="delta", density=0.5)


def test_move_objective_equals_naive_objective_of_each_move(setup, task_bank):
    _, pmodel = setup
    bank, examples_of = task_bank
    timed = peers.move_objective(pmodel, NAMES, ASSIGN, K, bank, examples_of, CONFIG, MOVES, {})
    assert timed.value.shape == (len(MOVES), N)
    for (i, b), got in zip(MOVES, timed.value, strict=True):
        moved = ASSIGN.copy()
        moved[i] = b
        naive = peers.dev_objective(pmodel, NAMES, moved, K, bank, examples_of, CONFIG)
        np.testing.assert_allclose(got, naive.value, rtol=0, atol=1e-5)


def test_move_objective_scores_each_changed_member_set_once(setup, task_bank):
    _, pmodel = setup
    bank, examples_of = task_bank
    cache: dict = {}
    first = peers.move_objective(pmodel, NAMES, ASSIGN, K, bank, examples_of, CONFIG, MOVES, cache)
    changed = {frozenset({1}), frozenset({0}), frozenset({0, 2}), frozenset({0, 3})}
    changed |= {frozenset({1, 2}), frozenset({1, 3})}
    current = {frozenset({0, 1}), frozenset({2}), frozenset({3})}
    assert first.sets_scored == len(changed)  # the K current clusters are not counted
    assert set(cache) == changed | current
    again = peers.move_objective(pmodel, NAMES, ASSIGN, K, bank, examples_of, CONFIG, MOVES, cache)
    assert again.sets_scored == 0
    np.testing.assert_array_equal(again.value, first.value)
