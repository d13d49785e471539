"""kernels.merge against PEFT's add_weighted_adapter on real (tiny) PEFT LoRA adapters.

A tiny random LlamaForCausalLM gets four random LoRA adapters (different
lora_alpha, so different scales); every merge the engine runs (the kernels
`merge_member_factors` and the streamed `merge_member_deltas`, given member lists)
is compared with what PEFT writes into lora_A / lora_B of the merged adapter, for
several clusters at once against one PEFT call per cluster; the kernel-level
checks compare the kernels with the masked reference of `tests.merge_reference`.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils
from transformers import LlamaConfig, LlamaForCausalLM

from d2c_jax.merging import adapter_keys, member_plan
from kernels import merge as km
from kernels.lowrank import factors_to_delta
from kernels.merge import MergeConfig
from tests.merge_reference import cluster_factor as ref_cluster_factor
from tests.merge_reference import masked_merge_deltas, masked_sums


def kernel_merge_deltas(factors, scale, membership, weights, config, keys=None):
    """The streamed delta-space kernels on host member lists (`d2c_jax.merging`'s
    path, jit and row groups aside)."""
    index, valid = member_plan(membership, scale.shape[0])
    state = km.prepare_delta_state(factors, scale, config, keys)
    return km.merge_member_deltas(factors, scale, state, weights, index, valid, config)


def kernel_merge_factors(factors, scale, membership, weights, config, keys=None):
    """`prepare_factors` then `merge_member_factors` on host member lists."""
    index, valid = member_plan(membership, scale.shape[0])
    sparse = km.prepare_factors(factors, config, keys)
    return km.merge_member_factors(factors, sparse, scale, weights, index, valid, config)


TINY = dict(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TARGETS = ("q_proj", "v_proj")
RANK = 4
ALPHAS = (8, 4, 16, 2)
NAMES = tuple(f"task{i}" for i in range(len(ALPHAS)))
CLUSTERS = ((0, 1, 2), (1, 3), (0, 1, 2, 3))  # several clusters of different sizes
WEIGHTS = (1.0, 0.5, 2.0, 0.8)
SIGNED_WEIGHTS = (0.6, -0.3, 1.1, 0.4)


def _lora_layer(model, layer: int, module: str):
    return getattr(model.base_model.model.model.layers[layer].self_attn, module)


@pytest.fixture(scope="module")
def peft_library():
    """(peft model with adapters NAMES, params {m: {"A", "B"}} [N, ...] numpy, scale [N])."""
    torch.manual_seed(0)
    model = None
    for i, name in enumerate(NAMES):
        config = LoraConfig(
            r=RANK, lora_alpha=ALPHAS[i], target_modules=list(TARGETS), init_lora_weights=False
        )
        torch.manual_seed(100 + i)
        if model is None:
            model = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY)), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    layers = range(TINY["num_hidden_layers"])
    params = {
        m: {
            side: np.stack(
                [
                    np.stack(
                        [
                            getattr(_lora_layer(model, layer, m), f"lora_{side}")[name]
                            .weight.detach()
                            .numpy()
                            for layer in layers
                        ]
                    )
                    for name in NAMES
                ]
            )
            for side in "AB"
        }
        for m in TARGETS
    }
    scale = np.array([_lora_layer(model, 0, "q_proj").scaling[name] for name in NAMES], np.float32)
    return model, params, scale


_counter = itertools.count()


def _peft_merge(model, members, weights, combination_type, density=None, majority="total"):
    """PEFT's merged factors {m: {"A": [L, r, d_in], "B": [L, d_out, r]}} and scaling."""
    name = f"merged{next(_counter)}"
    model.add_weighted_adapter(
        adapters=[NAMES[i] for i in members],
        weights=[weights[i] for i in members],
        adapter_name=name,
        combination_type=combination_type,
        density=density,
        majority_sign_method=majority,
    )
    layers = range(TINY["num_hidden_layers"])
    out = {
        m: {
            side: np.stack(
                [
                    getattr(_lora_layer(model, layer, m), f"lora_{side}")[name]
                    .weight.detach()
                    .numpy()
                    for layer in layers
                ]
            )
            for side in "AB"
        }
        for m in TARGETS
    }
    scaling = _lora_layer(model, 0, "q_proj").scaling[name]
    model.delete_adapter(name)
    return out, scaling


