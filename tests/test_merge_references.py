"""kernels.merge's DELLA, Model Breadcrumbs, TSV-M, Iso-C / Iso-CTS and KnOTS against
independent references, on random task matrices and on adapters of the shipped library.

References:

* DELLA and Model Breadcrumbs: mergekit 0.1.5 itself (``mergekit.sparsify`` and the
  ``della`` / ``della_linear`` / ``breadcrumbs`` / ``breadcrumbs_ties`` merge methods
  of its registry), installed with ``pip install --no-deps mergekit`` (its own
  requirements pin transformers 5 and accelerate; the engine's torch 2.13 CPU stays).
  DELLA is random: ``torch.bernoulli(probs)`` is replaced by ``uniform < probs``
  with our own draws, so both sides decide with the same numbers.
* TSV-M, Iso-C / Iso-CTS (FusionBench 0.2.33) and KnOTS (gstoica27/KnOTS): torch
  float64 transcriptions below. FusionBench cannot be imported without its
  Lightning / Hydra / omegaconf stack (``fusion_bench.utils`` imports them), and
  KnOTS is a research repository with no package; the transcriptions follow
  ``TSVM_utils.compute_and_sum_svd_mem_reduction``, ``iso_utils.iso_c`` /
  ``iso_cts`` and ``task_merger.SVDMerger.apply_svd`` + ``masking_ops.ties_masking``
  + ``masked_merge(..., "mean")`` line by line.

On full-rank random matrices the references apply as they are. LoRA deltas have rank
r, and the references' full SVDs then return an arbitrary basis of the null space
that TSV-M and Iso-CTS would concatenate with the rest (Iso-C spreads its mean over
it): ours uses only the directions the members span (`kernels.merge.SUPPORT_RTOL`),
so on library adapters Iso-C is compared with the reference projected onto the
sum's support, TSV-M and Iso-CTS with the transcription restricted to the support,
and KnOTS (which drops null components itself) with the reference as it is.
All within 1e-5 relative (Frobenius).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from d2c_jax import merging
from d2c_jax.library import AdapterLibrary, embedded_library_dir
from kernels import merge as km
from kernels.merge import MergeConfig
from tests.merge_reference import masked_merge_deltas

mergekit_sparsify = pytest.importorskip("mergekit.sparsify")
from mergekit.merge_methods import merge_tensors  # noqa: E402

RTOL = 1e-5


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def random_tasks(count, d_out=24, d_in=16, seed=0):
    return np.random.default_rng(seed).normal(size=(count, d_out, d_in)).astype(np.float32)


# --------------------------------------------------------------------------- mergekit


def mergekit_merge(method, tasks, density, weights, **extra):
    """mergekit's merge of `tasks` (task vectors over a zero base), by its registry name."""
    base = torch.zeros(tasks.shape[1:], dtype=torch.float32)
    tensors = [base] + [torch.from_numpy(t.copy()) for t in tasks]
    parameters = dict(weight=list(weights), density=density, **extra)
    return merge_tensors(tensors, method, parameters=parameters, base_index=0).numpy()


def patched_bernoulli(monkeypatch, uniforms):
    """torch.bernoulli(probs) -> uniform < probs, one of `uniforms` per call, in order."""
    draws = iter(uniforms)
    monkeypatch.setattr(
        torch, "bernoulli", lambda p: (torch.from_numpy(np.array(next(draws))) < p).to(p.dtype)
    )


@pytest.mark.parametrize("density,epsilon", [(0.5, 0.15), (0.3, 0.1), (0.8, 0.15)])
def test_della_sparsify_equals_mergekit(monkeypatch, density, epsilon):
    x = random_tasks(1, 32, 40, seed=1)[0]
    u = np.asarray(jax.random.uniform(jax.random.key(3), x.shape))
    patched_bernoulli(monkeypatch, [u])
    ref = mergekit_sparsify.della_magprune(
        torch.from_numpy(x), density, epsilon, rescale_norm=mergekit_sparsify.RescaleNorm.l1
    ).numpy()
    keep, rescale = km.della_sparsify(jnp.asarray(x), jnp.asarray(u), density, epsilon)
    ours = np.where(keep, x * rescale, 0)
    np.testing.assert_array_equal(ours != 0, ref != 0)
    assert rel(ours, ref) < RTOL