def _membership():
    mask = np.zeros((len(CLUSTERS), len(NAMES)), np.float32)
    for c, members in enumerate(CLUSTERS):
        mask[c, list(members)] = 1
    return jnp.asarray(mask)


def _ours_factor(params, scale, config, weights):
    keys = adapter_keys(NAMES, config.seed)
    return kernel_merge_factors(
        jax.tree.map(jnp.asarray, params),
        jnp.asarray(scale),
        _membership(),
        jnp.asarray(weights, jnp.float32),
        config,
        keys,
    )


FACTOR_CASES = [
    # (our config, PEFT combination_type, weights, how PEFT gets the weights)
    (MergeConfig("ties", space="factor", density=0.5), "ties", WEIGHTS),
    (MergeConfig("ties", space="factor", density=0.3, majority="frequency"), "ties", WEIGHTS),
    (MergeConfig("ties", space="factor", density=0.6), "ties", SIGNED_WEIGHTS),
    (MergeConfig("task_arithmetic", space="factor"), "linear", SIGNED_WEIGHTS),
    (MergeConfig("magnitude_prune", space="factor", density=0.4), "magnitude_prune", WEIGHTS),
]


@pytest.mark.parametrize(("config", "combination", "weights"), FACTOR_CASES)
def test_factor_space_equals_peft(peft_library, config, combination, weights):
    model, params, scale = peft_library
    ours = _ours_factor(params, scale, config, weights)
    for c, members in enumerate(CLUSTERS):
        ref, scaling = _peft_merge(
            model, members, weights, combination, config.density, config.majority
        )
        assert scaling == 1.0  # PEFT writes lora_alpha = r; ours has scale 1 too
        for m in TARGETS:
            for side in "AB":
                np.testing.assert_allclose(
                    ours[m][side][c],
                    ref[m][side],
                    rtol=1e-5,
                    atol=1e-6,
                    err_msg=f"{m} {side} c={c}",
                )


def test_factor_linear_is_peft_linear_with_weights_normalised_per_cluster(peft_library):
    model, params, scale = peft_library
    config = MergeConfig("linear", space="factor")
    assert config.divisor == "weight"
    ours = _ours_factor(params, scale, config, WEIGHTS)
    for c, members in enumerate(CLUSTERS):
        total = sum(WEIGHTS[i] for i in members)
        normalised = [w / total for w in WEIGHTS]
        ref, _ = _peft_merge(model, members, normalised, "linear")
        for m in TARGETS:
            for side in "AB":
                np.testing.assert_allclose(ours[m][side][c], ref[m][side], rtol=1e-5, atol=1e-6)


def _patch_peft_dare(monkeypatch, model, masks):
    """Make PEFT's random_pruning use our masks, found by the pruned tensor's storage."""
    by_pointer = {}
    for m in TARGETS:
        for side in "AB":
            for n, name in enumerate(NAMES):
                for layer in range(TINY["num_hidden_layers"]):
                    weight = getattr(_lora_layer(model, layer, m), f"lora_{side}")[name].weight
                    by_pointer[weight.data_ptr()] = np.asarray(masks[m][side][n, layer])
    calls = []

    def random_pruning(tensor, density, rescale):
        mask = torch.from_numpy(by_pointer[tensor.data_ptr()].astype(np.float32))
        calls.append(tensor.data_ptr())
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    return calls


@pytest.mark.parametrize("combination", ["dare_ties", "dare_linear"])
def test_factor_dare_equals_peft_given_the_same_masks(peft_library, monkeypatch, combination):
    model, params, scale = peft_library
    config = MergeConfig(combination, space="factor", density=0.6, seed=3)
    ours = _ours_factor(params, scale, config, WEIGHTS)
    masks = km.dare_masks(
        adapter_keys(NAMES, config.seed), jax.tree.map(jnp.asarray, params), config.density
    )
    calls = _patch_peft_dare(monkeypatch, model, masks)
    for c, members in enumerate(CLUSTERS):
        ref, _ = _peft_merge(model, members, WEIGHTS, combination, config.density)
        for m in TARGETS:
            for side in "AB":
                np.testing.assert_allclose(ours[m][side][c], ref[m][side], rtol=1e-5, atol=1e-6)
    assert (
        len(calls) == sum(len(c) for c in CLUSTERS) * len(TARGETS) * 2 * TINY["num_hidden_layers"]
    )


def test_dare_mask_statistics():
    keys = adapter_keys(["a", "b", "c"], seed=0)
    tree = {"q": jnp.ones((3, 4, 64, 64)), "v": jnp.ones((3, 4, 16, 64))}
    masks = km.dare_masks(keys, tree, 0.3)
    kept = np.concatenate([np.asarray(masks[m]).reshape(3, -1) for m in tree], axis=1)
    # 20480 Bernoulli(0.3) draws per adapter: mean within 5 standard errors of 0.3
    assert np.all(np.abs(kept.mean(axis=1) - 0.3) < 5 * np.sqrt(0.3 * 0.7 / kept.shape[1]))
    assert not np.array_equal(kept[0], kept[1])  # adapters draw independently
    again = km.dare_masks(keys, tree, 0.3)
    assert all(np.array_equal(masks[m], again[m]) for m in tree)  # same keys, same masks
    other = km.dare_masks(adapter_keys(["a", "b", "c"], seed=1), tree, 0.3)
    assert not np.array_equal(masks["q"], other["q"])
    # kept entries are rescaled by 1 / density, dropped ones are zero
    config = MergeConfig("dare_linear", density=0.3)
    prepared = km.sparsify(tree, config, keys)
    np.testing.assert_allclose(prepared["q"], np.where(masks["q"], 1 / 0.3, 0), rtol=1e-6)


SVD_CASES = [
    (MergeConfig("ties", density=0.5), "ties_svd", WEIGHTS),
    (MergeConfig("task_arithmetic"), "svd", SIGNED_WEIGHTS),
    (MergeConfig("magnitude_prune", density=0.3), "magnitude_prune_svd", WEIGHTS),
]


@pytest.mark.parametrize(("config", "combination", "weights"), SVD_CASES)
def test_delta_space_equals_peft_svd_variants(peft_library, config, combination, weights):
    """Delta space with per-tensor trim is PEFT's *_svd; compare B @ A (SVD signs are free)."""
    from kernels.lowrank import delta_to_factors

    model, params, scale = peft_library
    factors = jax.tree.map(jnp.asarray, params)
    merged = kernel_merge_deltas(
        factors, jnp.asarray(scale), _membership(), jnp.asarray(weights), config
    )
    for c, members in enumerate(CLUSTERS):
        ref, scaling = _peft_merge(model, members, weights, combination, config.density)
        for m in TARGETS:
            a, b = delta_to_factors(merged[m][c], RANK)
            np.testing.assert_allclose(
                b @ a, scaling * ref[m]["B"] @ ref[m]["A"], rtol=1e-4, atol=1e-5
            )


# ------------------------------------------------------------------ kernel-level checks


def test_trim_keeps_exactly_k_per_tensor_and_globally():
    rng = np.random.default_rng(0)
    tree = {
        "q": jnp.asarray(rng.standard_normal((3, 2, 8, 10)), jnp.float32),
        "v": jnp.asarray(rng.standard_normal((3, 2, 4, 10)), jnp.float32),
    }
    per_tensor = km.trim_masks(tree, 0.25, "per-tensor")
    assert np.all(np.asarray(per_tensor["q"]).sum(axis=(2, 3)) == 20)
    assert np.all(np.asarray(per_tensor["v"]).sum(axis=(2, 3)) == 10)
    for n in range(3):  # the kept ones are the largest
        for layer in range(2):
            x = np.abs(np.asarray(tree["q"][n, layer]))
            kept = np.asarray(per_tensor["q"][n, layer])
            assert x[kept].min() > x[~kept].max()
    global_ = km.trim_masks(tree, 0.25, "global")
    total = sum(np.asarray(global_[m]).reshape(3, -1).sum(axis=1) for m in tree)
    assert np.all(total == int(0.25 * (160 + 80)))
    assert np.all(np.asarray(km.trim_masks(tree, 0.0, "global")["q"]) == 0)
    assert np.all(np.asarray(km.trim_masks(tree, 1.0, "per-tensor")["v"]) == 1)