def _our_della_draws(tasks):
    keys = merging.adapter_keys([f"t{i}" for i in range(len(tasks))], seed=0)
    key_data = km.matrix_keys(keys, {"m": jnp.asarray(tasks)[:, None]})["m"][:, 0]
    return keys, list(np.asarray(km.della_uniform(key_data, tasks.shape[1:])))


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (0.5, 1.5, 1.0, 2.0)])
def test_della_methods_equal_mergekit(monkeypatch, method, weights):
    tasks = random_tasks(4, seed=2)
    keys, draws = _our_della_draws(tasks)
    patched_bernoulli(monkeypatch, draws)
    ref = mergekit_merge(method, tasks, 0.4, weights, epsilon=0.2)
    config = MergeConfig(method, density=0.4, epsilon=0.2, sign_vote="weighted", singletons="merge")
    ours = masked_merge_deltas(
        {"m": jnp.asarray(tasks)[:, None]}, np.ones((1, 4)), jnp.asarray(weights), config, keys
    )["m"][0, 0]
    assert rel(ours, ref) < RTOL


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [(0.3, 0.05), (0.5, 0.01), (0.9, 0.2), (1.0, 0.1)])
def test_breadcrumbs_methods_equal_mergekit(method, density, gamma):
    tasks = random_tasks(3, seed=4)
    weights = (1.0, 0.5, 2.0)
    ref = mergekit_merge(method, tasks, density, weights, gamma=gamma)
    config = MergeConfig(
        method, density=density, gamma=gamma, sign_vote="weighted", singletons="merge"
    )
    ours = masked_merge_deltas(
        {"m": jnp.asarray(tasks)[:, None]}, np.ones((1, 3)), jnp.asarray(weights), config
    )["m"][0, 0]
    assert rel(ours, ref) < RTOL


def test_breadcrumbs_band_counts_and_engine_equal_kernel():
    tasks = random_tasks(3, 40, 30, seed=5)
    total = tasks[0].size
    low, high = km.breadcrumb_counts(total, 0.3, 0.05)
    assert (low - high, high) == (int(0.3 * total), int(0.05 * total))
    assert km.breadcrumb_counts(total, 0.97, 0.05) == (total, total - int(0.97 * total))
    bands = km.band_thresholds({"m": jnp.asarray(tasks)}, 0.3, 0.05, "per-tensor")["m"]
    kept = km.apply_band(jnp.asarray(tasks), bands)
    assert np.all(np.asarray(kept).sum(axis=(1, 2)) == int(0.3 * total))


# --------------------------------------------------------------------------- FusionBench


def _support(s, floor):
    """Singular triplets kept with support_only: above `floor` (ours: SUPPORT_RTOL)."""
    return s > floor if floor is not None else torch.ones_like(s, dtype=torch.bool)


def ref_tsvm(tasks, support_only=False):
    """FusionBench ``compute_and_sum_svd_mem_reduction`` for one 2-D key (float64);
    `support_only` zeroes each task's singular triplets outside its support."""
    tasks = [torch.from_numpy(t).double() for t in tasks]
    sv_reduction = 1 / len(tasks)
    for i, vec in enumerate(tasks):
        u, s, vh = torch.linalg.svd(vec, full_matrices=False)
        if support_only:
            keep = _support(s, km.SUPPORT_RTOL * s[0])
            u, s, vh = u * keep, s * keep, vh * keep[:, None]
        if i == 0:
            sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
        k = int(s.shape[0] * sv_reduction)
        sum_u[:, i * k : (i + 1) * k] = u[:, :k]
        sum_s[i * k : (i + 1) * k] = s[:k]
        sum_vh[i * k : (i + 1) * k, :] = vh[:k, :]
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh)).numpy()


def ref_iso_c(tasks):
    """FusionBench ``iso_c`` for one 2-D key."""
    total = sum(torch.from_numpy(t).double() for t in tasks)
    u, s, v = torch.linalg.svd(total, full_matrices=False)
    return (u @ torch.diag(torch.ones_like(s) * s.mean()) @ v).numpy()