def _random_factors(seed, n=5, d_out=6, d_in=7, rank=3):
    rng = np.random.default_rng(seed)
    factors = {
        "q": {
            "A": jnp.asarray(rng.standard_normal((n, 2, rank, d_in)), jnp.float32),
            "B": jnp.asarray(rng.standard_normal((n, 2, d_out, rank)), jnp.float32),
        }
    }
    return factors, jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)


def test_member_changes_do_not_retrace_and_vmap_over_candidates():
    factors, scale = _random_factors(0)
    config = MergeConfig("ties", density=0.4)
    state = km.prepare_delta_state(factors, scale, config)
    weights = jnp.ones(5)
    traces = []

    @jax.jit
    def merge(index, valid):
        traces.append(1)
        return km.merge_member_deltas(factors, scale, state, weights, index, valid, config)

    masks = np.asarray([[[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], [[1, 0, 0, 0, 1], [0, 1, 1, 1, 0]]])
    plans = [member_plan(mask, 5) for mask in masks]
    a, b = (merge(*plan) for plan in plans)
    assert len(traces) == 1
    stacked = jax.vmap(merge)(*(np.stack(parts) for parts in zip(*plans, strict=True)))
    deltas = {"q": factors_to_delta(factors["q"]["A"], factors["q"]["B"], scale)}
    for merged, batched, mask in ((a, stacked["q"][0], masks[0]), (b, stacked["q"][1], masks[1])):
        np.testing.assert_allclose(batched, merged["q"], rtol=1e-6)
        reference = masked_merge_deltas(deltas, mask, weights, config)["q"]
        np.testing.assert_allclose(merged["q"], reference, rtol=1e-5, atol=1e-5)


def test_weighted_sign_vote_differs_from_unweighted_with_negative_weights():
    # two adapters, one entry: delta = B @ A = x
    factors = {"q": {"A": jnp.ones((2, 1, 1, 1)), "B": jnp.asarray([[[[1.0]]], [[[0.4]]]])}}
    scale, weights, membership = jnp.ones(2), jnp.asarray([1.0, -3.0]), np.ones((1, 2))
    unweighted, weighted = (
        kernel_merge_deltas(factors, scale, membership, weights, config)["q"].ravel()
        for config in (
            MergeConfig("ties", density=1.0),
            MergeConfig("ties", density=1.0, sign_vote="weighted"),
        )
    )
    # unweighted: both positive, elect +, mean of (1, -1.2) = -0.1
    np.testing.assert_allclose(unweighted, [-0.1], rtol=1e-6)
    # weighted: values (1, -1.2) sum negative, elect -, only the second agrees
    np.testing.assert_allclose(weighted, [-1.2], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="ties"), "density is required"),
        (dict(method="linear", density=0.5), "does not apply"),
        (dict(method="dare_ties", density=0.0), r"\(0, 1\]"),
        (dict(method="ties", density=1.5), r"\[0, 1\]"),
        (dict(method="merge"), "method must be one of"),
        (dict(method="ties", density=0.5, trim="layer"), "trim must be one of"),
        (dict(method="linear", weights=(1.0, -1.0)), "positive weights"),
        (dict(method="ties", density=0.5, space="factor", divisor="weight"), "delta space only"),
        (dict(method="linear", lam=float("nan")), "finite"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergeConfig(**kwargs)


def test_random_sparsifiers_need_keys():
    config = MergeConfig("dare_linear", density=0.5)
    factors, scale = _random_factors(0, n=3)
    with pytest.raises(ValueError, match="PRNG keys"):
        km.sparsify({"q": jnp.zeros((3, 2, 4, 4))}, config)
    with pytest.raises(ValueError, match="PRNG keys"):
        km.prepare_delta_state(factors, scale, config)
    with pytest.raises(ValueError, match="typed PRNG keys"):
        km.prepare_delta_state(factors, scale, config, jnp.zeros((3, 2), jnp.uint32))


def test_factor_global_trim_runs_over_all_modules_separately_for_a_and_b():
    rng = np.random.default_rng(1)
    factors = {
        m: {
            "A": jnp.asarray(rng.standard_normal((2, 3, 4, 10)), jnp.float32),
            "B": jnp.asarray(0.01 * rng.standard_normal((2, 3, d_out, 4)), jnp.float32),
        }
        for m, d_out in (("q_proj", 10), ("v_proj", 6))
    }
    config = MergeConfig("ties", space="factor", density=0.3, trim="global")
    prepared = km.prepare_factors(factors, config)
    for side in "AB":  # B is 100x smaller than A, yet keeps its own 30%
        kept = sum(
            np.count_nonzero(np.asarray(prepared[m][side]).reshape(2, -1), axis=1) for m in factors
        )
        total = sum(factors[m][side][0].size for m in factors)
        assert np.all(kept == int(0.3 * total))


SUM_CONFIGS = [
    MergeConfig("ties", density=0.5),
    MergeConfig("ties", density=0.5, majority="frequency"),
    MergeConfig("ties", density=0.5, sign_vote="weighted", divisor="weight"),
    MergeConfig("ties", density=0.5, sign_vote="weighted", divisor="none", majority="frequency"),
    MergeConfig("linear"),
    MergeConfig("task_arithmetic"),
]


@pytest.mark.parametrize(
    "config", SUM_CONFIGS, ids=lambda c: f"{c.method}-{c.majority}-{c.divisor}"
)
@pytest.mark.parametrize("split", [1, 2, 4])
def test_member_sums_of_a_split_add_up_to_the_whole(config, split):
    """Streaming members a few at a time (`add_sums`) merges like taking them all at
    once; padding slots and negative weights included."""
    rng = np.random.default_rng(split)
    x = jnp.asarray(rng.standard_normal((3, 5, 4, 6)) * (rng.random((3, 5, 4, 6)) > 0.3))
    valid = jnp.asarray(rng.random((3, 5)) > 0.25)
    weights = jnp.asarray(rng.uniform(-0.5, 2.0, (3, 5)), jnp.float32)
    whole = km.member_sums(x, valid, weights, config)
    assert len(whole) == km.num_sums(config)
    streamed = km.member_sums(x[:, :split], valid[:, :split], weights[:, :split], config)
    for start in range(split, 5, split):
        part = slice(start, start + split)
        streamed = km.add_sums(
            streamed, km.member_sums(x[:, part], valid[:, part], weights[:, part], config)
        )
    np.testing.assert_allclose(
        km.finish_sums(streamed, config), km.finish_sums(whole, config), rtol=1e-5, atol=1e-6
    )
    factor = km.cluster_factor(valid, weights, config)[:, None, None]
    expected = [
        masked_sums(x[c], valid[c][None], weights[c], config)[0]
        * ref_cluster_factor(valid[c][None], weights[c], config)[0]
        for c in range(3)
    ]
    np.testing.assert_allclose(
        km.finish_sums(whole, config) * factor, np.stack(expected), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("kind", ["normal", "sorted", "mostly_zero", "few_values", "heavy_tailed"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.9])
def test_trim_of_large_matrices_equals_numpy_top_k(kind, density):
    """Large matrices, sorted, mostly zero, with few distinct values (heavy ties) or
    magnitudes over 50 orders (where interpolating the count is worst): the kept
    entries are NumPy's top k by magnitude, plus every entry tied with the k-th."""
    rng = np.random.default_rng(7)
    size = (96, 70)
    x = rng.standard_normal(size)
    if kind == "sorted":
        x = np.sort(np.abs(x), axis=None).reshape(size) * rng.choice([-1, 1], size)
    elif kind == "mostly_zero":
        x = np.where(rng.random(size) < 0.95, 0.0, x)
    elif kind == "few_values":
        x = rng.choice([-2.0, -1.0, 0.5, 1.0, 3.0], size)
    elif kind == "heavy_tailed":
        x = np.sign(x) * 10.0 ** rng.uniform(-25, 25, size)
    x = x.astype(np.float32)
    kept = np.asarray(km.trim_masks({"m": jnp.asarray(x)[None]}, density, "per-tensor")["m"][0])
    k = int(density * x.size)
    kth = np.sort(np.abs(x), axis=None)[::-1][k - 1]
    np.testing.assert_array_equal(kept, np.abs(x) >= kth)