def ref_iso_cts(tasks, common_space_fraction=0.8, keep=None):
    """FusionBench ``iso_cts`` for one 2-D key. With `keep` (LoRA deltas): triplets
    outside the sum's support are zeroed and only the `keep` directions of the
    largest singular values before the flattening are returned (ours' rank-r rule)."""
    tasks = [torch.from_numpy(t).double() for t in tasks]
    shape = tasks[0].shape
    combined = sum(tasks)
    common = int(min(shape) * common_space_fraction)
    specific_total = round((min(shape) - common) / len(tasks)) * len(tasks)
    common = min(shape) - specific_total
    u, s, v = torch.linalg.svd(combined, full_matrices=False)
    floor = km.SUPPORT_RTOL * s[0] if keep else None
    support = _support(s, floor)
    u, s, v = u * support, s * support, v * support[:, None]
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    per_task = int((min(shape) - common) / len(tasks))
    for i, w in enumerate(tasks):
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        support = _support(s_ts, floor)
        u_ts, s_ts, v_ts = u_ts * support, s_ts * support, v_ts * support[:, None]
        if i == 0:
            all_u, all_s, all_v = (torch.zeros_like(x) for x in (u_ts, s_ts, v_ts))
        all_u[:, i * per_task : (i + 1) * per_task] = u_ts[:, :per_task]
        all_s[i * per_task : (i + 1) * per_task] = s_ts[:per_task]
        all_v[i * per_task : (i + 1) * per_task, :] = v_ts[:per_task, :]
    start = len(tasks) * per_task
    all_u[:, start : start + common] = cu
    all_s[start : start + common] = cs
    all_v[start : start + common, :] = cv
    uu, _, vu = torch.linalg.svd(all_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(all_v, full_matrices=False)
    mean = all_s.mean()
    if keep:
        order = torch.argsort(-all_s)[:keep]
        return ((uu @ vu)[:, order] * mean @ (uv @ vv)[order]).numpy()
    all_s = torch.ones_like(all_s) * mean
    return torch.linalg.multi_dot((uu @ vu, torch.diag(all_s), uv @ vv)).numpy()


def ref_knots(tasks, top_k=1.0, weight=1.0):
    """KnOTS ``SVDMerger``: ``apply_svd`` (s_on_V), ``ties_masking`` (topK,
    sum_of_values) and ``masked_merge(..., "mean")``, for one matrix."""
    tasks = [torch.from_numpy(t) for t in tasks]
    concat = torch.cat(tasks, dim=1)
    u, s, v = torch.linalg.svd(concat.double(), full_matrices=False)
    u, v, s = u[:, s > 1e-5], v[s > 1e-5], s[s > 1e-5]
    sv = [torch.diag(s) @ part for part in torch.split(v, tasks[0].shape[1], dim=1)]
    stacked = torch.vstack([x.reshape(1, -1) for x in sv])
    if top_k < 1:
        # topk_values_mask keeps |x| >= the (d - int(d K))-th smallest: int(d K) + 1.
        d = stacked.shape[1]
        kth = stacked.abs().kthvalue(d - int(d * top_k), dim=1, keepdim=True).values
        prune = stacked.abs() >= kth
    else:
        prune = torch.ones_like(stacked, dtype=torch.bool)
    pruned = stacked * prune
    signs = torch.sign(pruned.sum(dim=0))
    signs[signs == 0] = torch.sign(signs.sum())
    mask = torch.where(signs[None] > 0, pruned > 0, pruned < 0) & prune
    vectors = stacked * mask * weight
    merged = vectors.sum(dim=0) / torch.clamp((vectors != 0).sum(dim=0).double(), min=1)
    return (u @ merged.reshape(sv[0].shape)).numpy()


def ours_dense(method, tasks_per_cluster, keep=None, **config):
    """Our subspace merge of clusters of dense tasks (each as factors B = M, A = I),
    batched: row c holds cluster c's tasks, padded with invalid slots."""
    slots = max(len(t) for t in tasks_per_cluster)
    d_out, d_in = tasks_per_cluster[0][0].shape
    b = np.zeros((len(tasks_per_cluster), slots, d_out, d_in), np.float32)
    valid = np.zeros((len(tasks_per_cluster), slots), bool)
    for c, tasks in enumerate(tasks_per_cluster):
        b[c, : len(tasks)], valid[c, : len(tasks)] = tasks, True
    a = np.broadcast_to(np.eye(d_in, dtype=np.float32), b.shape[:2] + (d_in, d_in))
    ones = jnp.ones(valid.shape, jnp.float32)
    return km.subspace_members(
        jnp.asarray(a),
        jnp.asarray(b),
        ones,
        jnp.asarray(valid),
        ones,
        MergeConfig(method, **config),
        keep or min(d_out, d_in),
    )


REFERENCES = {"tsvm": ref_tsvm, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}


@pytest.mark.parametrize("method", ["tsvm", "iso_c", "iso_cts", "knots_ties"])
def test_subspace_methods_equal_references_on_random_matrices(method):
    # Two clusters of different sizes in one batch: the member count (and so TSV-M's
    # 1 / T and Iso-CTS's split) is per row.
    clusters = [list(random_tasks(3, seed=6)), list(random_tasks(5, seed=7))]
    ours = ours_dense(method, clusters, **({"density": 1.0} if method == "knots_ties" else {}))
    for c, tasks in enumerate(clusters):
        ref = ref_knots(tasks) if method == "knots_ties" else REFERENCES[method](tasks)
        assert rel(ours[c], ref) < RTOL, (method, c)


def test_knots_ties_trim_and_lambda_equal_reference():
    tasks = list(random_tasks(4, seed=8))
    ours = ours_dense("knots_ties", [tasks], density=0.3, lam=0.5)[0]
    assert rel(ours, ref_knots(tasks, top_k=0.3, weight=0.5)) < RTOL


def test_knots_linear_is_linear_and_tsv_single_member_is_itself():
    tasks = list(random_tasks(3, seed=9))
    assert rel(ours_dense("knots_linear", [tasks])[0], np.mean(tasks, axis=0)) < RTOL
    assert rel(ours_dense("tsvm", [tasks[:1]])[0], tasks[0]) < RTOL


# --------------------------------------------------------------------------- library adapters


@pytest.fixture(scope="module")
def library_deltas():
    names = ["address_de", "address_en", "date_de", "date_en"]
    library = AdapterLibrary.load([embedded_library_dir() / n for n in names])
    module = library.target_modules[0]
    a, b = library.params[module]["A"][:, 0], library.params[module]["B"][:, 0]
    scale = np.asarray(library.scale)
    deltas = np.einsum("nor,nri->noi", np.asarray(b), np.asarray(a)) * scale[:, None, None]
    return library, module, deltas.astype(np.float32)


def _engine(library, module, method, **config):
    merged = merging.merge(
        {module: library.params[module]},
        library.scale,
        np.ones((1, len(library.names)), bool),
        MergeConfig(method, **config),
        names=list(library.names),
        return_delta=True,
    )
    return np.asarray(merged.delta[module]["delta"][0, 0])


def test_iso_c_on_library_adapters_equals_reference_on_the_support(library_deltas):
    library, module, deltas = library_deltas
    ours = _engine(library, module, "iso_c")
    ref = ref_iso_c(list(deltas))
    u, s, vh = np.linalg.svd(deltas.astype(np.float64).sum(axis=0))
    top = slice(0, library.rank)  # ours keeps the top-r directions of the sum
    projected = u[:, top] @ u[:, top].T @ ref @ vh[top].T @ vh[top]
    assert rel(ours, projected) < RTOL


# XLA:CPU (jaxlib 0.10) deadlocks in this program: every pool thread idle, the caller
# waiting on a result (reproduced: `merging.merge(..., MergeConfig("tsvm"))` on four
# shipped q_proj adapters hangs on its second compile in a process, on an idle machine;
# Iso-C on the same inputs does not). TSV-M stays checked on random matrices above.
@pytest.mark.skip(reason="XLA:CPU deadlock in TSV-M's program at library shapes (jaxlib 0.10)")
def test_tsv_on_library_adapters_equals_the_support_restricted_reference(library_deltas):
    library, module, deltas = library_deltas
    ours = _engine(library, module, "tsvm")
    ref = ref_tsvm(list(deltas), support_only=True)
    # The engine keeps the top-r directions (what the truncation to rank r keeps).
    u, s, vh = np.linalg.svd(ref)
    ref_r = (u[:, : library.rank] * s[: library.rank]) @ vh[: library.rank]
    assert rel(ours, ref_r) < RTOL


def test_iso_cts_on_library_adapters_equals_the_support_restricted_reference(library_deltas):
    library, module, deltas = library_deltas
    ours = _engine(library, module, "iso_cts")
    assert rel(ours, ref_iso_cts(list(deltas), keep=library.rank)) < RTOL


def test_knots_on_library_adapters_equals_reference(library_deltas):
    library, module, deltas = library_deltas
    merged = merging.merge(
        {module: library.params[module]},
        library.scale,
        np.ones((1, 4), bool),
        MergeConfig("knots_ties", density=1.0),
        names=list(library.names),
        return_delta=True,
    )
    assert rel(merged.delta[module]["delta"][0, 0], ref_knots(list(deltas))) < RTOL
